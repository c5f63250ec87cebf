"""Handles files: how a process that owns live weights lets another one read them.

Two kinds of entry share one file, a dict of ``name -> entry`` plus ``__metadata__``:

* CUDA tensors: ``{"handle": (rebuild_cuda_tensor, args)}``, exactly what torch's
  ``reduce_tensor`` gives (the seeds' format, which vLLM export hooks write).
* CPU tensors: ``{"shm": {"name", "size", "offset", "dtype", "shape"}}``: the
  tensor's storage is moved (in place, as ``share_memory_`` does) into a named
  POSIX shared-memory object, which the reader maps read-only.

Loading never runs arbitrary code: the archive's pickle is read by a restricted
unpickler that resolves only torch dtypes, a few value classes, and
``rebuild_cuda_tensor`` *by name* (a pickle cannot call it), and the file must be a
regular file owned by the current user and writable by nobody else, in a directory
nobody else can swap it in. Every entry's structure is checked before this module
calls the rebuild function itself.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import pickle
import stat
import tempfile
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from apollo_sync.dtypes import itemsize, st_dtype
from apollo_sync.errors import HandlesError, ProducerGoneError, UnsafeHandlesError
from apollo_sync.live import LiveTensor, OpenFile, from_torch
from apollo_sync.steps import StepCounter

FORMAT = "apollo_sync.handles/1"
METADATA_KEY = "__metadata__"
_SHM_DIR = Path("/dev/shm")
_CUDA_ARGS = 15


class _Named:
    """What the unpickler gives for ``rebuild_cuda_tensor``: a name, not the
    function. A pickle may place it in a handle tuple; calling it while
    unpickling (REDUCE) fails. The real function is called by this module, on
    arguments whose structure has been checked."""

    def __repr__(self) -> str:
        return "<rebuild_cuda_tensor (not callable while unpickling)>"


_REBUILD = _Named()

#: Classes a handles pickle may name or construct: harmless value types.
_CLASSES: dict[tuple[str, str], Any] = {
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch", "Tensor"): torch.Tensor,
    ("torch._tensor", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch.storage", "TypedStorage"): torch.storage.TypedStorage,
    ("torch.storage", "UntypedStorage"): torch.storage.UntypedStorage,
    ("torch", "UntypedStorage"): torch.storage.UntypedStorage,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
}


def _latin1_bytes(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Protocol-2 pickles (torch.save's) spell ``bytes`` as ``_codecs.encode(text,
    "latin1")``; this allows exactly that and no other codec."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed in a handles file")
    return text.encode("latin1")


class _HandlesUnpickler(pickle.Unpickler):
    """Resolves only ``rebuild_cuda_tensor`` (as :data:`_REBUILD`), torch dtypes and
    :data:`_CLASSES`; anything else, and any tensor data, is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
            return _REBUILD
        if (module, name) in _CLASSES:
            return _CLASSES[(module, name)]
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a handles file")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("tensor data is not allowed in a handles file")


def _unpickle(raw: bytes) -> Any:
    """The object in a ``torch.save`` archive, unpickled by :class:`_HandlesUnpickler`."""
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        pkls = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise ValueError("no single data.pkl in the archive")
        data = z.read(pkls[0])
    try:
        return _HandlesUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError:
        raise
    except TypeError as e:  # e.g. a pickle that tries to call _REBUILD
        raise pickle.UnpicklingError(f"refused call while unpickling: {e}") from None


def default_handles_path() -> Path:
    """Where handles go unless told otherwise: ``$APOLLO_SYNC_HANDLES``, else a
    private per-user directory (``$XDG_RUNTIME_DIR/apollo_sync`` or
    ``~/.cache/apollo_sync``), never a shared ``/tmp`` path."""
    env = os.environ.get("APOLLO_SYNC_HANDLES")
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and Path(runtime).is_dir() else Path.home() / ".cache"
    return base / "apollo_sync" / "weight_handles.pt"


