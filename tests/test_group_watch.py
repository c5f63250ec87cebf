"""A group's watches agree on the training step (apollo_sync.watch with group=):
two host processes over loopback gloo, each following its own producer process
(shared memory and a step counter, exported with ``export_handles``), each
writing its own shard of one model directory.

A producer writes its step into its tensors deterministically, so the files of
step S are computable here (:func:`truth`); every generation a watch reports is
checked, byte for byte and on both hosts' files, against one step."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import cache
from pathlib import Path
from typing import IO, Any

import pytest
import torch

import apollo_sync
from apollo_sync import journal as gens
from apollo_sync.errors import GroupError
from apollo_sync.group import read_group
from apollo_sync.watch import Plan, agree
from test_group import base, free_port, names_of, write_split

TIMEOUT = 20.0  # the group's timeout: no wait in these tests may come near it
#: The children import the apollo_sync under test and these tests' helpers.
PYTHONPATH = os.pathsep.join(
    [str(Path(apollo_sync.__file__).parents[1]), str(Path(__file__).parent)]
)
FILES = [f"model-0000{h + 1}-of-00002.safetensors" for h in range(2)]


def apply_step(t: dict[str, torch.Tensor], host: int, k: int, half: int | None = None) -> None:
    """Step ``k`` of ``host``'s producer: a few elements of each of its tensors set
    to ``k`` (the first or second ``half`` of its tensors only, when given)."""
    names = names_of(host)
    for i, n in enumerate(names):
        if half is not None and (i < len(names) // 2) != (half == 0):
            continue
        flat = t[n].view(-1)
        g = torch.Generator().manual_seed(k * 1000 + host * 100 + i)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 500),), generator=g)
        flat[idx] = float(k)


@cache
def truth(tmp: Path, s: int) -> dict[str, str]:
    """sha256 of each shard file when both producers are at step ``s``."""
    t = base()
    for k in range(1, s + 1):
        for h in range(2):
            apply_step(t, h, k)
    root = write_split(tmp / f"truth{s}", t)
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in FILES}


def digests(root: Path) -> dict[str, str]:
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in FILES}


def producer_main(root: str, host: int, handles: str, counter_path: str, trigger: str) -> None:
    """A producer (run as ``python test_group_watch.py producer ...``): holds its
    host's tensors in shared memory and steps them on request (``step DELAY``:
    half its tensors, DELAY seconds inside the step, the other half), or when
    ``trigger`` appears (a step taken during a sync). ``counter_path`` ``-``:
    no step counter."""
    from apollo_sync import export_handles
    from apollo_sync.steps import StepCounter

    live = {n: v.clone() for n, v in base().items() if n in names_of(host)}
    counter = None if counter_path == "-" else StepCounter.create(counter_path)
    export_handles(live, handles, metadata={"model_path": root}, step_counter=counter)
    lock = threading.Lock()
    done = 0

    def step(delay: float) -> int:
        nonlocal done
        with lock, counter.step(cuda_sync=False) if counter else contextlib.nullcontext():
            done += 1
            apply_step(live, host, done, half=0)
            time.sleep(delay)
            apply_step(live, host, done, half=1)
        return done

    def on_trigger() -> None:
        while True:
            if os.path.exists(trigger):
                os.unlink(trigger)
                step(0.0)
            time.sleep(0.002)

    threading.Thread(target=on_trigger, daemon=True).start()
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            print(json.dumps({"step": step(float(cmd[1]))}), flush=True)
    finally:
        if counter is not None:
            counter.unlink()
            counter.close()


WATCH = """
import hashlib, importlib, json, sys, time
from pathlib import Path
import apollo_sync
from apollo_sync.group import Group
from apollo_sync.steps import StepCounter
root, rank, port, handles = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
opts = json.loads(sys.argv[5])
torn = opts.pop("torn", None)
if torn is not None:  # the producer steps inside the sync of step torn["at"] (counter value)
    engine = importlib.import_module("apollo_sync.sync")  # the module, not the function
    counter, real, done = StepCounter.open(torn["counter"]), engine._run, []
    def run(*a, **k):
        if not done and counter.value() == torn["at"]:
            done.append(1)
            Path(torn["trigger"]).touch()
            deadline = time.monotonic() + 20
            while counter.value() < torn["at"] + 2 and time.monotonic() < deadline:
                time.sleep(0.002)
        return real(*a, **k)
    engine._run = run
