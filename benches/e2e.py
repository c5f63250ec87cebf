"""End-to-end benchmark: apollo_sync against the seed script, a full rewrite and the
machine's own limits, on one synthetic checkpoint, in one run.

What it measures (all on the same data, files page-cached and already flushed):

* the machine's limits: page-cache read of the shards, ``memcmp`` of the live bytes
  against file bytes already in memory, and the combined single pass "read each
  file chunk into a buffer and ``memcmp`` it with the live chunk" (1 thread and one
  thread per core; the GIL is released by ``preadv`` and by ``memcmp`` via ctypes),
  and the same pass comparing against a read-only mapping of the file instead, or
  first reading the live chunk too (from its ``/dev/shm`` file: what a consumer
  that does not hold the live bytes, a fresh process or the seed, must also do);
* ``apollo_sync.sync`` in a child process, the live bytes another process's shared
  memory read with ``pread`` (a fresh consumer) or already mapped and faulted in
  (``prefault``: a training loop's own tensors, or ``apollo-sync watch``): wall time
  of the call, bytes changed / written, device bytes (``ru_oublock``) and the block
  device's own counter ("disk"), peak anonymous memory (``RssAnon`` sampled by the
  parent); with the XOR-delta log (the default) and without it (``journal=False``),
  to measure what crash safety costs, and with ``O_DIRECT`` writes instead of
  page-cache ones (``direct_io=True``); each as the first sync into freshly cached
  files and as the *next* sync (another 0.5% of blocks changed after a first sync,
  into the files and cache that sync left: a sync in a loop of training steps);
* the seed script (``/work/shared/seeds/checkpoint_sync.py``), given a handles file
  whose handles map the same live files with ``torch.from_file``: the call timed
  in a child that imports it, and the CLI's wall time as a subprocess;
* a full rewrite: ``safetensors.torch.save_file`` of every shard plus ``fsync``.

The model: HF-named tensors of a small Llama-like stack, ``--size-gb`` in all, in four
shards with an index. The live tensors: one file per tensor under ``/dev/shm``, equal
to the file bytes except one perturbed element in ``--fraction`` of the 4 KiB blocks
of the files' tensor data. Before each contender the shards are restored from
pristine copies, ``os.sync()``-ed, dropped from the page cache and read back (as a
process that loaded the model leaves them cached), and flushed again.

Usage: ``python3 benches/e2e.py [--size-gb 1.0] [--dtype fp16|bf16|fp32]
[--fraction 0.005] [--repeat N] [--out FILE.json] [--only 'apollo (prefault);seed (call)']``
(``--repeat``: each contender N times, the median in the table, every time in the JSON).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import mmap
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

#: The seed script lives in ``shared/seeds`` beside the checkout (override: $APOLLO_SYNC_SEED).
SEED_SCRIPT = Path(
    os.environ.get(
        "APOLLO_SYNC_SEED",
        Path(__file__).resolve().parents[2] / "shared" / "seeds" / "checkpoint_sync.py",
    )
)
BLOCK = 4096
N_SHARDS = 4
CHUNK = 8 << 20
#: The reads of the fresh-consumer limit pass: the core's (``READ_BYTES``).
FRESH_READ = 256 << 10
DTYPES = {"fp16": ("F16", 2), "bf16": ("BF16", 2), "fp32": ("F32", 4)}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memcmp.restype = ctypes.c_int


def memcmp(a: np.ndarray, b: np.ndarray) -> bool:
    """True if two equal-length uint8 arrays hold the same bytes (libc memcmp, no GIL)."""
    assert a.nbytes == b.nbytes
    return _libc.memcmp(a.ctypes.data, b.ctypes.data, a.nbytes) == 0


# ---------------------------------------------------------------------------
# The synthetic checkpoint
# ---------------------------------------------------------------------------


def layer_shapes(hidden: int, inter: int, kv: int) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of one decoder layer (HF names the seed passes through unchanged)."""
    return [
        ("input_layernorm.weight", (hidden,)),
        ("self_attn.q_proj.weight", (hidden, hidden)),
        ("self_attn.k_proj.weight", (kv, hidden)),
        ("self_attn.v_proj.weight", (kv, hidden)),
        ("self_attn.o_proj.weight", (hidden, hidden)),
        ("post_attention_layernorm.weight", (hidden,)),
        ("mlp.gate_proj.weight", (inter, hidden)),
        ("mlp.up_proj.weight", (inter, hidden)),
        ("mlp.down_proj.weight", (hidden, inter)),
    ]


