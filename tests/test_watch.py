"""``apollo-sync watch``: a consumer process that stays running, keeps the
producer's handles open and syncs after each of its steps, in separate processes
as in production."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import pytest

from apollo_sync import ModelDir, ProducerGoneError, history, load_handles, watch
from apollo_sync.demo import Producer, make_demo_model
from apollo_sync.handles import Handles, _process_start, check_producer_alive
from apollo_sync.verify import mismatches
from watching import watch_process


def _line(proc: subprocess.Popen[str], timeout: float = 120.0) -> str:
    """The watcher's next output line (fails instead of hanging)."""
    out: IO[str] | None = proc.stdout
    assert out is not None
    ready, _, _ = select.select([out], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output from the watcher in {timeout} s")
    line = out.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"the watcher exited ({proc.wait()}) early:\n{err}")
    return line


def _rest(proc: subprocess.Popen[str], timeout: float = 60.0) -> tuple[str, str]:
    """The rest of the watcher's output once it has exited. Read through the pipes'
    text wrappers, not ``communicate``: a line the watcher wrote right after the one
    :func:`_line` read may already sit in the wrapper's buffer, which ``communicate``
    does not see (its output is small: waiting first cannot fill a pipe)."""
    proc.wait(timeout=timeout)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == 0, err
    return out, err


def _files_equal_live(model: Path, handles: Path) -> None:
    with load_handles(handles) as h:
        assert mismatches(ModelDir.open(model), h.tensors) == []


def test_watch_syncs_after_each_producer_step(tmp_path: Path) -> None:
    model = make_demo_model(tmp_path / "model", size_mb=16, shards=2)
    handles = tmp_path / "run" / "handles.pt"
    # an hour's interval: only the step counter can bring the syncs below
    args = ("--handles", str(handles), "--count", "3", "--json", "--interval", "3600")
    prod = Producer(model, handles, fraction=0.01, step_counter=True)
    with prod, watch_process(*args) as proc:
        first: dict[str, Any] = json.loads(_line(proc))
        assert first["total_changed"] == 0 and first["generation"] is None
        results = []
        for _ in range(2):
            blocks = prod.step()  # returns once the step is done (counter even)
            results.append(json.loads(_line(proc)))
            assert 0 < results[-1]["total_changed"] <= blocks * 4096
            _files_equal_live(model, handles)
        assert [r["generation"] for r in results] == [1, 2]
        out, _ = _rest(proc)  # --count 3 reached
        assert json.loads(out)["stopped"] == "count"
    assert [g.number for g in history(model).history] == [1, 2]


def test_watch_syncs_the_last_step_after_the_producer_exits(tmp_path: Path) -> None:
    model = make_demo_model(tmp_path / "model", size_mb=8, shards=1)
    handles = tmp_path / "run" / "handles.pt"
    prod = Producer(model, handles, fraction=0.01, step_counter=True)
    try:
        with watch_process("--handles", str(handles), "--interval", "3600") as proc:
            assert "no change" in _line(proc)
            os.kill(proc.pid, signal.SIGSTOP)  # it cannot see the step before the exit
            try:
                prod.step()
                with load_handles(handles) as h:  # a copy of the producer's last weights
                    last = {
                        k: replace(t, source=t.host_bytes().copy(), offset=0, file=None)
                        for k, t in h.tensors.items()
                    }
                prod.close()
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            out, _ = _rest(proc)
            assert "generation 1" in out and "stopped (producer exited)" in out
    finally:
        prod.close()
    assert mismatches(ModelDir.open(model), last) == []  # the last step reached the files


def test_watch_on_a_timer_stops_when_the_producer_exits(tmp_path: Path) -> None:
    model = make_demo_model(tmp_path / "model", size_mb=8, shards=1)
    handles = tmp_path / "run" / "handles.pt"
    prod = Producer(model, handles, fraction=0.01)  # no step counter: on a timer
    try:
        with watch_process("--handles", str(handles), "--interval", "0.2") as proc:
            assert "no change" in _line(proc)
            prod.step()
            # a timer sync may overlap the step: read until one finds nothing more to do
            gens = []
            while "no change" not in (line := _line(proc)) or not gens:
                if "generation" in line:
                    gens.append(int(line.split("generation ")[1].split(":")[0]))
            _files_equal_live(model, handles)
            prod.close()
            out, _ = _rest(proc)  # the producer has exited: the watcher ends normally
            assert "stopped (producer exited)" in out and f"at generation {gens[-1]}" in out
    finally:
        prod.close()


def test_an_exited_unreaped_producer_counts_as_gone(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    try:
        start = _process_start(child.pid)
        assert start is not None
        h = Handles(
            tensors={},
            metadata={"producer_pid": child.pid, "producer_start": start},
            path=tmp_path / "h.pt",
        )
        check_producer_alive(h)  # running
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.02)
        with pytest.raises(ProducerGoneError, match="exited"):
            check_producer_alive(h)  # a zombie: exited, not yet reaped
    finally:
        child.wait()


def test_watch_refuses_bad_arguments_before_opening_anything(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(ValueError, match="interval"):
        watch(tmp_path, handles=missing, interval=0)
    with pytest.raises(ValueError, match="count"):
        watch(tmp_path, handles=missing, count=0)