def digests():
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob("*.safetensors"))}
def on_sync(r):
    print(json.dumps({"generation": r.generation, "step": r.step, "digests": digests()}),
          flush=True)
def on_torn(e):
    print(json.dumps({"torn": str(e).splitlines()[0]}), flush=True)
group = Group(rank, 2, f"tcp://127.0.0.1:{port}", timeout=opts.pop("timeout"))
s = apollo_sync.watch(root, handles=handles, group=group, on_sync=on_sync, on_torn=on_torn,
                      **opts)
print(json.dumps({"stopped": s.reason, "syncs": s.syncs, "generation": s.generation,
                  "step": s.step, "torn": s.torn}), flush=True)
"""


class Proc:
    """A child process with line-buffered pipes, read with a timeout (a hang fails)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.p = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})},
            cwd=Path(__file__).parent,
        )
        self.lines: list[Any] = []
        self._out: queue.Queue[str | None] = queue.Queue()
        self._err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.p.stdout, self._out.put), daemon=True),
            threading.Thread(
                target=self._read, args=(self.p.stderr, self._err.append), daemon=True
            ),
        ]
        for r in self._readers:
            r.start()

    @staticmethod
    def _read(pipe: IO[str] | None, put: Callable[[Any], None]) -> None:
        assert pipe is not None
        for raw in pipe:
            put(raw)
        put(None)

    def line(self, timeout: float = 15.0) -> Any:
        """Its next output line (JSON, or ``ready``)."""
        try:
            raw = self._out.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output from {self.name} in {timeout} s") from None
        if raw is None:
            raise AssertionError(f"{self.name} exited ({self.p.wait()}):\n{self.err()}")
        got = "ready" if raw.strip() == "ready" else json.loads(raw)
        self.lines.append(got)
        return got

    @property
    def name(self) -> str:
        return " ".join(map(str, self.p.args[1:3]))[:60]

    def send(self, cmd: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()

    def err(self) -> str:
        self._readers[1].join(5)
        return "".join(x for x in self._err if x is not None)

    def finish(self, timeout: float = 15.0) -> tuple[int, list[Any], str]:
        """Its exit status, the rest of its output lines and its stderr (waits up
        to ``timeout``; a hang fails)."""
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.p.args[1:3]} still running after {timeout} s") from None
        self._readers[0].join(5)
        rest = []
        while (raw := self._out.get_nowait()) is not None:
            rest.append(json.loads(raw))
        self.lines += rest
        return self.p.returncode, rest, self.err()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        for r in self._readers:
            r.join(5)
        for pipe in (self.p.stdin, self.p.stdout, self.p.stderr):
            if pipe is not None:
                pipe.close()


