"""Crash safety and generations: the XOR-delta log, recovery, history, rollback,
pruning, the lock, shards that must not be written in place, step counters.

Crashes are real: a child process runs the sync and is killed with SIGKILL at a
chosen instant (the fault points of the core and of the Python package), or at
a random time. Recovery must then bring every shard back to exactly the last
committed generation: the old files in full, or the new ones in full, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import apollo_sync
from apollo_sync import journal as gens
from apollo_sync.cli import render_history
from apollo_sync.errors import (
    JournalError,
    LayoutError,
    LockedError,
    PlanError,
    RollbackError,
    TornSyncError,
    UnsafeShardError,
)
from apollo_sync.steps import StepCounter
from apollo_sync.stream import Placement
from conftest import dir_digest, randn, write_model

Factory = Callable[..., Path]
#: Crash and error injection is compiled in by `make install` (the `faults` feature).
needs_faults = pytest.mark.skipif(
    not apollo_sync._core.FAULTS,
    reason="this build has no fault injection (build with `make install`)",
)


def shards_digest(root: Path) -> dict[str, str]:
    """sha256 of every shard (the checkpoint, without .apollo_sync/)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.glob("*.safetensors"))
    }


def base(seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        f"model.layers.{i}.mlp.weight": randn(256, 512, dtype=torch.bfloat16, seed=seed + i)
        for i in range(6)
    } | {"model.norm.weight": randn(512, dtype=torch.float32, seed=seed + 99)}


def step(tensors: dict[str, torch.Tensor], seed: int, fraction: float = 0.01) -> None:
    """Changes about ``fraction`` of the elements of every tensor, in place."""
    g = torch.Generator().manual_seed(seed)
    for t in tensors.values():
        flat = t.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, int(flat.numel() * fraction)),), generator=g)
        flat[idx] += 1


# --- generations, history, rollback ------------------------------------------------------


def test_syncs_make_generations_and_rollback_restores_each_exactly(model_factory: Factory) -> None:
    live = base()
    root = model_factory(live, shards=2)
    snapshots = {0: shards_digest(root)}
    for n in (1, 2, 3):
        step(live, seed=n)  # 1% of the elements: most blocks
        r = apollo_sync.sync(root, live)
        assert r.generation == n and r.total_changed > 0
        # the log holds the changed elements, not the changed blocks
        assert 0 < r.log_bytes < r.total_changed / 10 and r.elements_changed > 0
        snapshots[n] = shards_digest(root)
    assert apollo_sync.sync(root, live).generation is None  # nothing changed: no generation
    state = gens.history(root)
    assert state.generation == 3 and [g.number for g in state] == [1, 2, 3]
    assert len(state) == 3 and 2 in state and state[2].number == 2
    assert all(g.log and g.tensors and g.files and g.elements_changed for g in state)
    assert state.rollback_points() == [2, 1, 0]

    g = gens.rollback(root, 1)
    assert (g.number, g.kind, g.rollback_to) == (4, "rollback", 1)
    assert shards_digest(root) == snapshots[1]
    gens.rollback(root, 3)  # a rollback is a generation like any other: undo it
    assert shards_digest(root) == snapshots[3]
    gens.rollback(root, 0)
    assert shards_digest(root) == snapshots[0]
    for name, t in load_file(str(root / "model-00001-of-00002.safetensors")).items():
        assert torch.equal(t.view(torch.uint8), base()[name].view(torch.uint8))
    with pytest.raises(RollbackError, match="current generation is 6"):
        gens.rollback(root, 6)


