"""``apollo-sync watch``: a consumer process that stays running, keeps the
producer's handles open and syncs after each of its steps, in separate processes
as in production."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest

from apollo_sync import ModelDir, history, load_handles, watch
from apollo_sync.demo import Producer, make_demo_model
from apollo_sync.verify import mismatches


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "apollo_sync", "watch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def _line(proc: subprocess.Popen[str], timeout: float = 120.0) -> str:
    """The watcher's next output line (fails instead of hanging)."""
    out: IO[str] | None = proc.stdout
    assert out is not None
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([out], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            proc.kill()
            raise AssertionError(f"no output from the watcher in {timeout} s")
        line = out.readline()
        if line:
            return line
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"the watcher exited ({proc.wait()}) early:\n{err}")


def _files_equal_live(model: Path, handles: Path) -> None:
    with load_handles(handles) as h:
        assert mismatches(ModelDir.open(model), h.tensors) == []


def test_watch_syncs_after_each_producer_step(tmp_path: Path) -> None:
    model = make_demo_model(tmp_path / "model", size_mb=16, shards=2)
    handles = tmp_path / "run" / "handles.pt"
    with Producer(model, handles, fraction=0.01, step_counter=True) as prod:
        proc = _start("--handles", str(handles), "--count", "3", "--json")
        try:
            first: dict[str, Any] = json.loads(_line(proc))
            assert first["total_changed"] == 0 and first["generation"] is None
            results = []
            for _ in range(2):
                blocks = prod.step()  # returns once the step is done (counter even)
                results.append(json.loads(_line(proc)))
                assert 0 < results[-1]["total_changed"] <= blocks * 4096
                _files_equal_live(model, handles)
            assert [r["generation"] for r in results] == [1, 2]
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err  # --count 3 reached
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert [g.number for g in history(model).history] == [1, 2]


def test_watch_stops_when_the_producer_exits(tmp_path: Path) -> None:
    model = make_demo_model(tmp_path / "model", size_mb=8, shards=1)
    handles = tmp_path / "run" / "handles.pt"
    with Producer(model, handles, fraction=0.01) as prod:  # no step counter: on a timer
        proc = _start("--handles", str(handles), "--interval", "0.2")
        try:
            assert "no change" in _line(proc)
            prod.step()
            while "generation 1" not in (line := _line(proc)):
                assert "no change" in line
            _files_equal_live(model, handles)
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
    # the producer has exited: the watcher notices and ends normally
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped (producer exited)" in out and "at generation 1" in out


def test_watch_refuses_bad_arguments_before_opening_anything(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(ValueError, match="interval"):
        watch(tmp_path, handles=missing, interval=0)
    with pytest.raises(ValueError, match="count"):
        watch(tmp_path, handles=missing, count=0)