class Pair:
    """Two hosts: each a producer and a watch following it."""

    def __init__(self, tmp: Path, stack: ExitStack, counters: bool = True) -> None:
        self.tmp, self.stack = tmp, stack
        self.root = write_split(tmp / "model", base())
        run = tmp / "run"
        run.mkdir()
        self.handles = [run / f"h{h}.pt" for h in range(2)]
        self.counters = [run / f"h{h}.step" for h in range(2)]
        self.triggers = [run / f"h{h}.trigger" for h in range(2)]
        self.producers = [
            self._start(
                [
                    "test_group_watch.py",
                    "producer",
                    str(self.root),
                    str(h),
                    str(self.handles[h]),
                    str(self.counters[h]) if counters else "-",
                    str(self.triggers[h]),
                ]
            )
            for h in range(2)
        ]
        for p in self.producers:
            assert p.line() == "ready"
        self.watches: list[Proc] = []

    def _start(self, args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(args, env)
        self.stack.callback(proc.kill)
        return proc

    def watch(
        self, opts: list[dict[str, Any]] | None = None, env: list[dict[str, str]] | None = None
    ) -> None:
        port = free_port()
        self.watches = [
            self._start(
                [
                    "-c",
                    WATCH,
                    str(self.root),
                    str(h),
                    str(port),
                    str(self.handles[h]),
                    json.dumps({"timeout": TIMEOUT, **(opts[h] if opts else {})}),
                ],
                (env or [{}, {}])[h],
            )
            for h in range(2)
        ]
        for w in self.watches:  # the first sync, which changes nothing
            first = w.line(30)
            assert first["generation"] is None, first

    def step(self, h: int, delay: float = 0.0) -> None:
        self.producers[h].send(f"step {delay}")

    def stepped(self, h: int) -> int:
        return int(self.producers[h].line()["step"])

    def until(self, step: int) -> None:
        """Reads both watches' records up to the sync of ``step`` (a step number),
        checking each generation as it comes (:func:`check_record`)."""
        for w in self.watches:
            while True:
                r = w.line()
                check_record(self.tmp, r)
                if r.get("step") == 2 * step:
                    break


@contextmanager
def pair(tmp: Path, counters: bool = True) -> Iterator[Pair]:
    with ExitStack() as stack:
        yield Pair(tmp, stack, counters)


def check_record(tmp: Path, r: Any) -> None:
    """A watch's report of a sync that committed a generation: the files, both
    hosts' shards, were those of both producers at the step it read."""
    if not isinstance(r, dict) or not r.get("digests") or r["generation"] is None:
        return
    assert r["step"] % 2 == 0, r
    at = {f: [s for s in range(8) if truth(tmp, s)[f] == d] for f, d in r["digests"].items()}
    assert r["digests"] == truth(tmp, r["step"] // 2), (
        f"generation {r['generation']} (step {r['step'] // 2}): the files are at steps {at}"
    )


def check_generations(tmp: Path, p: Pair) -> list[tuple[int, int]]:
    """Every generation both watches reported holds, in both hosts' files, the
    tensors of both producers at the one step it names; returns (generation,
    step number) in order, the same on both hosts."""
    seen = []
    for w in p.watches:
        syncs = [r for r in w.lines if isinstance(r, dict) and r.get("digests") and r["generation"]]
        for r in syncs:
            check_record(tmp, r)
        seen.append([(r["generation"], r["step"] // 2) for r in syncs])
    assert seen[0] == seen[1]
    assert [g for g, _ in seen[0]] == list(range(1, len(seen[0]) + 1))
    return seen[0]


def quit_producer(p: Pair, host: int) -> list[dict[str, Any]]:
    """Ends ``host``'s producer and checks that both watches stop cleanly, that
    host for its producer and the other naming it; returns their last lines."""
    p.producers[host].send("quit")
    ends = [w.finish() for w in p.watches]
    assert [rc for rc, _, _ in ends] == [0, 0], [err[-3000:] for _, _, err in ends]
    stops = [w.lines[-1] for w in p.watches]
    assert stops[host]["stopped"] == "producer exited", stops
    assert stops[1 - host]["stopped"] == f"host {host}: producer exited", stops
    return stops


def test_hosts_sync_only_the_step_every_producer_finished(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pair(tmp_path) as p:
        p.watch()
        # 1: host 1's producer lags inside the step
        p.step(0), p.step(1, 0.3)
        p.stepped(0), p.stepped(1)
        p.until(1)
        # 2, 3: host 0's producer runs a step ahead while host 1's is inside step 2,
        # then idles at step 2 a while (every host finished a step, not the same one)
        p.step(1, 0.4)
        p.step(0), p.stepped(0), p.step(0), p.stepped(0)
        p.stepped(1), time.sleep(0.3), p.step(1), p.stepped(1)
        p.until(3)
        # 4, 5: the other way round
        p.step(0, 0.4)
        p.step(1), p.stepped(1), p.step(1), p.stepped(1)
        p.stepped(0), time.sleep(0.3), p.step(0), p.stepped(0)
        p.until(5)
        # 6, then host 1's producer exits: both watches stop, step 6 synced
        p.step(0), p.step(1)
        p.stepped(0), p.stepped(1)
        stops = quit_producer(p, 1)
        assert stops[0]["step"] == stops[1]["step"] == 12
        gens_ = check_generations(tmp_path, p)
    steps = [s for _, s in gens_]
    assert steps[0] == 1 and 2 not in steps and 4 not in steps  # never both finished
    assert {3, 5} <= set(steps) and steps[-1] == 6 and steps == sorted(steps)
    g = read_group(p.root)
    assert g is not None and g.committed == gens_[-1][0]
    assert digests(p.root) == truth(tmp_path, 6)
    for h in range(2):
        assert gens.load_state(gens.Layout(p.root, h)).generation == g.committed
    print(f"generations {gens_}: {time.monotonic() - t0:.1f} s")


def test_a_step_during_the_sync_on_one_host_commits_nothing_anywhere(tmp_path: Path) -> None:
    with pair(tmp_path) as p:
        torn = {"at": 4, "counter": str(p.counters[1]), "trigger": str(p.triggers[1])}
        p.watch([{}, {"torn": torn}])
        p.step(0), p.step(1), p.stepped(0), p.stepped(1)
        p.until(1)
        # step 2: host 1's producer takes step 3 inside the group's sync of step 2
        p.step(0), p.step(1), p.stepped(0), p.stepped(1)
        for w in p.watches:
            r = w.line()
            assert "torn" in r, r  # on both hosts, nothing committed
        assert "at step 6" in p.watches[1].lines[-1]["torn"]
        assert "host 1: TornSyncError" in p.watches[0].lines[-1]["torn"]
        g = read_group(p.root)
        assert g is not None and g.committed == 1
        assert digests(p.root) == truth(tmp_path, 1)
        # host 0's producer catches up: step 3 is the next agreed one
        p.step(0), p.stepped(0)
        p.until(3)
        stops = quit_producer(p, 0)
        assert stops[0]["torn"] == stops[1]["torn"] == 1
        assert check_generations(tmp_path, p) == [(1, 1), (2, 3)]
    assert digests(p.root) == truth(tmp_path, 3)


def test_on_a_timer_every_host_follows_host_0s_schedule(tmp_path: Path) -> None:
    with pair(tmp_path, counters=False) as p:
        p.watch([{"interval": 0.3}, {"interval": 3600}])  # host 1's own would never come
        p.step(0), p.step(1), p.stepped(0), p.stepped(1)
        # a timer sync may overlap a step: read until host 0's schedule brings one
        # that finds nothing more to do on both hosts
        for w in p.watches:
            while True:
                r = w.line()
                if r.get("digests") and r["generation"] is None and len(w.lines) > 2:
                    break
        assert digests(p.root) == truth(tmp_path, 1)
        quit_producer(p, 0)
        syncs = [[r["generation"] for r in w.lines if r.get("digests")] for w in p.watches]
        assert syncs[0] == syncs[1] and len(syncs[1]) >= 3, syncs  # the same syncs, together
        g = read_group(p.root)
        assert g is not None and g.committed == max(n for n in syncs[0] if n is not None)


def test_the_hosts_agree_from_what_each_said() -> None:
    """:func:`apollo_sync.watch.agree`, the decision every host takes alike."""

    def said(step: int | None, **kw: Any) -> dict[str, Any]:
        return {"step": step, "fresh": False, "stop": None, "gone": False, "cuda": False,
                "due": False} | kw  # fmt: skip

    assert agree([said(4), said(4)], 2) == Plan(sync=True, step=4)
    assert not agree([said(4), said(4)], 4).sync  # synced already
    assert agree([said(4), said(4, fresh=True)], 4).sync  # handles opened afresh
    assert not agree([said(4), said(4)], 2, may_sync=False).sync  # count reached
    waiting = agree([said(6), said(5)], 4)
    assert not waiting.sync and waiting.stop is None
    assert waiting.waiting == "host 0 at 6, host 1 inside a step (at 5)"
    assert not agree([said(6), said(4)], 4).sync  # host 1 behind
    # stopping: asked by a host, or a producer gone (one last sync where safe)
    assert agree([said(4, stop="count"), said(4)], 2) == Plan(False, 4, {0: "count"})
    assert agree([said(4), said(4, gone=True)], 2) == Plan(True, 4, {1: "producer exited"})
    assert not agree([said(4), said(4, gone=True, cuda=True)], 2).sync
    assert agree([said(5, gone=True), said(4)], 2) == Plan(
        False, None, {0: "producer exited mid-step"}
    )
    assert agree([said(6), said(4, gone=True)], 2) == Plan(False, None, {1: "producer exited"})
    # timer mode: host 0's word
    assert agree([said(None, due=True), said(None)], None) == Plan(sync=True)
    assert not agree([said(None), said(None, due=True)], None).sync
    with pytest.raises(GroupError, match=r"host\(s\) 1 follow a producer's step counter"):
        agree([said(None), said(2)], None)


@pytest.mark.parametrize(
    ("victim", "how"),
    [(1, "SIGKILL between syncs"), (0, "prepared:2")],
)
def test_a_host_killed_mid_run_fails_the_other_and_recovery_leaves_one_step(
    tmp_path: Path, victim: int, how: str
) -> None:
    from apollo_sync._core import FAULTS

    if not how.startswith("SIGKILL") and not FAULTS:
        pytest.skip("needs the core's `faults` feature")
    env = [{}, {}]
    if not how.startswith("SIGKILL"):
        env[victim] = {"APOLLO_SYNC_CRASH_AT": how}  # killed once it prepared generation 2
    with pair(tmp_path) as p:
        p.watch(env=env)
        survivor = p.watches[1 - victim]
        p.step(0), p.step(1), p.stepped(0), p.stepped(1)
        p.until(1)
        p.step(0), p.step(1), p.stepped(0), p.stepped(1)
        if how.startswith("SIGKILL"):
            p.until(2)
            time.sleep(0.12)  # the watches are exchanging their counters
            p.watches[victim].p.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        rc, _, err = survivor.finish(timeout=TIMEOUT / 2)  # well within the group timeout
        took = time.monotonic() - t0
        assert p.watches[victim].p.wait(5) == -signal.SIGKILL
        assert rc != 0 and "GroupError" in err, err
        last = err.strip().splitlines()[-1]
        if victim == 1:
            assert "host 1 did not answer" in last and "restart the watch of host 1" in last, last
        else:
            assert "host 0 is gone" in last, last
        assert "apollo-sync recover" in last, last
    apollo_sync.recover(p.root)
    g = read_group(p.root)
    assert g is not None
    by_gen = {r["generation"]: r["step"] // 2 for r in survivor.lines if r.get("digests")}
    assert g.committed in by_gen, (g.committed, by_gen)
    assert digests(p.root) == truth(tmp_path, by_gen[g.committed])  # every shard, one step
    assert g.committed == (2 if victim == 1 else 1)
    for h in range(2):
        assert gens.load_state(gens.Layout(p.root, h)).generation == g.committed
    print(f"{how}: the survivor failed after {took:.2f} s")


if __name__ == "__main__" and sys.argv[1] == "producer":
    producer_main(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