def test_rollback_refuses_a_damaged_record_in_its_chain_before_writing(
    model_factory: Factory,
) -> None:
    live = base()
    root = model_factory(live, shards=2)
    for n in (1, 2, 3):
        step(live, seed=n)
        apollo_sync.sync(root, live)
    third = shards_digest(root)
    log = gens.Layout(root).log_path(2)
    raw = bytearray(log.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # inside a record of generation 2, before its commit
    log.write_bytes(bytes(raw))
    with pytest.raises(JournalError, match="damaged record"):
        gens.rollback(root, 1)  # walks generation 3's log, then 2's
    assert shards_digest(root) == third  # checked before the first write
    assert gens.history(root).generation == 3
    gens.rollback(root, 2)  # generation 3's log alone is whole: that one goes
    assert gens.history(root).generation == 4


def test_the_log_records_the_changed_elements_of_each_tensor(model_factory: Factory) -> None:
    live = base()
    root = model_factory(live, shards=3)
    live["model.layers.3.mlp.weight"][7, 9] += 1
    live["model.layers.3.mlp.weight"][200, 9] += 1
    live["model.norm.weight"][5] += 1
    r = apollo_sync.sync(root, live)
    g = gens.history(root)[1]
    assert g.tensors == {"model.layers.3.mlp.weight": 2, "model.norm.weight": 1}
    assert g.elements_changed == r.elements_changed == 3
    info = apollo_sync._core.read_log(gens.Layout(root).log_path(1))
    assert info.committed and info.records == 3 and info.covered == r.total_changed
    assert info.bytes == r.log_bytes < 1024  # three elements: a few hundred bytes
    assert r.durable is False
    gens.wait_flushes(gens.Layout(root))  # the background flush marks the checkpoint
    assert gens.history(root).checkpoint == 1


def test_tensor_elements_matches_a_brute_force_overlap() -> None:
    rng = random.Random(3)
    for _ in range(50):
        tensors, at = [], 80
        for i in range(rng.randint(1, 30)):
            size = rng.choice([0, 2, 100, 4096, 10_000])
            tensors.append(("a.safetensors", f"t{i}", at, at + size))
            at += size
        runs = []
        for _ in range(rng.randint(0, 20)):
            off = rng.randrange(0, at + 1) // 4096 * 4096
            runs.append((0, off, rng.choice([4096, 8192]), rng.randint(0, 50)))
        got = gens.tensor_elements(runs, ["a.safetensors", "b.safetensors"], tensors)
        overlapped = {n for _, n, s, e in tensors for _, o, ln, _ in runs if s < o + ln and e > o}
        assert set(got) == {n for _, n, s, e in tensors if e > s} & overlapped
        for _, off, ln, elements in runs:  # a run inside one tensor gives it all its elements
            inside = [n for _, n, s, e in tensors if s <= off and off + ln <= e]
            if inside and elements:
                assert got[inside[0]] >= elements


def test_pruning_keeps_the_newest_and_refuses_rollback_past_them(model_factory: Factory) -> None:
    live = base()
    root = model_factory(live)
    for n in range(1, 6):
        step(live, seed=n)
        apollo_sync.sync(root, live, keep=2, undo_budget=1 << 30)
    layout = gens.Layout(root)
    assert sorted(layout.logs()) == [4, 5]
    state = gens.history(root)
    assert [g.log for g in state] == [False, False, False, True, True]
    assert state.rollback_points() == [4, 3]
    with pytest.raises(RollbackError, match=r"generation\(s\) 3 is gone"):
        gens.rollback(root, 2)
    gens.rollback(root, 3)  # within what is kept
    # A byte budget smaller than one generation keeps only the newest.
    assert gens.prune(root, keep=100, max_bytes=1) == [4, 5]
    assert sorted(layout.logs()) == [6]


def test_a_bad_retention_is_refused_before_anything_is_written(model_factory: Factory) -> None:
    """A negative count or budget used to fail at the pruning, after the commit;
    now nothing is written, not even the lock file."""
    live = base()
    root = model_factory(live)
    before = shards_digest(root)
    step(live, seed=1)
    bad_ones = ({"keep": -1}, {"undo_budget": -1}, {"keep": 2.5}, {"undo_budget": 1 << 64})
    for bad in bad_ones:
        with pytest.raises(PlanError, match="a whole number ≥ 0 is needed"):
            apollo_sync.sync(root, live, **bad)  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="a whole number ≥ 0 is needed"):
        apollo_sync.prune(root, max_bytes=-5)
    assert shards_digest(root) == before and not (root / gens.STATE_DIRNAME).exists()
    for keep in ("-1", str(1 << 64)):
        p = subprocess.run(
            [sys.executable, "-m", "apollo_sync", "prune", str(root), "--keep", keep],
            capture_output=True,
            text=True,
        )
        assert p.returncode == 2 and f"--keep: '{keep}': a whole number ≥ 0" in p.stderr
    # a numpy integer is a whole number
    r = apollo_sync.sync(root, live, keep=np.int64(3), undo_budget=np.uint64(1 << 40))
    assert r.generation == 1


def test_pruned_generations_keep_only_their_tensor_count(model_factory: Factory) -> None:
    """state.json is rewritten at every commit: a pruned generation loses its
    tensor names and keeps their number, while every rollback point stays
    listed in full. (That the history stops growing at HISTORY_LIMIT entries is
    the core's test of ``log/state.rs``.)"""
    live = base()
    root = model_factory(live)
    for n in range(1, 9):
        step(live, seed=n)
        apollo_sync.sync(root, live, keep=3, undo_budget=1 << 30)
    state = gens.history(root)
    assert [g.number for g in state] == list(range(1, 9))
    assert [g.log for g in state] == [False] * 5 + [True] * 3
    assert all(g.tensors == {} and g.tensor_count == 7 for g in state.history[:5])
    assert all(len(g.tensors) == g.touched == 7 for g in state.history[5:])
    gens.rollback(root, 6)  # the kept rollback points still work
    assert "      7" in render_history(gens.history(root))


