"""Power cuts replayed from the block device's own write stream.

ext4 sits on a loop device whose backing file records every write and cache flush
it receives (``tests/blockdev.py``: what dm-log-writes records, in user space, for
machines without device-mapper). A child process runs real syncs (writing in
place through the page cache, or with ``O_DIRECT``), a durable sync, a rollback
and a pruning sync on a model in that filesystem. Afterwards every
crash state is rebuilt from the recording: each flush point, and prefixes of the
stream cut at random writes, with the writes after the last flush kept, lost or
torn at 512 B sectors at random (a volatile cache keeps what it likes of what was
never flushed). Each state is mounted as a fresh boot would (ext4 replays its
journal), ``recover`` runs, and the shards must equal one whole generation: never
a mix, never older than a call that had returned before the cut, and the
generation the log says it is.

The same holds for two hosts committing one generation together
(:mod:`apollo_sync.group`, the consumers of ``tests/test_group.py``) on the
recording disk as their shared storage: after ``recover`` every shard holds the
generation the group file names, and every host's namespace agrees.

``APOLLO_SYNC_CRASH_STATES``: how many random cut points (default 80); ``all``
replays every prefix of the stream, each also with its unflushed writes shuffled.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import apollo_sync
from apollo_sync import journal as gens
from blockdev import FLUSH, Entry, Unavailable, crash_image, missing, mounted, recording_ext4
from test_journal import shards_digest

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

TESTS = Path(__file__).parent

#: The workload, in a child process: a two-shard model, generation 1 before the
#: recording starts, then one operation per line of output; the child waits for
#: "go" after each, so the parent can note where in the stream each call returned.
CHILD = r"""
import hashlib, json, os, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[2])
import apollo_sync
from apollo_sync import journal as gens
from conftest import randn, write_model

root = Path(sys.argv[1])
direct = sys.argv[3] == "direct"
live = {f"model.layers.{i}.mlp.weight": randn(512, 1024, seed=i) for i in range(6)}
live["model.norm.weight"] = randn(1024, dtype=torch.float32, seed=99)


def report(op):
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted(root.glob("*.safetensors"))}
    gen = gens.history(root).generation
    print(json.dumps({"op": op, "generation": gen, "digest": digest}), flush=True)
    assert sys.stdin.readline().strip() == "go"