@dataclass
class Handles:
    """Live tensors opened from a handles file, and what keeps their memory mapped."""

    tensors: dict[str, LiveTensor]
    metadata: dict[str, Any]
    path: Path
    _keepalive: list[Any] = field(default_factory=list, repr=False)
    _maps: dict[str, tuple[Any, OpenFile]] = field(default_factory=dict, repr=False)

    def close(self) -> None:
        """Drops the mappings (the live tensors must not be used afterwards)."""
        self.tensors.clear()
        for obj in self._keepalive:
            with contextlib.suppress(BufferError):  # still exported somewhere: GC frees it
                obj.close()
        self._keepalive.clear()
        for _, f in self._maps.values():
            f.close()
        self._maps.clear()

    def __enter__(self) -> Handles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Export (the producer side)
# ---------------------------------------------------------------------------


def export_handles(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str] | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    step_counter: StepCounter | None = None,
) -> Path:
    """Writes a handles file for ``tensors`` so another process can read them live.

    CUDA tensors are exported as CUDA IPC handles; CPU tensors have their storage
    moved into named shared memory in place (the tensors stay the same objects and
    keep their values). The file is written atomically (temp file, fsync, rename)
    with mode 0600. The caller must keep the tensors alive while handles are in use.
    With a ``step_counter`` (bumped around each training step), a sync through these
    handles never commits a mix of two steps.
    """
    target = Path(path) if path is not None else default_handles_path()
    meta = _producer_metadata()
    for k, v in (metadata or {}).items():
        _check_plain(k, v)
        meta[k] = v
    if step_counter is not None:
        meta["step_counter"] = str(step_counter.path)
    entries: dict[str, Any] = {}
    for name, tensor in tensors.items():
        if name == METADATA_KEY:
            raise HandlesError(f"{METADATA_KEY!r} is reserved and cannot name a tensor")
        t = tensor.detach()
        if t.device.type == "cuda":
            entries[name] = {"handle": _reduce_cuda(name, t)}
            meta.setdefault("gpu_uuid", _gpu_uuid(t.device))
            meta.setdefault("cuda_allocator", _cuda_allocator())
        elif t.device.type == "cpu":
            entries[name] = {"shm": _share_cpu(name, t)}
        else:
            raise HandlesError(f"{name}: cannot export a tensor on {t.device}")
    entries[METADATA_KEY] = meta
    _write_atomic(target, entries)
    return target


def _reduce_cuda(name: str, t: torch.Tensor) -> Any:
    """torch's IPC reduction of a CUDA tensor, with a clear error where its memory
    cannot be shared (memory from a pluggable allocator, as vLLM's sleep mode uses)."""
    try:
        return reduce_tensor(t)
    except RuntimeError as e:
        msg = str(e).split("\n", 1)[0]
        raise HandlesError(
            f"{name}: cannot export a CUDA IPC handle ({msg}). Its memory may come from a "
            "virtual-memory allocator (vLLM sleep mode's cuMem allocator, a pluggable "
            "allocator) that legacy CUDA IPC cannot share; export weights allocated by "
            "torch's caching allocator"
        ) from None


def _cuda_allocator() -> str:
    """``expandable_segments`` where torch's caching allocator maps memory with the
    virtual-memory API (opened through ``pidfd_getfd`` on the producer, which needs
    ptrace permission over it), else ``native``."""
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        conf = os.environ.get(var, "").replace(" ", "").lower()
        if "expandable_segments:true" in conf:
            return "expandable_segments"
    return "native"


def _producer_metadata() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "format": FORMAT,
        "producer_pid": pid,
        "producer_start": _process_start(pid),
        "created": time.time(),
        "torch_version": str(torch.__version__),
    }


def _check_plain(key: str, value: Any) -> None:
    plain = (str, int, float, bool, type(None))
    ok = isinstance(value, plain) or (
        isinstance(value, list | tuple) and all(isinstance(x, plain) for x in value)
    )
    if not isinstance(key, str) or not ok:
        raise HandlesError(f"metadata {key!r}: only str/int/float/bool/None (or lists of them)")