def test_a_shard_rewritten_before_the_lock_is_mapped_again(
    model_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mapping made before the lock is reused under it only while the headers
    are the same: here another writer moves every tensor (a longer header) in
    between, and the sync must write at the new offsets."""
    live = base()
    root = model_factory(live, shards=1)
    stale = load_file(str(root / "model.safetensors"))
    step(live, seed=1)
    recover = gens.recover_locked

    def rewrite_then_recover(layout: gens.Layout) -> tuple[object, list[str]]:
        save_file(stale, str(root / "model.safetensors"), metadata={"pad": "x" * 3000})
        return recover(layout)

    monkeypatch.setattr(gens, "recover_locked", rewrite_then_recover)
    apollo_sync.sync(root, live)
    on_disk = load_file(str(root / "model.safetensors"))
    assert all(torch.equal(on_disk[n], t) for n, t in live.items())


def test_without_a_journal_the_generation_cannot_be_rolled_back(model_factory: Factory) -> None:
    live = base()
    root = model_factory(live)
    step(live, seed=1)
    r = apollo_sync.sync(root, live, journal=False)
    assert r.generation == 1 and r.log_bytes == 0 and r.durable
    assert not gens.Layout(root).logs() and gens.history(root).checkpoint == 1
    with pytest.raises(RollbackError, match="synced without one"):
        gens.rollback(root, 0)


def test_an_exception_mid_sync_puts_the_files_back(
    model_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync_module = sys.modules["apollo_sync.sync"]  # the name apollo_sync.sync is the function
    live = base()
    root = model_factory(live, shards=3)
    before = shards_digest(root)
    step(live, seed=1)
    real = sync_module.stream_into

    def interrupted(syncer: object, plan: list[Placement], **kw: object) -> None:
        # every shard but the last: the commit thread is writing the first ones
        real(syncer, [p for p in plan if p.shard < 2], **kw)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(sync_module, "stream_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        apollo_sync.sync(root, live)
    time.sleep(0.2)  # a writer left running would show up now
    assert shards_digest(root) == before
    assert gens.history(root).generation == 0 and not gens.Layout(root).logs()


# --- the lock ----------------------------------------------------------------------------


def test_a_second_writer_waits_then_gives_up_with_a_clear_message(model_factory: Factory) -> None:
    live = base()
    root = model_factory(live)
    step(live, seed=1)
    before = shards_digest(root)
    with gens.ModelLock(root), pytest.raises(LockedError, match=f"pid {os.getpid()}"):
        apollo_sync.sync(root, live, lock_timeout=0.2)
    assert shards_digest(root) == before
    assert apollo_sync.sync(root, live).generation == 1


def test_a_lock_left_by_a_killed_process_is_taken_over(model_factory: Factory) -> None:
    live = base()
    root = model_factory(live)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from apollo_sync.journal import ModelLock\n"
            "with ModelLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)",
            str(root),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    with pytest.raises(LockedError):
        apollo_sync.recover(root, lock_timeout=0.1)
    holder.send_signal(signal.SIGKILL)
    holder.communicate()
    step(live, seed=1)
    assert apollo_sync.sync(root, live, lock_timeout=5).generation == 1


# --- files that must not be written in place ---------------------------------------------


def test_symlinked_and_hard_linked_shards_are_refused_or_copied(tmp_path: Path) -> None:
    live = base()
    blobs = write_model(tmp_path / "blobs", live, shards=2)
    root = tmp_path / "snapshot"
    root.mkdir()
    shutil.copy(blobs / "model.safetensors.index.json", root)
    os.symlink(
        blobs / "model-00001-of-00002.safetensors", root / "model-00001-of-00002.safetensors"
    )
    os.link(blobs / "model-00002-of-00002.safetensors", root / "model-00002-of-00002.safetensors")
    cache = dir_digest(blobs)
    step(live, seed=1)
    with pytest.raises(UnsafeShardError, match="symlink.*hard link"):
        apollo_sync.sync(root, live)
    assert dir_digest(blobs) == cache
    assert not (root / ".apollo_sync").exists()

    r = apollo_sync.sync(root, live, private_copy=True)
    assert r.total_changed > 0
    assert dir_digest(blobs) == cache  # the cache's copies are untouched
    for p in root.glob("*.safetensors"):
        assert not p.is_symlink() and p.stat().st_nlink == 1
    assert apollo_sync.sync(root, live).total_changed == 0


def test_rollback_refuses_a_shard_that_became_a_symlink(
    model_factory: Factory, tmp_path: Path
) -> None:
    live = base()
    root = model_factory(live)
    step(live, seed=1)
    apollo_sync.sync(root, live)
    shard = root / "model.safetensors"
    blob = tmp_path / "blob.safetensors"
    shutil.move(shard, blob)
    os.symlink(blob, shard)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    with pytest.raises(UnsafeShardError, match="symlink"):
        gens.rollback(root, 0)
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of its own (needs mount rights: root in a container that allows it)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    size = 1600 * 1024  # the model below (1.5 MiB) with room for its lock and state only
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)])
    if p.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_real_full_disk_while_journaling_changes_nothing(small_fs: Path) -> None:
    live = base()
    root = write_model(small_fs / "model", live)
    before = shards_digest(root)
    step(live, seed=1, fraction=0.5)  # half the elements: the log cannot fit
    with pytest.raises(apollo_sync.SyncIOError, match="No space left"):
        apollo_sync.sync(root, live)
    assert shards_digest(root) == before
    assert gens.history(root).generation == 0 and not gens.Layout(root).logs()


def test_a_read_only_filesystem_is_refused_before_anything_is_written(small_fs: Path) -> None:
    live = base()
    root = write_model(small_fs / "model", live)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    step(live, seed=1)
    digest = dir_digest(root)
    with pytest.raises(UnsafeShardError, match="not writable"):
        apollo_sync.sync(root, live)  # the check uses access(2), which root cannot bypass here
    assert dir_digest(root) == digest


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_a_read_only_shard_is_refused_before_anything_is_written(model_factory: Factory) -> None:
    live = base()
    root = model_factory(live)
    (root / "model.safetensors").chmod(0o444)
    step(live, seed=1)
    digest = dir_digest(root)
    with pytest.raises(UnsafeShardError, match="not writable"):
        apollo_sync.sync(root, live)
    assert dir_digest(root) == digest


# --- crashes -----------------------------------------------------------------------------

CHILD = """
import json, sys
from safetensors.torch import load_file
import apollo_sync
from apollo_sync import journal
root, live_path, op = sys.argv[1], sys.argv[2], sys.argv[3]
live = load_file(live_path)
print("ready", flush=True)
if op == "sync":
    apollo_sync.sync(root, live, keep=int(sys.argv[4]))
elif op == "sync-twice":  # a second call reports what went wrong after the first returned
    apollo_sync.sync(root, live, keep=int(sys.argv[4]))
    import time; time.sleep(0.5)  # the background flush has failed by now
    print(json.dumps(apollo_sync.sync(root, live).warnings), flush=True)
else:
    journal.rollback(root, int(op.split(":")[1]))
print("done", flush=True)
"""


def run_child(
    root: Path, live_path: Path, op: str = "sync", env: dict[str, str] | None = None, keep: int = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(live_path), op, str(keep)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def crash_case(tmp_path: Path) -> tuple[Path, Path, dict[str, str], dict[str, str]]:
    """A committed generation 1 (the "old" files) and live tensors for a second
    sync that changes several runs in both shards (the "new" files)."""
    live = base()
    root = write_model(tmp_path / "model", live, shards=2)
    step(live, seed=1)
    apollo_sync.sync(root, live)
    old = shards_digest(root)
    step(live, seed=2, fraction=0.0005)
    live_path = tmp_path / "live.safetensors"
    save_file(live, str(live_path))
    new_root = write_model(tmp_path / "expected", live, shards=2)
    return root, live_path, old, shards_digest(new_root)


#: Where a sync is killed, and which generation recovery must leave: before
#: the commit record the old one, from it on the new one (rolled forward: the
#: shards' writes may not have reached the disk).
KILL_POINTS = {
    "log:1": "old",
    "log:5": "old",
    "barrier:1": "old",
    "write:1": "old",
    "write:4": "old",
    "write:12": "old",
    "commit:1": "old",
    "committed:1": "new",  # the commit record is durable, state.json not yet written
    "state:1": "new",
    "flush:1": "new",  # the background flush of the shards
    "prune:1": "new",
}


@needs_faults
@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_at_any_point_recovers_to_one_generation(
    crash_case: tuple[Path, Path, dict[str, str], dict[str, str]], point: str
) -> None:
    root, live_path, old, new = crash_case
    keep = 1 if point.startswith("prune") else 20  # so the sync prunes
    p = run_child(root, live_path, env={"APOLLO_SYNC_CRASH_AT": point}, keep=keep)
    assert p.returncode == -signal.SIGKILL, p.stderr
    apollo_sync.recover(root)
    committed = gens.history(root).generation
    if KILL_POINTS[point] == "new":
        assert shards_digest(root) == new and committed == 2
    else:
        assert shards_digest(root) == old and committed == 1
    assert max(gens.Layout(root).logs()) == committed  # no uncommitted log left
    assert gens.history(root).checkpoint == committed  # and the shards are durable
    # and the next sync completes the job
    assert run_child(root, live_path).returncode == 0
    assert shards_digest(root) == new


def test_kills_at_random_instants_never_leave_a_mix(tmp_path: Path) -> None:
    live = {f"w{i}": randn(1024, 2048, dtype=torch.float16, seed=i) for i in range(8)}  # 32 MB
    template = write_model(tmp_path / "template", live, shards=4)
    old = shards_digest(template)
    step(live, seed=7, fraction=0.02)
    live_path = tmp_path / "live.safetensors"
    save_file(live, str(live_path))
    new = shards_digest(write_model(tmp_path / "expected", live, shards=4))
    rng = random.Random(0)
    outcomes = {"old": 0, "new": 0}
    tried = 16
    for i in range(tried):
        root = tmp_path / f"run{i}"
        shutil.copytree(template, root)
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root), str(live_path), "sync", "20"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # the sync itself takes tens of milliseconds: kill within (or just after) it
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))
        child.send_signal(signal.SIGKILL)
        child.communicate()
        apollo_sync.recover(root)
        got = shards_digest(root)
        assert got in (old, new), f"kill {i}: a mix of two generations"
        outcomes["old" if got == old else "new"] += 1
    print(f"random kills: {tried} tried, recovered to old {outcomes['old']}, new {outcomes['new']}")


#: Where a rollback (of generation 2 to 1, as generation 3) is killed, and what
#: recovery must leave: before its commit record generation 2, from it on 3.
ROLLBACK_KILL_POINTS = {
    "log:2": 2,
    "barrier:1": 2,
    "apply:1": 2,
    "apply:3": 2,
    "fsync:1": 2,
    "commit:1": 2,
    "committed:1": 3,  # the commit record is durable, state.json not yet written
    "state:1": 3,
}


@needs_faults
@pytest.mark.parametrize("point", ROLLBACK_KILL_POINTS)
def test_a_kill_during_rollback_recovers_to_one_generation(
    crash_case: tuple[Path, Path, dict[str, str], dict[str, str]], point: str
) -> None:
    root, live_path, old, new = crash_case
    assert run_child(root, live_path).returncode == 0  # generation 2
    p = run_child(root, live_path, op="rollback:1", env={"APOLLO_SYNC_CRASH_AT": point})
    assert p.returncode == -signal.SIGKILL, p.stderr
    apollo_sync.recover(root)
    generation = gens.history(root).generation
    assert generation == ROLLBACK_KILL_POINTS[point]
    assert shards_digest(root) == (new if generation == 2 else old)
    assert gens.history(root).checkpoint == generation


@needs_faults
def test_a_rollback_that_fails_after_its_commit_says_it_is_committed(
    crash_case: tuple[Path, Path, dict[str, str], dict[str, str]],
) -> None:
    root, live_path, old, _ = crash_case
    assert run_child(root, live_path).returncode == 0  # generation 2
    p = run_child(root, live_path, op="rollback:1", env={"APOLLO_SYNC_FAIL_AT": "state:1:28"})
    assert p.returncode == 1 and "No space left" in p.stderr
    assert "generation 3 is committed all the same" in p.stderr
    assert shards_digest(root) == old  # the rollback's bytes stay: it is committed
    apollo_sync.recover(root)
    assert gens.history(root).generation == 3 and shards_digest(root) == old


def test_a_rollback_target_that_is_no_generation_is_refused(model_factory: Factory) -> None:
    live = base()
    root = model_factory(live)
    for n in (1, 2):
        step(live, seed=n)
        apollo_sync.sync(root, live)
    two = shards_digest(root)
    for to in (-1, 1 << 64, 1.0, "1"):
        with pytest.raises(RollbackError, match="the current generation is 2"):
            gens.rollback(root, to)  # type: ignore[arg-type]
    assert shards_digest(root) == two and gens.history(root).generation == 2
    assert gens.rollback(root, np.int64(1)).rollback_to == 1


@needs_faults
@pytest.mark.parametrize(
    ("point", "errno_"),
    [
        ("log:3", 28),
        ("barrier:1", 5),
        ("write:2", 28),
        ("write:7", 5),
        ("commit:1", 28),  # writing the commit record: the written blocks are put back
    ],
)
def test_enospc_and_eio_leave_the_last_generation(
    crash_case: tuple[Path, Path, dict[str, str], dict[str, str]], point: str, errno_: int
) -> None:
    root, live_path, old, _ = crash_case
    p = run_child(root, live_path, env={"APOLLO_SYNC_FAIL_AT": f"{point}:{errno_}"})
    assert p.returncode == 1
    assert os.strerror(errno_) in p.stderr
    assert shards_digest(root) == old  # put back at once, not left for recovery
    assert gens.history(root).generation == 1
    assert sorted(gens.Layout(root).logs()) == [1]


@needs_faults
def test_a_failed_background_flush_is_reported_and_the_writes_redone(
    crash_case: tuple[Path, Path, dict[str, str], dict[str, str]],
) -> None:
    """EIO from the fdatasync after the commit: the generation stays committed,
    the checkpoint does not advance, and the next call says so and rewrites the
    generation's units from the log (Linux may have marked the failed pages
    clean, so reading the page cache proves nothing)."""
    root, live_path, _, new = crash_case
    p = run_child(root, live_path, op="sync-twice", env={"APOLLO_SYNC_FAIL_AT": "flush:1:5"})
    assert p.returncode == 0, p.stderr
    warnings = json.loads(p.stdout.splitlines()[-2])
    assert any("durable failed" in w and "Input/output error" in w for w in warnings), warnings
    assert shards_digest(root) == new
    state = gens.history(root)
    assert state.generation == state.checkpoint == 2


@needs_faults
def test_a_failed_state_write_after_the_commit_keeps_the_generation(
    crash_case: tuple[Path, Path, dict[str, str], dict[str, str]],
) -> None:
    """The commit record is the commit point: state.json failing after it is an
    error, but the generation is committed and the next writer records it."""
    root, live_path, _, new = crash_case
    p = run_child(root, live_path, env={"APOLLO_SYNC_FAIL_AT": "state:1:28"})
    assert p.returncode == 1 and "No space left" in p.stderr
    assert gens.history(root).generation == 1  # state.json is behind the log
    apollo_sync.recover(root)
    assert gens.history(root).generation == 2 and shards_digest(root) == new


@needs_faults
def test_a_generation_whose_writes_never_reached_the_disk_is_rolled_forward(
    crash_case: tuple[Path, Path, dict[str, str], dict[str, str]],
) -> None:
    """What a power cut after the commit leaves: the log committed, the shards
    still the old bytes (here put back by hand) with some units torn at 512 B."""
    root, live_path, old_digest, new = crash_case
    before = {p.name: p.read_bytes() for p in root.glob("*.safetensors")}
    p = run_child(root, live_path, env={"APOLLO_SYNC_CRASH_AT": "flush:1"})
    assert p.returncode == -signal.SIGKILL
    rng = random.Random(5)
    for path in root.glob("*.safetensors"):
        now = bytearray(path.read_bytes())
        old = before[path.name]
        for at in range(0, len(now), 512):  # each sector old or new, as writeback left it
            if rng.random() < 0.5:
                now[at : at + 512] = old[at : at + 512]
        path.write_bytes(bytes(now))
    assert shards_digest(root) not in (old_digest, new)
    done = apollo_sync.recover(root)
    assert done is not None and done.rolled_forward == [2] and done.torn > 0
    assert shards_digest(root) == new


@needs_faults
def test_a_failed_prune_is_a_warning_and_the_generation_stays_committed(
    crash_case: tuple[Path, Path, dict[str, str], dict[str, str]],
) -> None:
    root, live_path, _, new = crash_case
    p = run_child(root, live_path, env={"APOLLO_SYNC_FAIL_AT": "prune:1:5"}, keep=1)
    assert p.returncode == 0, p.stderr
    assert shards_digest(root) == new and gens.history(root).generation == 2
    assert sorted(gens.Layout(root).logs()) == [1, 2]  # the prune is retried later
    apollo_sync.prune(root, keep=1)
    assert sorted(gens.Layout(root).logs()) == [2]


@needs_faults
def test_a_dry_run_warns_of_a_pending_recovery(
    crash_case: tuple[Path, Path, dict[str, str], dict[str, str]],
) -> None:
    root, live_path, _, _ = crash_case
    run_child(root, live_path, env={"APOLLO_SYNC_CRASH_AT": "write:2"})
    torn = shards_digest(root)
    r = apollo_sync.sync(root, load_file(str(live_path)), dry_run=True)
    assert any("awaits recovery" in w for w in r.warnings)
    assert shards_digest(root) == torn  # a dry run changes nothing, recovery included


@needs_faults
def test_a_damaged_log_is_reported_and_nothing_applied(
    crash_case: tuple[Path, Path, dict[str, str], dict[str, str]],
) -> None:
    """Generation 2 committed, its shards not yet flushed (killed in the
    background flush): recovery needs its log, whose first record is damaged
    (the commit after it proves the record had been durable)."""
    root, live_path, _, new = crash_case
    p = run_child(root, live_path, env={"APOLLO_SYNC_CRASH_AT": "flush:1"})
    assert p.returncode == -signal.SIGKILL
    log = gens.Layout(root).log_path(2)
    raw = bytearray(log.read_bytes())
    first = int.from_bytes(raw[12:16], "little")  # the header's length: the first record
    raw[first + 40] ^= 0xFF
    log.write_bytes(bytes(raw))

    def files() -> dict[str, str]:  # all but the lock, which names its last holder
        return {k: v for k, v in dir_digest(root).items() if not k.endswith("lock")}

    before = files()
    with pytest.raises(JournalError, match="damaged record"):
        apollo_sync.recover(root)
    assert files() == before  # nothing applied, nothing deleted
    with pytest.raises(JournalError):  # and no sync goes on top of it
        apollo_sync.sync(root, load_file(str(live_path)))
    assert shards_digest(root) == new


def test_a_flush_after_a_failed_one_does_not_move_the_checkpoint(tmp_path: Path) -> None:
    """The checkpoint cannot pass a generation that is not on disk: a flush whose
    predecessor failed marks nothing and reports why; the error reaches
    ``wait_flushes``."""
    layout = gens.Layout(tmp_path)
    layout.ensure()
    shard = tmp_path / "m.safetensors"
    shard.write_bytes(b"bytes")
    gens.start_flush(layout, 2, [tmp_path / "gone.safetensors"])  # open fails
    gens.start_flush(layout, 3, [shard])
    failed = gens.wait_flushes(layout)
    assert len(failed) == 2 and "gone.safetensors" in failed[0], failed
    assert "generation 2 before it was not made durable" in failed[1], failed
    assert layout.flushed() == 0
    # (in use, a failure collected is followed by recovery before the next flush;
    # here the registry is empty again, so 4 starts with no predecessor)
    gens.start_flush(layout, 4, [shard])
    assert gens.wait_flushes(layout) == [] and layout.flushed() == 4


@needs_faults
def test_the_cli_recovers_lists_history_and_rolls_back(
    crash_case: tuple[Path, Path, dict[str, str], dict[str, str]],
) -> None:
    root, live_path, old, _ = crash_case
    run_child(root, live_path, env={"APOLLO_SYNC_CRASH_AT": "write:2"})

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "apollo_sync", *args, "--model-dir", str(root)],
            capture_output=True,
            text=True,
            check=True,
        )

    assert "rolled back interrupted generation(s) [2]" in cli("recover").stdout
    assert shards_digest(root) == old
    table = cli("history").stdout
    assert "<- current" in table and "(before the first sync)" in table
    assert json.loads(cli("history", "--json").stdout)["generation"] == 1
    assert "rolled back to generation 0 as generation 2" in cli("rollback", "--to", "0").stdout


# --- a generation is one training step ---------------------------------------------------


def test_a_sync_during_training_steps_is_redone_or_refused(model_factory: Factory) -> None:
    live = base()
    root = model_factory(live)
    counter = StepCounter.create()
    try:
        step(live, seed=1)
        before = shards_digest(root)
        stop = threading.Event()

        def train() -> None:  # steps as fast as it can, all the time
            while not stop.is_set():
                with counter.step(cuda_sync=False):
                    pass

        t = threading.Thread(target=train)
        t.start()
        try:
            with pytest.raises(TornSyncError, match="stepped during each of 3 tries"):
                apollo_sync.sync(root, live, step_counter=counter, step_retries=2)
        finally:
            stop.set()
            t.join()
        assert shards_digest(root) == before and gens.history(root).generation == 0
        r = apollo_sync.sync(root, live, step_counter=counter)
        assert r.generation == 1 and r.retries == 0
        # without a log a torn write cannot be undone: no retry, and it says so
        step(live, seed=2)
        stop.clear()
        t = threading.Thread(target=train)
        t.start()
        try:
            with pytest.raises(TornSyncError, match="during a sync without a log"):
                apollo_sync.sync(root, live, step_counter=counter, journal=False)
        finally:
            stop.set()
            t.join()
    finally:
        counter.close()
        counter.unlink()


def test_the_step_counter_travels_with_the_handles(model_factory: Factory, tmp_path: Path) -> None:
    live = base()
    root = model_factory(live)
    counter = StepCounter.create(tmp_path / "steps")
    meta = {"model_path": str(root)}
    handles = apollo_sync.export_handles(
        live, tmp_path / "h" / "handles.pt", metadata=meta, step_counter=counter
    )
    try:
        with counter.step(cuda_sync=False):  # a step in progress: the sync waits, then refuses
            step(live, seed=1)
            with pytest.raises(apollo_sync.HandlesError, match="inside a training step"):
                apollo_sync.sync(handles=handles, lock_timeout=0.2)
        assert gens.history(root).generation == 0
        r = apollo_sync.sync(handles=handles)  # the step is over: it commits
        assert r.generation == 1 and r.total_changed > 0
    finally:
        counter.close()


def test_bad_input_still_changes_nothing_and_creates_no_state(model_factory: Factory) -> None:
    live = base()
    root = model_factory(live)
    live["model.norm.weight"] = randn(7, dtype=torch.float32)
    digest = dir_digest(root)
    with pytest.raises(LayoutError):
        apollo_sync.sync(root, live)
    assert dir_digest(root) == digest and not (root / ".apollo_sync").exists()


# --- what readers can rely on ------------------------------------------------------------


@needs_faults
def test_reading_recovers_first_then_holds_syncs_off(
    crash_case: tuple[Path, Path, dict[str, str], dict[str, str]],
) -> None:
    root, live_path, old, new = crash_case
    p = run_child(root, live_path, env={"APOLLO_SYNC_CRASH_AT": "write:2"})
    assert p.returncode == -signal.SIGKILL
    assert shards_digest(root) != old  # half written
    live = load_file(str(live_path))
    with apollo_sync.reading(root) as h:
        assert shards_digest(root) == old and h.generation == h.checkpoint == 1
        with pytest.raises(LockedError):  # no sync while a loader reads
            apollo_sync.sync(root, live, lock_timeout=0.2)
        assert shards_digest(root) == old
        with apollo_sync.reading(root, lock_timeout=0.2):  # readers share
            pass
    assert apollo_sync.sync(root, live).generation == 2
    assert shards_digest(root) == new


def test_a_durable_sync_returns_with_the_shards_on_disk(model_factory: Factory) -> None:
    live = base()
    root = model_factory(live, shards=2)
    step(live, seed=1)
    r = apollo_sync.sync(root, live, durable=True)
    assert r.durable and r.generation == 1
    assert gens.history(root).checkpoint == 1  # marked before it returned
    step(live, seed=2)
    r = apollo_sync.sync(root, live)
    assert not r.durable and r.generation == 2


def test_only_a_durable_sync_starts_the_writeback_as_it_writes(
    model_factory: Factory,
) -> None:
    """A durable sync hands what it wrote to the writeback every 16 MiB of a
    shard; a plain one leaves it to the flush (its barriers would queue behind
    it on the device). Both write the same bytes."""
    orig = {"big": randn(3 << 20, 8, seed=3)}  # 48 MiB of bf16, one shard
    root = model_factory(orig)
    for n, durable in enumerate([True, False, True], start=1):
        live = {"big": orig["big"] + n}
        r = apollo_sync.sync(root, live, durable=durable)
        spans = r.stages["writeback_spans"]
        assert (spans >= 2) if durable else (spans == 0), (durable, r.stages)
        assert r.stages["writeback_started"] <= spans
        assert r.durable is durable and r.generation == n
        assert torch.equal(load_file(str(root / "model.safetensors"))["big"], live["big"])
    assert gens.history(root).checkpoint == 3


def test_a_forked_child_does_not_wait_for_the_parents_flushes(tmp_path: Path) -> None:
    """The core's flush threads are not in a forked child: it forgets them
    rather than wait forever (the parent's flush goes on)."""
    layout = gens.Layout(tmp_path)
    layout.ensure()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    gens.start_flush(layout, 1, [fifo])  # blocks opening it until a reader comes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12)
        pid = os.fork()
    if pid == 0:  # the child
        code = 0 if gens.wait_flushes(layout) == [] and gens._pending_flush(layout) == 0 else 1
        os._exit(code)
    deadline = time.monotonic() + 20
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0, "the child hung"
    assert gens._pending_flush(layout) == 1  # the parent's flush is still its own
    with open(fifo, "rb"):  # lets it go on: an fsync of a FIFO fails
        pass
    (failed,) = gens.wait_flushes(layout)
    assert "fifo" in failed and layout.flushed() == 0


def test_a_signal_interrupts_a_wait_for_a_flush(tmp_path: Path) -> None:
    """Waiting for a flush (a sync's ``durable``, recovery, exit) lets a signal's
    handler run: Ctrl-C stops the wait, not only once the flush ends."""
    layout = gens.Layout(tmp_path)
    layout.ensure()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    gens.start_flush(layout, 1, [fifo])  # blocks opening it until a reader comes

    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    old = signal.signal(signal.SIGALRM, interrupt)
    t = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Interrupted):
            gens.wait_flushes(layout)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        with open(fifo, "rb"):  # lets the flush end (an fsync of a FIFO fails)
            pass
    assert time.monotonic() - t < 5


