"""Several hosts, one model directory: the consumers of a model served with
pipeline parallelism across hosts commit each generation together.

Each host runs one consumer for its own ranks (the complete tensor-parallel
ranks of the pipeline stages it holds) and writes only the shard files its
tensors lie in; two hosts never write the same file (a stage boundary inside a
shard is refused: :func:`apollo_sync.reshard.reshard` splits such shards).
Every host keeps a full namespace of its own, ``.apollo_sync/hosts/<h>/`` (lock,
``state.json``, logs, flush markers: :class:`apollo_sync.journal.Layout` with a
host), covering only its files; generation numbers move in lockstep. Host 0
keeps ``.apollo_sync/group.json``::

    {"format": 1, "hosts": H, "owners": {"<shard file>": h, ...}, "committed": N}

``committed`` is the group's commit point: the last generation every host had
made durable in its own log. A generation a host committed in its own log past
it was *prepared* but never committed by the group, and recovery rolls it back
through its records like uncommitted work.

One sync, on every host, over a gloo process group of its own (``tcp://``
rendezvous; never the application's default group):

1. exchange what each host writes: refused on all hosts, nothing written, when
   two hosts hold tensors of one file or the group file disagrees;
2. recover its namespace up to the group's ``committed`` C, then sync its part
   as generation N = C + 1 with the ordinary engine (records durable before
   any in-place write); exchange whether each succeeded and changed something
   (nothing changed anywhere: no generation);
3. *prepare*: its own commit record (a host that changed nothing commits N
   without a log), then exchange the votes;
4. all prepared: host 0 writes ``committed = N`` into the group file durably
   (the commit point) and broadcasts the outcome. Any host failed: nobody
   commits, and every host rolls its N back at once.

A host that loses its peers (a dead host, a timeout: gloo raises) before it
prepared, and host 0 before the group file was written, roll N back at once.
A host other than 0 that had voted cannot know whether host 0 committed: it
keeps its prepared N and raises; recovery, which follows the group file,
settles it (``apollo_sync.recover(dir)``, :func:`apollo_sync.reading`, or the
start of the next group sync). Either way, after recovery every shard holds
generation C or every shard holds N, and N exactly when the group file says so.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import os
import re
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from apollo_sync import journal as gens
from apollo_sync.errors import (
    ApolloSyncError,
    GroupError,
    JournalError,
    RefusedError,
    TornSyncError,
)
from apollo_sync.live import LiveTensor
from apollo_sync.model_dir import ModelDir
from apollo_sync.shards import check_shards

if TYPE_CHECKING:
    from apollo_sync.steps import StepCounter
    from apollo_sync.sync import SyncResult, _Options

GROUP_FORMAT = 1
#: Seconds a host waits for the others (rendezvous, each exchange), by default.
DEFAULT_TIMEOUT = 300.0
#: Seconds a host that lost the group waits for the others to say (in the
#: rendezvous store) that they are still there, to name the ones that are not.
LOST_WAIT_S = 3.0
_LAYER = re.compile(r"(?:^|\.)layers\.([0-9]+)\.")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# The process group
# ---------------------------------------------------------------------------


class Group:
    """This host's place in a group of consumers: ``rank`` of ``size``, meeting at
    ``init`` (``tcp://host:port``; host 0 listens there). Connected on first use
    and kept for the syncs that follow (a :func:`apollo_sync.watch`); after a
    failed exchange it is broken, and every host must start a new one."""

    def __init__(self, rank: int, size: int, init: str, timeout: float = DEFAULT_TIMEOUT):
        if size < 1 or not 0 <= rank < size:
            raise GroupError(f"group rank {rank} is not in 0..{size - 1} (group size {size})")
        m = re.fullmatch(r"tcp://(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>[0-9]+)/?", init)
        if m is None:
            raise GroupError(f"--group-init {init!r}: expected tcp://HOST:PORT (host 0's address)")
        self.rank, self.size, self.init, self.timeout = rank, size, init, timeout
        self._host, self._port = m["host"].strip("[]"), int(m["port"])
        self._pg: Any = None
        self._store: Any = None
        self._broken: str | None = None
        #: After a failed exchange: the hosts that did not answer (None: not known).
        self.lost: list[int] | None = None

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, size={self.size}, init={self.init!r})"

    @property
    def broken(self) -> bool:
        """Whether an exchange failed (the group cannot be used again)."""
        return self._broken is not None

    def connect(self) -> None:
        """Meets the other hosts (waits up to ``timeout`` for them); refuses a host
        started with another group size."""
        if self._broken is not None:
            raise GroupError(
                f"the group lost contact in an earlier sync ({self._broken}); start the "
                "consumers of every host again"
            )
        if self._pg is not None:
            return
        import torch.distributed as dist

        wait = datetime.timedelta(seconds=self.timeout)
        try:
            store: Any = dist.TCPStore(  # type: ignore[attr-defined]
                self._host,
                self._port,
                None,
                self.rank == 0,
                timeout=wait,
                wait_for_workers=False,
            )
            store = dist.PrefixStore("apollo_sync", store)  # type: ignore[attr-defined]
            store.set(f"size{self.rank}", str(self.size))
            for other in [0] if self.rank else range(1, self.size):
                theirs = int(store.get(f"size{other}").decode())
                if theirs != self.size:
                    raise GroupError(
                        f"host {other} was started with group size {theirs}, this host "
                        f"(rank {self.rank}) with {self.size}: every host needs the same "
                        "--group-size"
                    )
            self._pg = dist.ProcessGroupGloo(store, self.rank, self.size, wait)
            self._store = store
            # Left to the interpreter's teardown, gloo's threads abort the process
            # (std::terminate) when a peer closed its side first: close it before.
            atexit.register(_close_at_exit, weakref.ref(self))
        except GroupError:
            raise
        except (RuntimeError, OSError, ValueError) as e:
            raise GroupError(
                f"host {self.rank} of {self.size} could not meet the group at {self.init} "
                f"within {self.timeout:g} s: {e}"
            ) from e

    def exchange(self, obj: Any) -> list[Any]:
        """Every host's ``obj`` (JSON-able), by rank."""
        self.connect()
        data = json.dumps(obj).encode()
        try:
            n = torch.tensor([len(data)], dtype=torch.int64)
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
            self._pg.allgather([sizes], [n]).wait()
            width = max(int(s.item()) for s in sizes)
            buf = torch.zeros(width, dtype=torch.uint8)
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            outs = [torch.zeros(width, dtype=torch.uint8) for _ in range(self.size)]
            self._pg.allgather([outs], [buf]).wait()
        except RuntimeError as e:  # a peer died, or timed out (gloo's DistError)
            self._broken = str(e).splitlines()[0][:200]
            self.lost = self._silent()
            if self.lost is None:
                who = "every other host still answers the rendezvous store"
            elif self.lost == [0] and self.rank != 0 and self._store is None:
                who = "host 0 is gone (its rendezvous store does not answer)"
            else:
                hosts = ", ".join(map(str, self.lost))
                who = f"host {hosts} did not answer (exited, killed, or stuck)"
            raise GroupError(
                f"host {self.rank}: lost contact with the group: {who} ({self._broken})"
            ) from e
        return [
            json.loads(bytes(o[: int(s.item())].numpy()).decode())
            for o, s in zip(outs, sizes, strict=True)
        ]

    def _silent(self) -> list[int] | None:
        """The hosts gone silent, once an exchange failed: each host that sees the
        failure marks itself in the store (kept by host 0), and the others are
        named after :data:`LOST_WAIT_S`. None when every host marked itself."""
        store = self._store
        try:
            store.set(f"lost{self.rank}", "1")
            deadline = time.monotonic() + min(LOST_WAIT_S, self.timeout)
            while True:
                silent = [
                    h for h in range(self.size) if h != self.rank and not store.check([f"lost{h}"])
                ]
                if not silent or time.monotonic() >= deadline:
                    return silent or None
                time.sleep(0.05)
        except RuntimeError:  # the store is in host 0's process: it is gone
            self._store = None
            return [0]

    def close(self) -> None:
        self._pg = self._store = None


def _close_at_exit(ref: weakref.ref[Group]) -> None:
    group = ref()
    if group is not None:
        group.close()


# ---------------------------------------------------------------------------
# The group file
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupFile:
    """``.apollo_sync/group.json``: the hosts, the shard files each one owns, and
    the last generation the group committed."""

    hosts: int
    owners: dict[str, int]
    committed: int


def read_group(model_dir: str | os.PathLike[str]) -> GroupFile | None:
    """The group file of ``model_dir`` (None when it is not written by a group)."""
    path = gens.Layout(model_dir).group_path
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise JournalError(f"{path}: unreadable group file: {e}") from e
    try:
        if raw["format"] != GROUP_FORMAT:
            raise ValueError(f"format {raw['format']}")
        owners = {str(k): int(v) for k, v in raw["owners"].items()}
        return GroupFile(hosts=int(raw["hosts"]), owners=owners, committed=int(raw["committed"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise JournalError(f"{path}: not a format-{GROUP_FORMAT} group file ({e})") from e


def write_group(model_dir: str | os.PathLike[str], group: GroupFile) -> None:
    """Replaces the group file atomically and durably (temp file, fsync, rename,
    fsync of the directory): the group's commit point."""
    layout = gens.Layout(model_dir)
    layout.top.mkdir(mode=0o700, exist_ok=True)
    body = {
        "format": GROUP_FORMAT,
        "hosts": group.hosts,
        "owners": dict(sorted(group.owners.items())),
        "committed": group.committed,
        "time": time.time(),
    }
    tmp = layout.group_path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as f:
        f.write(json.dumps(body, indent=1).encode())
        f.flush()
        os.fsync(f.fileno())
    gens.fault_point("group-file")
    os.replace(tmp, layout.group_path)
    gens.fsync_dir(layout.top)


def single_history(model_dir: str | os.PathLike[str]) -> bool:
    """Whether ``model_dir`` has a history of single-host syncs."""
    layout = gens.Layout(model_dir)
    return layout.state_path.exists() or bool(layout.logs())


def refuse_single(model_dir: str | os.PathLike[str], what: str) -> None:
    """Refuses a single-host ``what`` on a directory a group writes."""
    g = read_group(model_dir)
    if g is not None:
        raise GroupError(
            f"{model_dir} is written by a group of {g.hosts} hosts "
            f"({gens.Layout(model_dir).group_path}): a single-host {what} would write "
            "without them; run one consumer per host with --group-rank/--group-size/--group-init"
        )


# ---------------------------------------------------------------------------
# Who writes what
# ---------------------------------------------------------------------------


def owned_files(md: ModelDir, shards: Sequence[int]) -> list[str]:
    return sorted({Path(md.headers[s].path).name for s in shards})


def layers_of(names: Sequence[str]) -> list[int]:
    return sorted({int(m[1]) for n in names if (m := _LAYER.search(n))})


def check_owners(model_dir: Path, infos: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """The file each host owns, from every host's ``files``; refuses a file that
    several hosts hold tensors of (with the re-split that fixes it)."""
    holders: dict[str, list[int]] = {}
    for h, info in enumerate(infos):
        for f in info["files"]:
            holders.setdefault(f, []).append(h)
    shared = {f: hs for f, hs in holders.items() if len(hs) > 1}
    if shared:
        lines = [f"  {f}: hosts {', '.join(map(str, hs))}" for f, hs in sorted(shared.items())]
        stages = ",".join(_span(info.get("layers", [])) for info in infos)
        raise RefusedError(
            f"{model_dir}: {len(shared)} shard file(s) hold tensors of several hosts, which "
            "cannot commit one file together (nothing was written):\n"
            + "\n".join(lines[:20])
            + "\nA pipeline stage boundary falls inside these shards. Split them at the "
            f"stage boundaries first: apollo-sync reshard --model-dir {model_dir} "
            f"--stages {stages} (then restart the engine on the new files)"
        )
    return {f: hs[0] for f, hs in holders.items()}


def _span(layers: Sequence[int]) -> str:
    return f"{min(layers)}-{max(layers)}" if layers else "none"


# ---------------------------------------------------------------------------
# One group sync
# ---------------------------------------------------------------------------


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _failed(votes: Sequence[Mapping[str, Any]]) -> list[str]:
    return [f"host {h}: {v['error']}" for h, v in enumerate(votes) if v.get("error")]


def sync_group(
    root: Path,
    live: Mapping[str, LiveTensor],
    options: _Options,
    group: Group,
    *,
    keep: int,
    undo_budget: int | None,
    lock_timeout: float,
    private_copy: bool,
    counter: StepCounter | None,
    step_retries: int,
    step: int | None = None,
    durable: bool,
    started: float,
) -> SyncResult:
    """One generation of ``root`` committed by every host of ``group`` together,
    or by none (see the module docs). This host writes its own ``live`` tensors."""
    from apollo_sync.sync import check_mapping

    me = group.rank
    # 1. who writes what: every host's answer, refused on every host alike
    error: BaseException | None = None
    files: list[str] = []
    mapping = None
    try:
        first = ModelDir.open(root)
        mapping = check_mapping(first, live, allow_unmatched=options.allow_unmatched)
        files = owned_files(first, [m.disk.shard for m in mapping.matches])
        if not private_copy:
            check_shards(first, False, files)
    except ApolloSyncError as e:
        error = e
    infos = group.exchange(
        {
            "files": files,
            "layers": layers_of([m.disk.name for m in mapping.matches] if mapping else []),
            "error": None if error is None else _why(error),
        }
    )
    if error is not None:
        raise error
    bad = _failed(infos)
    if bad:
        raise GroupError(f"{root}: another host refused, nothing was written: {'; '.join(bad)}")
    owners = check_owners(root, infos)
    if single_history(root):
        raise GroupError(
            f"{root} has a history of single-host syncs ({gens.Layout(root).meta}); a group "
            "keeps one namespace per host. Run `apollo-sync recover` on it, then remove "
            "its state.json and log/ (its rollback points are lost) to start a group history"
        )
    # host 0 creates the group file; every host checks it
    error = None
    if me == 0:
        try:
            if read_group(root) is None:
                write_group(root, GroupFile(hosts=group.size, owners=owners, committed=0))
        except (ApolloSyncError, OSError) as e:
            error = e
    bad = _failed(group.exchange({"error": None if error is None else _why(error)}))
    if bad:
        raise GroupError(f"{root}: could not create the group file: {'; '.join(bad)}")
    gf = read_group(root)
    assert gf is not None
    if gf.hosts != group.size:
        raise GroupError(
            f"{root}: its group file says {gf.hosts} host(s) write it, but this group has "
            f"{group.size} (--group-size); nothing was written"
        )
    if gf.owners != owners:
        moved = sorted(f for f in {*gf.owners, *owners} if gf.owners.get(f) != owners.get(f))
        raise GroupError(
            f"{root}: the hosts now hold other files than the group file records "
            f"({', '.join(moved[:10])}): each file keeps its host; nothing was written"
        )
    layout = gens.Layout(root, me)
    with gens.ModelLock(root, lock_timeout, host=me):
        return _commit_round(
            root,
            layout,
            live,
            options,
            group,
            gf,
            files,
            keep=keep,
            undo_budget=undo_budget,
            private_copy=private_copy,
            counter=counter,
            step_retries=step_retries,
            step=step,
            durable=durable,
            started=started,
        )


def _commit_round(
    root: Path,
    layout: gens.Layout,
    live: Mapping[str, LiveTensor],
    options: _Options,
    group: Group,
    gf: GroupFile,
    files: list[str],
    *,
    keep: int,
    undo_budget: int | None,
    private_copy: bool,
    counter: StepCounter | None,
    step_retries: int,
    step: int | None,
    durable: bool,
    started: float,
) -> SyncResult:
    # sync.py imports this module: its engine is imported here, when a group syncs
    from apollo_sync.sync import _run, _tensor_ranges, read_one_step

    me, committed = group.rank, gf.committed
    number = committed + 1
    # 2. recover to the group's generation, then write this host's part
    error: BaseException | None = None
    result: SyncResult | None = None
    writer = None
    recovered: gens.Recovered | None = None
    warnings: list[str] = []
    retries = 0
    before: int | None = None
    try:
        recovered, warnings = gens.recover_locked(layout, committed)
        md = check_shards(ModelDir.open(root), private_copy, files)
        result, writer, before, retries = read_one_step(
            root,
            layout,
            number,
            lambda: _run(md, live, options, (layout.log_path(number), number)),
            counter=counter,
            step=step,
            wait=group.timeout,
            step_retries=step_retries,
        )
    except BaseException as e:
        error = e
        note = gens.undo_uncommitted(layout, number)
        if note:
            e.add_note(note)
        if not isinstance(e, Exception):
            raise  # KeyboardInterrupt: the others see this host go
    changed = result is not None and result.total_changed > 0
    try:
        votes = group.exchange(
            {
                "error": None if error is None else _why(error),
                "torn": isinstance(error, TornSyncError),
                "changed": changed,
            }
        )
    except GroupError as e:
        _undo(layout, number, committed, e)  # not prepared: nobody can have committed
        raise
    if error is not None:
        raise error
    bad = _failed(votes)
    if bad:
        _undo(layout, number, committed, None)
        # only torn reads elsewhere: nothing is wrong but the timing; try again later
        kind = TornSyncError if all(v.get("torn") for v in votes if v["error"]) else GroupError
        raise kind(
            f"{root}: generation {number} was not committed (every host keeps generation "
            f"{committed}): {'; '.join(bad)}"
        )
    assert result is not None
    result = replace(
        result,
        recovered=[] if recovered is None else recovered.rolled_back,
        retries=retries,
        step=before,
        warnings=[*warnings, *result.warnings],
    )
    if not any(v["changed"] for v in votes):
        gens.undo_uncommitted(layout, number)  # nothing was written: drops the empty log
        gens.record_last_sync(layout, result, time.monotonic() - started)
        return result
    # 3. prepare: this host's own commit record (its part of N durable in its log)
    generation: gens.Generation | None = None
    try:
        if writer is not None:
            md = ModelDir.open(root)
            tensors = gens.tensor_elements(writer.runs(), writer.shards, _tensor_ranges(md))
            generation = gens.commit_logged(
                layout,
                writer,
                bytes_changed=result.total_changed,
                files=result.files_changed,
                tensors=tensors,
            )
        else:  # nothing changed here: N without a log, once N-1 is on disk
            failed = gens.wait_flushes(layout)
            if failed:
                raise JournalError(failed[0])
            gens.undo_uncommitted(layout, number)
            generation = gens.commit_unlogged(layout, number, bytes_changed=0, files=[])
        gens.fault_point("prepared")
        error = None
    except Exception as e:
        error = e
    try:
        votes = group.exchange({"error": None if error is None else _why(error)})
    except GroupError as e:
        if me == 0:  # the group file was not written: nobody committed
            _undo(layout, number, committed, e)
            raise
        raise _unknown(root, layout, number, committed, e) from e
    bad = _failed(votes)
    if bad:
        _undo(layout, number, committed, error)
        if error is not None:
            raise error
        raise GroupError(
            f"{root}: generation {number} was not committed (every host keeps generation "
            f"{committed}): {'; '.join(bad)}"
        )
    # 4. the group's commit point: host 0 writes it, and says so
    outcome = "committed"
    if me == 0:
        try:
            gens.fault_point("group-commit")
            write_group(root, replace(gf, committed=number))
            gens.fault_point("group-committed")
        except Exception as e:
            error = e
            outcome = "aborted" if (read_group(root) or gf).committed < number else "unknown"
    try:
        outcome = group.exchange(outcome if me == 0 else None)[0]
    except GroupError as e:
        if me != 0:
            gf_now = read_group(root)
            if gf_now is None or gf_now.committed < number:
                raise _unknown(root, layout, number, committed, e) from e
            outcome = "committed"
            result = replace(
                result, warnings=[*result.warnings, f"lost the group after its commit ({e})"]
            )
        elif outcome == "committed":
            result = replace(
                result, warnings=[*result.warnings, f"lost the group after its commit ({e})"]
            )
    if outcome == "aborted":
        _undo(layout, number, committed, error)
        if error is not None and me == 0:
            raise error
        raise GroupError(
            f"{root}: host 0 could not write the group commit of generation {number}; "
            f"every host keeps generation {committed}"
        )
    if outcome == "unknown":
        raise GroupError(
            f"{root}: whether generation {number} is committed is unknown (host 0 failed "
            "while writing the group file); run `apollo-sync recover` on every host's "
            "files before reading them"
        )
    # committed by the group
    from apollo_sync.sync import after_commit

    assert generation is not None
    budget = _budget(root, files) if undo_budget is None else undo_budget
    return after_commit(
        layout,
        result,
        generation,
        writer,
        durable=durable,
        keep=keep,
        budget=budget,
        started=started,
    )


def _budget(root: Path, files: Sequence[str]) -> int:
    size = sum((root / f).stat().st_size for f in files)
    return int(gens.DEFAULT_BUDGET_FRACTION * size)


def _undo(layout: gens.Layout, number: int, committed: int, error: BaseException | None) -> None:
    """Rolls this host's generation ``number`` back (prepared or not), now."""
    try:
        gens.recover_locked(layout, committed)
    except (ApolloSyncError, OSError) as e:
        note = (
            f"could not yet put back what generation {number} wrote here ({e}); "
            "`apollo-sync recover` (or the next group sync) will"
        )
        if error is None:
            raise GroupError(note) from e
        error.add_note(note)


def _unknown(
    root: Path, layout: gens.Layout, number: int, committed: int, e: GroupError
) -> GroupError:
    return GroupError(
        f"{root}: host {layout.host} prepared generation {number} and then {e}; whether "
        f"host 0 committed it is not known here, so this host's part of it stays until "
        f"recovery follows the group file (`apollo-sync recover --model-dir {root}`, or "
        f"the next group sync): every host then holds generation {committed} or {number}"
    )


# ---------------------------------------------------------------------------
# Recovery and history of a group's directory
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _all_locks(
    root: Path, hosts: int, timeout: float, *, shared: bool
) -> Iterator[list[gens.ModelLock]]:
    """Every host's lock, in host order (host 0, which writes the group file, first)."""
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(gens.ModelLock(root, timeout, shared=shared, host=h))
            for h in range(hosts)
        ]


def recover(root: Path, g: GroupFile, lock_timeout: float) -> gens.Recovered | None:
    """Brings every host's files to the group's committed generation, holding every
    host's lock (a host still committing finishes first)."""
    with _all_locks(root, g.hosts, lock_timeout, shared=False):
        g = read_group(root) or g  # read again under host 0's lock
        done = [_recover_host(root, h, g.committed) for h in range(g.hosts)]
    return _combine(g.committed, [d for d in done if d is not None])


def _recover_host(root: Path, host: int, committed: int) -> gens.Recovered | None:
    layout = gens.Layout(root, host)
    if not layout.meta.is_dir():
        if committed:
            raise JournalError(f"{layout.meta}: missing, though the group committed {committed}")
        return None
    failed = gens.wait_flushes(layout)
    done, warnings = gens.recover_locked(layout, committed)
    gens._log_warnings(layout, failed + warnings)
    return done


def _combine(committed: int, done: list[gens.Recovered]) -> gens.Recovered | None:
    if not done:
        return None
    return gens.Recovered(
        generation=committed,
        rolled_back=sorted({n for d in done for n in d.rolled_back}),
        rolled_forward=sorted({n for d in done for n in d.rolled_forward}),
        units=sum(d.units for d in done),
        units_written=sum(d.units_written for d in done),
        torn=sum(d.torn for d in done),
        bytes_written=sum(d.bytes_written for d in done),
        files=sorted({f for d in done for f in d.files}),
    )


def needs_recovery(root: Path, g: GroupFile, wait: float) -> bool:
    for h in range(g.hosts):
        layout = gens.Layout(root, h)
        if not layout.meta.is_dir():
            continue
        state = gens.load_state(layout)
        if state.generation != g.committed or any(n > g.committed for n in layout.logs()):
            return True
        if gens._needs_recovery(layout, wait):
            return True
    return False


@contextlib.contextmanager
def reading(root: Path, g: GroupFile, lock_timeout: float) -> Iterator[gens.History]:
    """:func:`apollo_sync.reading` for a group's directory: every host's shared lock."""
    with _all_locks(root, g.hosts, lock_timeout, shared=True):
        g = read_group(root) or g
        if not needs_recovery(root, g, min(lock_timeout, gens.FLUSH_WAIT)):
            yield history(root, g)
            return
    with _all_locks(root, g.hosts, lock_timeout, shared=False) as locks:
        g = read_group(root) or g
        for h in range(g.hosts):
            _recover_host(root, h, g.committed)
        for lock in locks:
            lock.downgrade()
        yield history(root, g)


def history(root: Path, g: GroupFile) -> gens.History:
    """The group's generations, each merged from every host's entry (bytes and
    elements summed, files and tensors joined; its log kept only where every
    host kept its part). Generations a host prepared past the group's commit are
    not listed; the checkpoint is the lowest of the hosts'."""
    per_host: list[dict[int, gens.Generation]] = []
    checkpoint = g.committed
    for h in range(g.hosts):
        layout = gens.Layout(root, h)
        state = gens.load_state(layout)
        checkpoint = min(checkpoint, gens.checkpoint(layout, state))
        per_host.append({x.number: x for x in state.history if x.number <= g.committed})
    numbers = sorted({n for entries in per_host for n in entries})
    merged = []
    for n in numbers:
        parts = [entries[n] for entries in per_host if n in entries]
        tensors: dict[str, int] = {}
        for p in parts:
            tensors |= p.tensors
        merged.append(
            gens.Generation(
                number=n,
                time=max(p.time for p in parts),
                kind=parts[0].kind,
                bytes_changed=sum(p.bytes_changed for p in parts),
                log_bytes=sum(p.log_bytes for p in parts),
                log=len(parts) == g.hosts and all(p.log or not p.bytes_changed for p in parts),
                elements_changed=sum(p.elements_changed for p in parts),
                files=sorted({f for p in parts for f in p.files}),
                tensors=tensors,
                tensor_count=None
                if all(p.tensor_count is None for p in parts)
                else sum(p.touched for p in parts),
            )
        )
    return gens.History(gens.State(g.committed, checkpoint, merged))