def _share_cpu(name: str, t: torch.Tensor) -> dict[str, Any]:
    if not t.is_contiguous():
        raise HandlesError(f"{name}: a non-contiguous CPU tensor cannot be exported in place")
    storage = t.untyped_storage()
    record = {
        "name": "",
        "size": 0,
        "offset": 0,
        "dtype": st_dtype(t.dtype),
        "shape": list(t.shape),
    }
    if t.nbytes == 0:
        return record
    _manager, handle, size = storage._share_filename_cpu_()  # in place, like share_memory_()
    shm_name = handle.decode().lstrip("/")
    # torch's shared segments may start with a small reference-count header before
    # the storage bytes: locate the storage by the file's size, and prove it.
    head = os.stat(_SHM_DIR / shm_name).st_size - int(size)
    offset = head + int(t.storage_offset()) * t.element_size()
    probe = t.reshape(-1)[: max(1, 64 // t.element_size())].view(torch.uint8).numpy().tobytes()
    fd = os.open(_SHM_DIR / shm_name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        found = os.pread(fd, len(probe), offset)
    finally:
        os.close(fd)
    if head < 0 or found != probe:
        raise HandlesError(
            f"{name}: cannot locate the tensor's bytes in its shared memory segment "
            f"(unexpected layout in torch {torch.__version__})"
        )
    record |= {"name": shm_name, "size": head + int(size), "offset": offset}
    return record


def _gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def _write_atomic(target: Path, obj: Any) -> None:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ---------------------------------------------------------------------------
# Load (the sync side)
# ---------------------------------------------------------------------------


def load_handles(path: str | os.PathLike[str] | None = None) -> Handles:
    """Opens the live tensors a handles file describes (see the module docs)."""
    src = Path(path) if path is not None else default_handles_path()
    raw, mtime = _read_checked(src)
    try:
        obj = _unpickle(raw)
    except pickle.UnpicklingError as e:
        raise UnsafeHandlesError(f"{src}: refused to unpickle: {e}") from None
    except Exception as e:  # anything else: not a handles archive at all
        raise HandlesError(f"{src}: not a handles file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise HandlesError(f"{src}: expected a dict of handles, found {type(obj).__name__}")
    meta = obj.pop(METADATA_KEY, None) or {}
    if not isinstance(meta, dict):
        raise HandlesError(f"{src}: {METADATA_KEY} is not a dict")
    _check_producer(src, meta, mtime)
    entries = {name: _entry(src, name, entry) for name, entry in obj.items()}  # all checked first
    handles = Handles(tensors={}, metadata=meta, path=src)
    device = _local_device(meta) if any("handle" in e for e in entries.values()) else None
    try:
        for name, entry in entries.items():
            handles.tensors[name] = _open_entry(src, name, entry, device, handles)
    except BaseException:
        handles.close()
        raise
    return handles


def _entry(src: Path, name: Any, entry: Any) -> dict[str, Any]:
    if not isinstance(name, str) or not isinstance(entry, dict):
        raise HandlesError(f"{src}: entry {name!r} is not a name -> dict pair")
    if ("handle" in entry) == ("shm" in entry):
        raise HandlesError(f"{src}: entry {name!r} needs exactly one of 'handle' or 'shm'")
    handle = entry.get("handle")
    if "handle" in entry and (
        not isinstance(handle, tuple)
        or len(handle) != 2
        or handle[0] is not _REBUILD
        or not isinstance(handle[1], tuple)
        or len(handle[1]) != _CUDA_ARGS
    ):
        raise UnsafeHandlesError(f"{src}: {name!r} is not a (rebuild_cuda_tensor, args) handle")
    return entry


def _read_checked(src: Path) -> tuple[bytes, float]:
    """The file's bytes and mtime, after the ownership and permission checks."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise HandlesError(
            f"{src}: no handles file. Is the producer running and exporting handles "
            f"(apollo_sync.export_handles)?"
        ) from None
    except OSError as e:
        if e.errno == 40:  # ELOOP: the last component is a symlink
            raise UnsafeHandlesError(f"{src}: is a symbolic link; refusing to follow it") from None
        raise HandlesError(f"{src}: cannot open: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeHandlesError(f"{src}: not a regular file")
        me = os.geteuid()
        if st.st_uid != me:
            raise UnsafeHandlesError(
                f"{src}: owned by uid {st.st_uid}, not by you (uid {me}); refusing to load it"
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeHandlesError(
                f"{src}: writable by group or others (mode {stat.filemode(st.st_mode)}); "
                "chmod 600 it or re-export"
            )
        _check_parent(src.parent, me)
        return f.read(), st.st_mtime


def _check_parent(parent: Path, me: int) -> None:
    st = os.stat(parent)
    if st.st_uid not in (me, 0):
        raise UnsafeHandlesError(f"{parent}: directory owned by uid {st.st_uid}; refusing")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise UnsafeHandlesError(
            f"{parent}: anyone can write to this directory and replace the file; refusing"
        )


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None where unknown, or
    where the process has exited and only its zombie is left to be reaped)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat_line.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X", "x"):
        return None
    return int(fields[19])


def _check_producer(src: Path, meta: Mapping[str, Any], mtime: float | None = None) -> None:
    """Refuses handles whose producer has exited or restarted: its pid is gone, the
    process with that pid started at another time than the recorded one, or the
    file was written before that process started (``mtime``, where given)."""
    pid = meta.get("producer_pid")
    if not isinstance(pid, int):
        return  # a seeds-format file: nothing to check against
    start = _process_start(pid)
    if start is None:
        raise ProducerGoneError(f"{src}: the producer (pid {pid}) has exited; re-export handles")
    recorded = meta.get("producer_start")
    if recorded is not None and recorded != start:
        raise ProducerGoneError(
            f"{src}: pid {pid} is a different process than the one that wrote these handles "
            "(the producer restarted); re-export handles"
        )
    started = _start_epoch(start)
    if mtime is not None and started is not None and mtime < started - _START_SLACK_S:
        raise ProducerGoneError(
            f"{src}: written {started - mtime:.0f} s before the producer (pid {pid}) started: "
            "the producer restarted since; re-export handles"
        )


@dataclass(frozen=True)
class ProducerState:
    """Whether the process behind a handles file is running (read without
    opening any tensor)."""

    path: Path
    #: True: running; False: exited or restarted since it exported (or no
    #: handles file); None: the file names no producer pid (the seeds' format)
    #: or cannot be read.
    alive: bool | None
    #: Why, in words.
    detail: str
    metadata: dict[str, Any] = field(default_factory=dict)


def producer_state(path: str | os.PathLike[str] | None = None) -> ProducerState:
    """Reads a handles file's metadata with the checks :func:`load_handles` makes
    (owner, mode, the restricted unpickler) and tells whether its producer runs."""
    src = Path(path) if path is not None else default_handles_path()
    if not os.path.lexists(src):
        return ProducerState(src, False, f"{src}: no handles file (no producer exporting)")
    try:
        raw, mtime = _read_checked(src)
    except HandlesError as e:  # unsafe, or unreadable: say so, do not guess
        return ProducerState(src, None, str(e))
    try:
        obj = _unpickle(raw)
    except Exception as e:
        return ProducerState(src, None, f"{src}: not a handles file ({type(e).__name__}: {e})")
    meta = obj.get(METADATA_KEY) if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return ProducerState(src, None, f"{src}: no metadata")
    pid = meta.get("producer_pid")
    if not isinstance(pid, int):
        return ProducerState(src, None, "the handles name no producer pid", meta)
    try:
        _check_producer(src, meta, mtime)
    except ProducerGoneError as e:
        return ProducerState(src, False, str(e), meta)
    return ProducerState(src, True, f"pid {pid} running", meta)


def check_producer_alive(handles: Handles) -> None:
    """Raises :class:`ProducerGoneError` once the process that exported ``handles``
    has exited (or its pid was reused): its memory must not be read any more."""
    _check_producer(handles.path, handles.metadata)


#: /proc gives the boot time in whole seconds: a file is older than its producer
#: only when its mtime precedes the producer's start by more than this.
_START_SLACK_S = 1.0


def _start_epoch(ticks: int) -> float | None:
    """A process start time (clock ticks since boot) as seconds since the epoch."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return int(line.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    return None


def _local_device(meta: Mapping[str, Any]) -> int | None:
    """The local CUDA device whose UUID the producer recorded (None: keep the index)."""
    uuid = meta.get("gpu_uuid")
    if not torch.cuda.is_available():
        raise HandlesError(
            "the handles are CUDA IPC handles but no CUDA device is visible here "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})"
        )
    if uuid is None:
        return None
    visible = [
        str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())
    ]
    return device_for_uuid(str(uuid), visible)


def device_for_uuid(uuid: str, visible: list[str]) -> int:
    """The index, among the ``visible`` devices' UUIDs (this process's numbering), of
    the GPU with ``uuid``: CUDA_VISIBLE_DEVICES may number GPUs differently in the
    producer and here, so a handle's device index cannot be trusted."""
    want = uuid.lower().removeprefix("gpu-")
    for i, u in enumerate(visible):
        if u.lower().removeprefix("gpu-") == want:
            return i
    raise HandlesError(
        f"the producer's GPU {uuid} is not visible here (visible: {', '.join(visible) or 'none'}; "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})"
    )