def test_recover_reports_a_failed_flush_of_this_process_and_redoes_it(
    model_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """A flush that failed in the background is reported by the next call,
    whichever it is (here ``recover``), and its generation is redone from the
    log: the checkpoint then reaches it."""
    live = base()
    root = model_factory(live)
    step(live, seed=1)
    assert apollo_sync.sync(root, live).generation == 1
    layout = gens.Layout(root)
    assert gens.wait_flushes(layout) == [] and layout.flushed() == 1
    step(live, seed=2)
    r = apollo_sync.sync(root, live)
    gens.wait_flushes(layout)  # the real flush of generation 2, done
    layout.marker_path(2).unlink()  # as if it had failed: no marker ...
    gens.start_flush(layout, 2, [root / "gone.safetensors"])  # ... and an error to report
    with caplog.at_level("WARNING", logger="apollo_sync"):
        done = apollo_sync.recover(root)
    assert r.generation == 2 and done is not None and done.rolled_forward == [2]
    assert any("generation 2 durable failed" in m for m in caplog.messages), caplog.messages
    assert gens.history(root).checkpoint == 2
    on_disk = load_file(str(root / "model.safetensors"))
    assert all(torch.equal(on_disk[k], v) for k, v in live.items())


def test_the_default_budget_keeps_ten_rollback_points_of_real_steps(
    model_factory: Factory,
) -> None:
    """A training step moves a few percent of the elements (here 2%, with AdamW-
    like magnitudes); the default keep and budget must leave at least ten
    generations to roll back to."""
    live = base()
    root = model_factory(live)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        for t in live.values():
            flat = t.view(-1)
            idx = torch.randint(0, flat.numel(), (flat.numel() // 50,), generator=g)
            flat[idx] = (flat[idx].float() * 1.01 + 1e-3).to(t.dtype)
        apollo_sync.sync(root, live)
    points = gens.history(root).rollback_points()
    assert len(points) >= 10, points
    gens.rollback(root, points[-1])