def scattered(seed):  # a few elements in a few blocks: lowest bit flipped
    g = torch.Generator().manual_seed(seed)
    for t in live.values():
        v = t.view(-1).view(torch.int16 if t.element_size() == 2 else torch.int32)
        idx = torch.randint(0, v.numel(), (max(1, v.numel() // 2000),), generator=g)
        v[idx] ^= 1


def dense(seed, fraction=0.15):  # an optimizer step: every block, some elements
    g = torch.Generator().manual_seed(seed)
    for t in live.values():
        mask = torch.rand(t.shape, generator=g) < fraction
        t[mask] = (t[mask].float() * 1.01).to(t.dtype)


write_model(root, live, shards=2)
scattered(0); apollo_sync.sync(root, live); report("setup")
scattered(1); apollo_sync.sync(root, live, direct_io=direct); report("sync, scattered")
dense(2); apollo_sync.sync(root, live, direct_io=direct); report("sync, dense")
dense(3); apollo_sync.sync(root, live, durable=True); report("sync, durable")
gens.rollback(root, 2); report("rollback to 2")
dense(4); apollo_sync.sync(root, live, keep=2); report("sync that prunes")
scattered(5); apollo_sync.sync(root, live, direct_io=direct); report("sync, scattered")
"""


@dataclass
class Recording:
    base: bytes  # the disk when the recording started (generation 1 on it)
    stream: list[Entry]
    returned: list[int]  # entries recorded when each operation had returned
    generations: list[int]  # and the generation it made
    digests: dict[int, dict[str, str]]  # every generation's shards
    ops: list[str]


def record(work: Path, writes: str) -> Recording:
    """Runs the workload on a recording disk."""
    rec = Recording(b"", [], [], [], {}, [])
    with recording_ext4(work, size=32 << 20) as (disk, mnt):
        err_path = work / "child.stderr"
        with (
            open(err_path, "w") as err_file,
            subprocess.Popen(
                [sys.executable, "-c", CHILD, str(mnt / "model"), str(TESTS), writes],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err_file,
                text=True,
            ) as child,
        ):
            assert child.stdin is not None and child.stdout is not None
            for line in child.stdout:
                done = json.loads(line)
                if done["op"] == "setup":
                    os.sync()  # the first generation wholly on the disk before the recording
                    rec.base = disk.start()  # its background flush may still write: recorded
                gen = done["generation"]
                assert gen not in rec.digests, f"{done['op']} made no new generation"
                rec.returned.append(disk.mark() if rec.returned else 0)
                rec.generations.append(gen)
                rec.digests[gen] = done["digest"]
                rec.ops.append(f"{done['op']} -> generation {gen}")
                child.stdin.write("go\n")
                child.stdin.flush()
            child.stdin.close()
            assert child.wait(timeout=120) == 0, err_path.read_text()
        os.sync()  # the background flushes' writes, and ext4's own
        rec.stream = disk.stop()
    return rec


def cut_points(n: int, flushes: list[int], rng: random.Random) -> list[tuple[int, bool]]:
    """(prefix length, shuffle the unflushed tail): every flush, just before and
    after it, and random cuts; ``all``: every prefix, each also shuffled."""
    want = os.environ.get("APOLLO_SYNC_CRASH_STATES", "80")
    if want == "all":
        return [(i, False) for i in range(n + 1)] + [(i, True) for i in range(1, n + 1)]
    points = {(f, False) for f in flushes} | {(f + 1, False) for f in flushes} | {(n, False)}
    points |= {(rng.randint(1, n), rng.random() < 0.7) for _ in range(int(want))}
    return sorted(points)


def replay(
    rec: Recording, work: Path, rng: random.Random, recovered: Callable[[Path, str], int]
) -> None:
    """Rebuilds the disk at each cut point, mounts it, runs ``recover`` and asks
    ``recovered`` (the test's own checks) which generation the directory holds.
    That generation's shards must be there whole, no older than the last call that
    had returned before the cut; a longer prefix never recovers to an older one, and
    the cuts reach every generation the workload made."""
    stream = rec.stream
    flushes = [i for i, e in enumerate(stream) if e is FLUSH]
    assert flushes, "the recording holds no flush"
    image = work / "crash.img"
    seen: dict[int, int] = {}
    last_prefix_gen = 0
    for upto, shuffled in cut_points(len(stream), flushes, rng):
        image.write_bytes(crash_image(rec.base, stream, upto, rng if shuffled else None))
        where = f"cut after {upto} of {len(stream)} entries{' (tail shuffled)' if shuffled else ''}"
        with mounted(image, work / "replay") as mnt:
            root = mnt / "model"
            apollo_sync.recover(root)
            gen = recovered(root, where)
            assert gen in rec.digests, f"{where}: generation {gen} was never made"
            assert shards_digest(root) == rec.digests[gen], (
                f"{where}: the shards are not generation {gen} ({rec.ops})"
            )
            # what a call that had returned before the cut committed is never lost
            must = rec.generations[bisect_right(rec.returned, upto) - 1]
            assert gen >= must, f"{where}: generation {gen}, but {must} had returned"
        if not shuffled:
            assert gen >= last_prefix_gen, f"{where}: went back in time"
            last_prefix_gen = gen
        seen[gen] = seen.get(gen, 0) + 1
    assert last_prefix_gen == rec.generations[-1]
    assert set(seen) == set(rec.generations), f"generations reached: {seen}"
    print(
        f"\n{len(stream) - len(flushes)} writes and {len(flushes)} flushes recorded; "
        f"{sum(seen.values())} crash states, recovered to generations {dict(sorted(seen.items()))}"
    )


@pytest.mark.timeout(900)
@pytest.mark.parametrize("writes", ["cached", "direct"])
def test_every_recorded_power_cut_recovers_to_one_whole_generation(
    tmp_path: Path, writes: str
) -> None:
    """``cached``: in-place writes through the page cache (the default);
    ``direct``: ``direct_io=True`` for the syncs that allow it."""
    try:
        rec = record(tmp_path / "rec", writes)
    except Unavailable as e:
        pytest.skip(f"this machine cannot run a recording disk: {e}")
    writes = sum(e is not FLUSH for e in rec.stream)
    assert writes > 100, f"the recording caught too little: {len(rec.stream)} entries"

    def recovered(root: Path, where: str) -> int:
        h = gens.history(root)
        assert h.checkpoint == h.generation, f"{where}: recovered but not durable"
        assert max(gens.Layout(root).logs(), default=0) <= h.generation, f"{where}: a log left"
        return h.generation

    replay(rec, tmp_path, random.Random(12), recovered)


# --- two hosts committing together (apollo_sync.group) -------------------------------


def record_group(work: Path) -> Recording:
    """Two consumer processes (the hosts of tests/test_group.py, over loopback gloo)
    run three group syncs on one model directory of the recording disk."""
    import test_group as tg

    rec = Recording(b"", [], [], [], {}, [])
    with recording_ext4(work, size=32 << 20) as (disk, mnt):
        root = mnt / "model"
        live = tg.base(rows=512)
        tg.write_split(root, live)
        tg.step(live, seed=1)
        first = tg.save_live(work / "live1.safetensors", live)
        assert all(rc == 0 for rc, _, _ in tg.run_pair(root, [first]))
        rec.digests[1] = shards_digest(root)
        lives = []
        for gen, seed in enumerate((2, 3, 4), start=2):
            tg.step(live, seed=seed, hosts=(0, 1) if seed != 3 else (1,))
            lives.append(tg.save_live(work / f"live{gen}.safetensors", live))
            rec.digests[gen] = shards_digest(tg.write_split(work / f"truth{gen}", live))
        os.sync()
        rec.base = disk.start()
        rec.returned.append(0)
        rec.generations.append(1)
        rec.ops.append("group generation 1 (before the recording)")
        port = tg.free_port()
        children = [tg.spawn(root, port, h, lives) for h in range(2)]
        seen: list[dict[int, int]] = [{}, {}]  # per host: generation -> mark
        errors: list[str] = ["", ""]

        def read(h: int) -> None:
            c = children[h]
            assert c.stdout is not None and c.stderr is not None
            with c.stdout, c.stderr:
                for line in c.stdout:
                    if line.startswith("{"):
                        seen[h][json.loads(line)["generation"]] = disk.mark()
                errors[h] = c.stderr.read()

        readers = [threading.Thread(target=read, args=(h,)) for h in range(2)]
        for t in readers:
            t.start()
        for h, c in enumerate(children):
            assert c.wait(timeout=120) == 0, errors[h]
        for t in readers:
            t.join()
        assert sorted(seen[0]) == sorted(seen[1]) == [2, 3, 4], seen
        for gen in (2, 3, 4):  # returned on both hosts by then
            rec.returned.append(max(seen[0][gen], seen[1][gen]))
            rec.generations.append(gen)
            rec.ops.append(f"group sync -> generation {gen}")
        os.sync()
        rec.stream = disk.stop()
    return rec


@pytest.mark.timeout(900)
def test_power_cuts_under_two_hosts_leave_one_generation_everywhere(tmp_path: Path) -> None:
    """Shared storage loses power while two hosts sync one directory: after
    ``recover``, every shard holds the generation the group file says, every
    host's namespace agrees, and nothing a group sync had returned is lost."""
    from apollo_sync.group import read_group

    try:
        rec = record_group(tmp_path / "rec")
    except Unavailable as e:
        pytest.skip(f"this machine cannot run a recording disk: {e}")

    def recovered(root: Path, where: str) -> int:
        group = read_group(root)
        assert group is not None, f"{where}: the group file is gone"
        gen = group.committed
        for host in range(2):  # every host's namespace at the group's generation
            layout = gens.Layout(root, host)
            assert gens.load_state(layout).generation == gen, f"{where}: host {host}"
            assert max(layout.logs(), default=0) <= gen, f"{where}: host {host}: a log left"
        assert apollo_sync.history(root).checkpoint == gen, f"{where}: not durable"
        return gen

    replay(rec, tmp_path, random.Random(21), recovered)