def _open_entry(
    src: Path, name: str, entry: dict[str, Any], device: int | None, handles: Handles
) -> LiveTensor:
    if "shm" in entry:
        return _open_shm(src, name, entry["shm"], handles)
    args = list(entry["handle"][1])
    if device is not None:
        args[6] = device  # storage_device: the producer's GPU by UUID, not by index
    try:
        tensor = rebuild_cuda_tensor(*args)
    except RuntimeError as e:
        raise HandlesError(
            f"{src}: cannot open CUDA handle of {name!r}: {str(e).split(chr(10), 1)[0]}"
            + _open_hint(handles.metadata)
        ) from None
    return from_torch(name, tensor)


def _open_hint(meta: Mapping[str, Any]) -> str:
    if meta.get("cuda_allocator") == "expandable_segments":
        return (
            " (the producer runs with expandable_segments: torch opens such memory through "
            "pidfd_getfd on the producer, which needs the producer alive and ptrace permission "
            "over it (same user, kernel.yama.ptrace_scope); or start the producer with "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False)"
        )
    return (
        " (the producer may have exited, or its memory came from a virtual-memory allocator "
        "such as expandable_segments or vLLM's sleep mode, where legacy CUDA IPC cannot open it)"
    )


def _open_shm(src: Path, name: str, rec: Any, handles: Handles) -> LiveTensor:
    keys = {"name", "size", "offset", "dtype", "shape"}
    if (
        not isinstance(rec, dict)
        or set(rec) != keys
        or not isinstance(rec["name"], str)
        or not isinstance(rec["dtype"], str)
        or not isinstance(rec["shape"], list)
        or not all(
            isinstance(x, int) and x >= 0 for x in [*rec["shape"], rec["size"], rec["offset"]]
        )
    ):
        raise HandlesError(f"{src}: {name!r}: malformed shared-memory record")
    try:
        width = itemsize(rec["dtype"])
    except TypeError as e:
        raise HandlesError(f"{src}: {name!r}: {e}") from None
    shape = tuple(rec["shape"])
    nbytes = int(np.prod(shape, dtype=np.int64)) * width
    offset, size = rec["offset"], rec["size"]
    if nbytes == 0:
        return LiveTensor(name, str(rec["dtype"]), shape, np.zeros(0, dtype=np.uint8))
    shm_name = str(rec["name"]).lstrip("/")
    if not shm_name or "/" in shm_name or offset < 0 or offset + nbytes > size:
        raise HandlesError(f"{src}: {name!r}: shared-memory record out of range")
    mapped = handles._maps.get(shm_name)
    if mapped is None:
        mapped = handles._maps[shm_name] = _map_shm(src, name, shm_name, size, handles)
    source, f = mapped
    if len(source) < size:
        raise HandlesError(f"{src}: {name!r}: shared-memory sizes disagree between entries")
    return LiveTensor(name, str(rec["dtype"]), shape, source, offset, file=(f, 0))


def _map_shm(
    src: Path, name: str, shm_name: str, size: int, handles: Handles
) -> tuple[Any, OpenFile]:
    """A read-only mapping of the segment (for in-place reads) and its open fd
    (for the core's ``pread``); the fd is closed with the handles."""

    try:
        fd = os.open(_SHM_DIR / shm_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProducerGoneError(
            f"{src}: shared memory of {name!r} is gone: the producer exited or freed the tensor"
        ) from None
    try:
        if os.fstat(fd).st_size < size:
            raise HandlesError(f"{src}: {name!r}: shared memory is smaller than recorded")
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise
    handles._keepalive.append(mm)
    return np.frombuffer(mm, dtype=np.uint8), OpenFile(fd)