def model_layout(size_bytes: int, itemsize: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes adding up to about ``size_bytes``."""
    hidden, inter, kv, vocab = 2048, 5632, 512, 32000
    per_layer = sum(np.prod(s) for _, s in layer_shapes(hidden, inter, kv)) * itemsize
    fixed = (2 * vocab * hidden + hidden) * itemsize
    n_layers = max(1, round((size_bytes - fixed) / per_layer))
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(n_layers):
        out += [(f"model.layers.{i}.{n}", s) for n, s in layer_shapes(hidden, inter, kv)]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def header_of(path: Path) -> tuple[int, dict[str, Any]]:
    """(data_start, header) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def build_model(model_dir: Path, shm_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Writes the shards and index, and one live file per tensor under ``shm_dir``."""
    import torch
    from safetensors.torch import save_file

    st_dtype, itemsize = DTYPES[args.dtype]
    tdtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    layout = model_layout(int(args.size_gb * 1e9), itemsize)
    total = sum(int(np.prod(s)) * itemsize for _, s in layout)
    per_shard = total / N_SHARDS
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    acc = 0
    for name, shape in layout:
        n = int(np.prod(shape)) * itemsize
        if acc >= per_shard * len(groups) and len(groups) < N_SHARDS:
            groups.append([])
        groups[-1].append((name, shape))
        acc += n
    gen = torch.Generator().manual_seed(1234)
    weight_map: dict[str, str] = {}
    tensors: list[dict[str, Any]] = []
    shards: list[str] = []
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shards.append(fname)
        state = {
            name: (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(tdtype)
            for name, shape in group
        }
        save_file(state, str(model_dir / fname), metadata={"format": "pt"})
        for name, t in state.items():
            weight_map[name] = fname
            shm_path = shm_dir / f"{name}.bin"
            t.view(torch.uint8).numpy().tofile(shm_path)
            tensors.append(
                {
                    "name": name,
                    "dtype": st_dtype,
                    "shape": list(t.shape),
                    "numel": t.numel(),
                    "shm": str(shm_path),
                    "file": fname,
                }
            )
        del state
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"tensors": tensors, "shards": shards, "total_bytes": total, "itemsize": itemsize}


def perturb(model_dir: Path, info: dict[str, Any], fraction: float, seed: int) -> dict[str, int]:
    """Changes one element in ``fraction`` of the 4 KiB blocks of the tensor data, in the
    live (shm) copies. Returns the number of blocks changed and their bytes."""
    itemsize = info["itemsize"]
    by_name = {t["name"]: t for t in info["tensors"]}
    rng = random.Random(seed)
    blocks_changed = 0
    for fname in info["shards"]:
        path = model_dir / fname
        data_start, header = header_of(path)
        file_len = path.stat().st_size
        # Every tensor's absolute byte range, in file order.
        spans = sorted(
            (data_start + v["data_offsets"][0], data_start + v["data_offsets"][1], k)
            for k, v in header.items()
            if k != "__metadata__"
        )
        first, last = data_start // BLOCK, (file_len - 1) // BLOCK
        n_blocks = last - first + 1
        chosen = sorted(rng.sample(range(first, last + 1), round(n_blocks * fraction)))
        maps: dict[str, tuple[Any, np.ndarray]] = {}
        j = 0
        for b in chosen:
            lo, hi = max(b * BLOCK, data_start), min((b + 1) * BLOCK, file_len)
            while spans[j][1] <= lo:
                j += 1
            # An element wholly inside this block, in the tensor that covers its start.
            start, end, name = spans[j]
            first_el = start + -(-(lo - start) // itemsize) * itemsize
            last_el = min(hi, end) - itemsize
            if last_el < first_el:
                continue  # a block too small to hold an element (does not happen here)
            at = first_el + rng.randrange((last_el - first_el) // itemsize + 1) * itemsize
            if name not in maps:
                with open(by_name[name]["shm"], "r+b") as f:
                    mm = mmap.mmap(f.fileno(), 0)
                maps[name] = (mm, np.frombuffer(mm, dtype=np.uint8))
            arr = maps[name][1]
            # Flip the lowest mantissa bit of the element (little endian): a tiny,
            # finite change whatever the dtype.
            arr[at - start] ^= 1
            blocks_changed += 1
        maps.clear()  # the mappings close when their arrays go (shm writes are visible)
    return {"blocks": blocks_changed, "bytes": blocks_changed * BLOCK}


# ---------------------------------------------------------------------------
# Restoring and warming
# ---------------------------------------------------------------------------


def read_all(paths: list[Path], threads: int = 1) -> float:
    """Reads the files with large reads; returns bytes/s."""
    total = sum(p.stat().st_size for p in paths)

    def read_one(path: Path) -> None:
        buf = np.empty(CHUNK, dtype=np.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            off = 0
            while n := os.preadv(fd, [buf], off):
                off += n
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read_one, paths))
    return total / (time.perf_counter() - t0)


def restore(model_dir: Path, pristine: Path, shards: list[str]) -> None:
    """Puts back the pristine shards, flushes them, and page-caches them as reading
    them from disk does (a serving process loading the model): the copy's own
    cached pages are dropped first, so every contender starts from the same cache,
    whatever the copy left there."""
    for f in shards:
        shutil.copyfile(pristine / f, model_dir / f)
    # the files were replaced behind apollo_sync's back: its generations no longer apply
    shutil.rmtree(model_dir / ".apollo_sync", ignore_errors=True)
    os.sync()
    drop_cache([model_dir / f for f in shards])
    read_all([model_dir / f for f in shards])
    os.sync()


def drop_cache(paths: list[Path]) -> None:
    """Drops the (clean, flushed) files from the page cache, so reading them next
    caches them as reading from disk does: readahead's large folios."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------
# Machine limits
# ---------------------------------------------------------------------------


def _live_map(info: dict[str, Any]) -> dict[str, tuple[Any, np.ndarray]]:
    out = {}
    for t in info["tensors"]:
        with open(t["shm"], "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        out[t["name"]] = (mm, np.frombuffer(mm, dtype=np.uint8))
    return out


def _tensor_spans(model_dir: Path, info: dict[str, Any]) -> list[tuple[Path, int, str, int]]:
    """(shard path, absolute file offset, tensor name, bytes) of every tensor."""
    out = []
    for fname in info["shards"]:
        data_start, header = header_of(model_dir / fname)
        for name, v in header.items():
            if name == "__metadata__":
                continue
            s, e = v["data_offsets"]
            out.append((model_dir / fname, data_start + s, name, e - s))
    return out


def _pieces(model_dir: Path, info: dict[str, Any], live: dict[str, Any]) -> list[tuple]:
    """(path, file offset, live array slice) chunks of at most CHUNK bytes, all shards."""
    return [
        (path, off + o, live[name][1][o : min(o + CHUNK, n)])
        for path, off, name, n in _tensor_spans(model_dir, info)
        for o in range(0, n, CHUNK)
    ]


def _timed_pass(fn: Any, pieces: list[tuple], threads: int, total: int) -> float:
    """GB/s of one pass of ``fn`` (True: the piece compared equal) over ``pieces`` on
    ``threads`` threads, after a short warm-up pass (threads, buffers)."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, pieces[: 4 * threads]))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        same = sum(pool.map(fn, pieces))
    gbps = total / (time.perf_counter() - t0) / 1e9
    if same != len(pieces):
        raise RuntimeError(f"limits: {len(pieces) - same} chunks differ (expected none)")
    return gbps


def limits(model_dir: Path, info: dict[str, Any], threads: int) -> dict[str, float]:
    """GB/s of page-cache reads, memcmp, and the combined read + compare pass."""
    paths = [model_dir / f for f in info["shards"]]
    total = info["total_bytes"]
    live = _live_map(info)
    pieces = _pieces(model_dir, info, live)
    for _, _, a in pieces:  # fault the live mappings in, outside the timings
        memcmp(a, a)
    out: dict[str, float] = {}
    for k in sorted({1, threads}):
        read_all(paths, k)
        out[f"read_gbps_{k}t"] = read_all(paths, k) / 1e9

    # memcmp against file bytes already in (anonymous) memory, shard by shard.
    by_path: dict[Path, list[tuple[int, np.ndarray]]] = {}
    for path, off, arr in pieces:
        by_path.setdefault(path, []).append((off, arr))

    def cmp_in_memory(disk: np.ndarray, items: list[tuple[int, np.ndarray]], k: int) -> int:
        with ThreadPoolExecutor(k) as pool:
            return sum(
                pool.map(lambda it: memcmp(it[1], disk[it[0] : it[0] + it[1].nbytes]), items)
            )

    for k in sorted({1, threads}):
        secs, same = 0.0, 0
        for path, items in by_path.items():
            disk = np.fromfile(path, dtype=np.uint8)
            t0 = time.perf_counter()
            same += cmp_in_memory(disk, items, k)
            secs += time.perf_counter() - t0
        out[f"memcmp_gbps_{k}t"] = total / secs / 1e9
        if same != len(pieces):
            raise RuntimeError(f"limits: {len(pieces) - same} chunks differ (expected none)")

    # Single pass: read each chunk into a buffer and compare it with the live chunk.
    local = threading.local()
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}

    def read_cmp(piece: tuple) -> bool:
        path, off, arr = piece
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.empty(CHUNK, dtype=np.uint8)
        view = buf[: arr.nbytes]
        os.preadv(fds[path], [view], off)
        return memcmp(view, arr)

    for k in sorted({1, threads}):
        out[f"read_cmp_gbps_{k}t"] = _timed_pass(read_cmp, pieces, k, total)

    # A consumer that does not hold the live bytes (a fresh process, the seed) must
    # also read them: the same pass with each live chunk read (pread) from its
    # /dev/shm file into a second buffer first.
    shm = {t["name"]: t["shm"] for t in info["tensors"]}
    live_fds = {name: os.open(path, os.O_RDONLY) for name, path in shm.items()}
    fresh = [
        (fds[path], off, live_fds[name], o, min(CHUNK, n - o))
        for path, off0, name, n in _tensor_spans(model_dir, info)
        for o in range(0, n, CHUNK)
        for off in [off0 + o]
    ]

    def read_read_cmp(piece: tuple) -> bool:
        # in the core's 256 KiB reads: two buffers the size of a whole piece would
        # be compared from memory, not from the cache the reads just filled
        fd, off, live_fd, live_off, n = piece
        bufs = getattr(local, "bufs", None)
        if bufs is None:
            bufs = local.bufs = (np.empty(FRESH_READ, np.uint8), np.empty(FRESH_READ, np.uint8))
        same = True
        for at in range(0, n, FRESH_READ):
            k = min(FRESH_READ, n - at)
            disk, live = bufs[0][:k], bufs[1][:k]
            os.preadv(fd, [disk], off + at)
            os.preadv(live_fd, [live], live_off + at)
            same &= memcmp(disk, live)
        return same

    for k in sorted({1, threads}):
        out[f"fresh_read_cmp_gbps_{k}t"] = _timed_pass(read_read_cmp, fresh, k, total)
    for fd in live_fds.values():
        os.close(fd)

    # Single pass without the copy: compare the live chunk with a fresh read-only
    # mapping of the page-cached file (its page-table setup inside the timing).
    for k in sorted({1, threads}):
        maps = {p: mmap.mmap(fd, 0, prot=mmap.PROT_READ) for p, fd in fds.items()}
        views = {p: np.frombuffer(m, dtype=np.uint8) for p, m in maps.items()}

        def map_cmp(piece: tuple, views: dict = views) -> bool:
            path, off, arr = piece
            return memcmp(views[path][off : off + arr.nbytes], arr)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(k) as pool:
            same = sum(pool.map(map_cmp, pieces))
        out[f"map_cmp_gbps_{k}t"] = total / (time.perf_counter() - t0) / 1e9
        del map_cmp, views, maps  # unmapped once the views are gone
        if same != len(pieces):
            raise RuntimeError(f"limits: {len(pieces) - same} chunks differ (expected none)")
    for fd in fds.values():
        os.close(fd)
    del pieces, by_path
    live.clear()
    return out


# ---------------------------------------------------------------------------
# Contenders (each in a child process)
# ---------------------------------------------------------------------------


def rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_child(argv: list[str], stdout_json: bool = False) -> dict[str, Any]:
    """Runs a child, samples its RssAnon, returns wall time, rusage and its JSON result
    (written to ``$E2E_RESULT``, or printed on stdout with ``stdout_json``)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tf:
        result_path = tf.name
    env = dict(os.environ, E2E_RESULT=result_path)
    out = open(result_path, "w") if stdout_json else None  # noqa: SIM115
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=out)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_anon_kb(proc.pid))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if out is not None:
        out.close()
    try:
        with open(result_path) as f:
            child = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        child = {}
    os.unlink(result_path)
    return {
        "returncode": proc.returncode,
        "wall_s": wall,
        "device_bytes": ru.ru_oublock * 512,
        "maxrss_kb": ru.ru_maxrss,
        "peak_rss_anon_kb_sampled": peak,
        "child": child,
    }


def _write_result(obj: dict[str, Any]) -> None:
    with open(os.environ["E2E_RESULT"], "w") as f:
        json.dump(obj, f)


def median_run(tries: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median time of several (the lower middle one of an even
    number), with every try's time beside it."""

    def secs(r: dict[str, Any]) -> float:
        return float(r["wall_s"] if key == "wall_s" else r["child"].get(key, float("inf")))

    ordered = sorted(tries, key=secs)
    mid = dict(ordered[(len(ordered) - 1) // 2])
    mid["tries_s"] = [secs(r) for r in tries]
    return mid


def sync_figures(r: Any, call_s: float) -> dict[str, Any]:
    """What every apollo_sync row records of a ``SyncResult`` timed at ``call_s``."""
    return {
        "call_s": call_s,
        "internal_s": r.seconds,
        "total_compared": r.total_compared,
        "total_changed": r.total_changed,
        "bytes_written": r.bytes_written,
        "bytes_written_device": r.bytes_written_device,
        "disk_bytes_written": r.disk_bytes_written,
        "fallbacks": [f.direct_io_fallback for f in r.files if f.direct_io_fallback],
        # where the time went (an older wheel's result has none)
        "stages": {k: round(v, 6) for k, v in getattr(r, "stages", {}).items()},
    }


def child_apollo(spec: dict[str, Any]) -> None:
    import apollo_sync
    from apollo_sync.live import LiveTensor, OpenFile

    # Prefaulted: the live mappings are populated before the clock starts, as a live
    # process's own tensors would be. Otherwise the live bytes are another process's
    # shared memory, opened as load_handles opens it: a mapping plus the open file,
    # which the core reads with pread instead of faulting the mapping in.
    populate = bool(spec.get("populate"))
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    tensors = {}
    for t in spec["tensors"]:
        fd = os.open(t["shm"], os.O_RDONLY)
        mm = mmap.mmap(fd, 0, flags=flags, prot=mmap.PROT_READ)
        src = np.frombuffer(mm, dtype=np.uint8)
        tensors[t["name"]] = LiveTensor(
            t["name"],
            t["dtype"],
            tuple(t["shape"]),
            src,
            0,
            file=None if populate else (OpenFile(fd), 0),
        )
    anon_before = rss_anon_kb(os.getpid())
    t0 = time.perf_counter()
    r = apollo_sync.sync(
        spec["model_dir"],
        tensors=tensors,
        block_size=BLOCK,
        journal=spec.get("journal", True),
        direct_io=spec.get("direct_io", False),
    )
    secs = time.perf_counter() - t0
    _write_result(
        {
            **sync_figures(r, secs),
            "rss_anon_kb_before": anon_before,
            "rss_anon_kb_after": rss_anon_kb(os.getpid()),
        }
    )


def child_seed(spec: dict[str, Any]) -> None:
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location("checkpoint_sync_seed", SEED_SCRIPT)
    seed = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(seed)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_oublock
    t0 = time.perf_counter()
    stats = seed.checkpoint_sync(spec["model_dir"], spec["handles"], BLOCK)
    secs = time.perf_counter() - t0
    dev = (resource.getrusage(resource.RUSAGE_SELF).ru_oublock - before) * 512
    _write_result({"call_s": secs, "device_bytes_call": dev, **stats})


def child_rewrite(spec: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file

    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_oublock
    t0 = time.perf_counter()
    by_file: dict[str, dict[str, Any]] = {}
    for t in spec["tensors"]:
        x = torch.from_file(t["shm"], False, t["numel"], dtype=dtypes[t["dtype"]])
        by_file.setdefault(t["file"], {})[t["name"]] = x.reshape(t["shape"])
    for fname, state in by_file.items():
        path = os.path.join(spec["model_dir"], fname)
        save_file(state, path, metadata={"format": "pt"})
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    secs = time.perf_counter() - t0
    dev = (resource.getrusage(resource.RUSAGE_SELF).ru_oublock - before) * 512
    _write_result({"call_s": secs, "device_bytes_call": dev})


def write_handles(info: dict[str, Any], path: Path, model_dir: Path) -> None:
    """A seeds-format handles file: each handle maps the tensor's live shm file."""
    import torch

    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    handles: dict[str, Any] = {"__metadata__": {"model_path": str(model_dir)}}
    for t in info["tensors"]:
        # torch.from_file takes dtype by keyword only: bind it, pass the rest positionally.
        func = functools.partial(torch.from_file, dtype=dtypes[t["dtype"]])
        handles[t["name"]] = {"handle": (func, (t["shm"], True, t["numel"]))}
    torch.save(handles, path)


def write_pieces(model_dir: Path, info: dict[str, Any], out: Path) -> None:
    """One line per tensor: shard path, offset of its bytes, live shm path, length."""
    shm = {t["name"]: t["shm"] for t in info["tensors"]}
    with open(out, "w") as f:
        for fname in info["shards"]:
            data_start, header = header_of(model_dir / fname)
            for name, v in header.items():
                if name != "__metadata__":
                    s, e = v["data_offsets"]
                    f.write(f"{model_dir / fname} {data_start + s} {shm[name]} {e - s}\n")


def verify(model_dir: Path, info: dict[str, Any]) -> int:
    """Number of tensors whose file bytes differ from the live bytes."""
    import torch
    from safetensors import safe_open

    by_file: dict[str, list[dict[str, Any]]] = {}
    for t in info["tensors"]:
        by_file.setdefault(t["file"], []).append(t)
    bad = 0
    for fname, ts in by_file.items():
        with safe_open(str(model_dir / fname), framework="pt") as f:
            for t in ts:
                disk = f.get_tensor(t["name"]).contiguous().view(torch.uint8).reshape(-1).numpy()
                live = np.fromfile(t["shm"], dtype=np.uint8)
                bad += not (disk.nbytes == live.nbytes and memcmp(disk, live))
    return bad


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="model size in GB (1e9 bytes)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--fraction", type=float, default=0.005, help="fraction of 4 KiB blocks")
    ap.add_argument("--out", type=Path, help="write every number as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the temp and shm dirs")
    ap.add_argument(
        "--pieces",
        type=Path,
        help="write each tensor's shard path, offset, live shm path and length here, "
        "for benches/probes/live_read.c (use with --keep)",
    )
    ap.add_argument("--_child", choices=["apollo", "seed", "rewrite"], help=argparse.SUPPRESS)
    ap.add_argument("--_spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_populate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_no_journal", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_direct", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each contender; the table shows the median (default 1)",
    )
    ap.add_argument(
        "--only",
        help="contenders to run, separated by ';' (default: all); "
        "apollo_sync and the limits always run",
    )
    args = ap.parse_args()
    if args._child:
        spec = json.loads(args._spec.read_text())
        spec["populate"] = args._populate
        spec["journal"] = not args._no_journal
        spec["direct_io"] = args._direct
        {"apollo": child_apollo, "seed": child_seed, "rewrite": child_rewrite}[args._child](spec)
        return 0

    threads = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="apollo_e2e_", dir="/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="apollo_e2e_", dir="/dev/shm"))
    model_dir, pristine = work / "model", work / "pristine"
    model_dir.mkdir()
    pristine.mkdir()
    try:
        t0 = time.perf_counter()
        info = build_model(model_dir, shm, args)
        for f in info["shards"]:
            shutil.copyfile(model_dir / f, pristine / f)
        # The limits first, while live == file: memcmp stops at the first difference,
        # and a limit must scan every byte (as the diff does).
        restore(model_dir, pristine, info["shards"])
        lim = limits(model_dir, info, threads)
        print("limits (GB/s): " + ", ".join(f"{k}={v:.2f}" for k, v in lim.items()), flush=True)
        limit = max(lim[f"read_cmp_gbps_{k}t"] for k in {1, threads})
        changed = perturb(model_dir, info, args.fraction, seed=42)
        total = info["total_bytes"]
        print(
            f"model: {len(info['tensors'])} tensors, {len(info['shards'])} shards, "
            f"{total / 1e9:.3f} GB {args.dtype}; {changed['blocks']} blocks changed "
            f"({changed['bytes'] / 1e6:.2f} MB); built in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        spec_path = work / "spec.json"
        handles_path = work / "handles.pt"
        write_handles(info, handles_path, model_dir)
        spec = {
            "model_dir": str(model_dir),
            "tensors": info["tensors"],
            "handles": str(handles_path),
        }
        spec_path.write_text(json.dumps(spec))
        if args.pieces:
            write_pieces(model_dir, info, args.pieces)
        me = [sys.executable, os.path.abspath(__file__), "--_spec", str(spec_path), "--_child"]

        runs: dict[str, dict[str, Any]] = {}
        seed_cli = [
            sys.executable,
            str(SEED_SCRIPT),
            "sync",
            "--model-dir",
            str(model_dir),
            "--handles",
            str(handles_path),
        ]
        apollo = [*me, "apollo"]
        prefault = [*apollo, "--_populate"]
        # (row, argv, next): a "next sync" row first syncs the standard change
        # (untimed), then changes another 0.5% of the live blocks and times the sync
        # of that change into the files the first one left (with O_DIRECT, evicted
        # from the cache around its writes): a sync in a loop of steps.
        contenders: list[tuple[str, list[str], bool]] = [
            ("apollo_sync", apollo, False),
            ("apollo (prefault)", prefault, False),
            ("apollo, next sync", apollo, True),
            ("prefault, next sync", prefault, True),
            ("apollo, no journal", [*apollo, "--_no_journal"], False),
            ("prefault, no journal", [*prefault, "--_no_journal"], False),
            ("apollo, direct", [*apollo, "--_direct"], False),
            ("prefault, direct", [*prefault, "--_direct"], False),
            ("apollo, direct, next", [*apollo, "--_direct"], True),
            ("prefault, direct, next", [*prefault, "--_direct"], True),
            ("seed (call)", [*me, "seed"], False),
            ("seed (CLI)", seed_cli, False),
            ("full rewrite", [*me, "rewrite"], False),
        ]
        for name, argv, nxt in contenders:
            if args.only and name not in args.only.split(";") and name != "apollo_sync":
                continue
            tries = []
            for _ in range(args.repeat):
                restore(model_dir, pristine, info["shards"])
                if nxt:
                    run_child(argv)
                    perturb(model_dir, info, args.fraction, seed=43)
                r = run_child(argv, stdout_json=argv is seed_cli)
                r["stale_tensors_after"] = verify(model_dir, info)
                if nxt:
                    perturb(model_dir, info, args.fraction, seed=43)  # back to the standard change
                tries.append(r)
            r = median_run(tries, "wall_s" if argv is seed_cli else "call_s")
            runs[name] = r
            print(
                f"{name}: rc={r['returncode']} wall={r['wall_s']:.2f}s "
                f"stale tensors after={r['stale_tensors_after']} {r['child']}",
                flush=True,
            )

        a = runs["apollo_sync"]["child"]
        rows = []
        for name, r in runs.items():
            c = r["child"]
            secs = r["wall_s"] if name == "seed (CLI)" else c.get("call_s", float("nan"))
            if "bytes_written" in c:  # the apollo_sync rows
                chg, wr, dev = c["total_changed"], c["bytes_written"], r["device_bytes"]
            elif name.startswith("seed"):
                chg = c.get("total_changed")
                wr, dev = chg, r["device_bytes"]
            else:
                chg, wr, dev = None, total, r["device_bytes"]
            rows.append(
                {
                    "contender": name,
                    "seconds": secs,
                    "gbps": total / secs / 1e9,
                    "bytes_changed": chg,
                    "bytes_written": wr,
                    "device_bytes": dev,
                    "disk_bytes": c.get("disk_bytes_written"),
                    "stale_tensors_after": r["stale_tensors_after"],
                }
            )
        seed_s = next((r["seconds"] for r in rows if r["contender"] == "seed (call)"), float("nan"))
        for row in rows:
            row["x_vs_seed"] = seed_s / row["seconds"]
            row["frac_of_limit"] = row["gbps"] / limit
        fresh_limit = max(lim[f"fresh_read_cmp_gbps_{k}t"] for k in {1, threads})
        for label, key in (
            ("limit: read+cmp", "read_cmp"),
            ("(mapped+cmp)", "map_cmp"),
            ("(fresh: +read live)", "fresh_read_cmp"),
        ):
            gbps = max(lim[f"{key}_gbps_{k}t"] for k in {1, threads})
            rows.append(
                {
                    "contender": label,
                    "seconds": total / gbps / 1e9,
                    "gbps": gbps,
                    "bytes_changed": None,
                    "bytes_written": None,
                    "device_bytes": None,
                    "disk_bytes": None,
                    "stale_tensors_after": None,
                    "x_vs_seed": seed_s / (total / gbps / 1e9),
                    "frac_of_limit": gbps / limit,
                }
            )

        hdr = (
            f"{'contender':<20} {'seconds':>8} {'GB/s':>6} {'changed':>10} {'written':>10} "
            f"{'device':>10} {'disk':>10} {'x seed':>7} {'/limit':>7} {'stale':>6}"
        )
        print()
        print(
            f"{total / 1e9:.2f} GB {args.dtype}, {args.fraction:.2%} of blocks changed "
            f"({changed['bytes'] / 1e6:.2f} MB), {threads} cores"
        )
        print(hdr)
        print("-" * len(hdr))
        for row in rows:
            stale = "-" if row["stale_tensors_after"] is None else row["stale_tensors_after"]
            print(
                f"{row['contender']:<20} {row['seconds']:>8.3f} {row['gbps']:>6.2f} "
                f"{fmt_bytes(row['bytes_changed']):>10} {fmt_bytes(row['bytes_written']):>10} "
                f"{fmt_bytes(row['device_bytes']):>10} {fmt_bytes(row['disk_bytes']):>10} "
                f"{row['x_vs_seed']:>7.2f} "
                f"{row['frac_of_limit']:>7.2f} {stale:>6}"
            )
        fresh_rows = [
            r
            for r in rows
            if r["contender"].startswith(("apollo", "seed")) and "prefault" not in r["contender"]
        ]
        print(
            "\nconsumers that do not hold the live bytes, against the fresh limit "
            f"({total / fresh_limit / 1e9:.3f} s): "
            + ", ".join(
                f"{r['contender']} {total / r['seconds'] / 1e9 / fresh_limit:.2f}"
                for r in fresh_rows
            )
        )
        ar = runs["apollo_sync"]
        print(
            f"\napollo_sync: internal seconds {a['internal_s']:.3f} (call {a['call_s']:.3f}, "
            f"process wall {ar['wall_s']:.2f}); device/changed "
            f"{ar['device_bytes'] / max(a['total_changed'], 1):.3f}; self-reported device "
            f"{fmt_bytes(a['bytes_written_device'])}; fallbacks {a['fallbacks'] or 'none'}"
        )
        print(
            f"apollo_sync RssAnon: before sync {a['rss_anon_kb_before'] / 1024:.0f} MiB, "
            f"after {a['rss_anon_kb_after'] / 1024:.0f} MiB, peak sampled "
            f"{ar['peak_rss_anon_kb_sampled'] / 1024:.0f} MiB (process VmHWM incl. shm "
            f"{ar['maxrss_kb'] / 1024:.0f} MiB)"
        )
        seed_changed = runs.get("seed (call)", {}).get("child", {}).get("total_changed")
        print(
            f"expected changed bytes {changed['bytes']}; apollo total_changed "
            f"{a['total_changed']}; seed total_changed {seed_changed}"
        )
        for name in ("seed (call)", "seed (CLI)"):
            if name not in runs:
                continue
            stale = runs[name]["stale_tensors_after"]
            if stale:
                print(
                    f"note: {name} left {stale} tensor(s) stale (total_changed "
                    f"{runs[name]['child'].get('total_changed')}): its x-seed ratios are moot"
                )
        if args.out:
            args.out.write_text(
                json.dumps(
                    {
                        "args": {k: str(v) for k, v in vars(args).items() if not k.startswith("_")},
                        "model": {
                            "total_bytes": total,
                            "tensors": len(info["tensors"]),
                            "shards": info["shards"],
                            "changed": changed,
                        },
                        "limits": lim,
                        "limit_gbps": limit,
                        "runs": runs,
                        "table": rows,
                    },
                    indent=2,
                )
            )
            print(f"wrote {args.out}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(shm, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
