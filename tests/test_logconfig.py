"""Logging: the library logs through ``logging.getLogger("apollo_sync")`` and never
prints; the command line shows the records as text or as JSON lines."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import apollo_sync
from apollo_sync import logconfig
from conftest import randn

Factory = Callable[..., Path]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apollo_sync", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
        timeout=240,
    )


def small() -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.mlp.up_proj.weight": randn(64, 256, seed=i) for i in range(3)}


def test_a_sync_logs_its_result_and_prints_nothing(
    model_factory: Factory, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    live = small()
    root = model_factory(live)
    live["model.layers.1.mlp.up_proj.weight"][3, :10] += 1
    with caplog.at_level(logging.INFO, logger="apollo_sync"):
        r = apollo_sync.sync(root, live)
        again = apollo_sync.sync(root, live)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # library code never prints
    syncs = [rec for rec in caplog.records if getattr(rec, "event", None) == "sync"]
    assert [rec.name for rec in syncs] == ["apollo_sync.sync"] * 2
    first, second = syncs
    assert (first.generation, first.outcome) == (1, "changed")  # type: ignore[attr-defined]
    assert first.bytes_changed == r.total_changed > 0  # type: ignore[attr-defined]
    assert first.elements_changed == r.elements_changed == 10  # type: ignore[attr-defined]
    assert first.log_bytes == r.log_bytes > 0  # type: ignore[attr-defined]
    assert (second.generation, second.outcome) == (None, "unchanged")  # type: ignore[attr-defined]
    assert again.generation is None


def test_warnings_of_a_sync_are_logged_too(
    model_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    # an untied LM head on disk, the embedding synced without it: a SyncResult warning
    disk = {
        "model.embed_tokens.weight": randn(64, 32, seed=1),
        "lm_head.weight": randn(64, 32, seed=2),
    }
    root = model_factory(disk)
    live = {"model.embed_tokens.weight": disk["model.embed_tokens.weight"].clone()}
    live["model.embed_tokens.weight"][0, 0] += 1
    with caplog.at_level(logging.WARNING, logger="apollo_sync"):
        r = apollo_sync.sync(root, live)
    assert r.warnings and "LM head is now stale" in r.warnings[0]
    logged = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert logged == r.warnings


def test_text_and_json_formatters() -> None:
    stream = io.StringIO()
    logconfig.configure(fmt="json", stream=stream)
    try:
        log = logging.getLogger("apollo_sync.test")
        log.info("generation %d", 7, extra={"event": "sync", "generation": 7})
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            log.exception("failed")
        log.debug("not shown")  # json defaults to INFO
        lines = stream.getvalue().splitlines()
        assert len(lines) == 2  # a traceback stays inside its line
        first, second = map(json.loads, lines)
        assert first["message"] == "generation 7" and first["generation"] == 7
        assert (first["level"], first["logger"], first["event"]) == ("info", log.name, "sync")
        assert second["level"] == "error" and "ValueError: boom" in second["exc"]
        stream.seek(0), stream.truncate()
        logconfig.configure(fmt="text", stream=stream)  # replaces the handler: one line each
        log.warning("careful")
        log.info("hidden at the default level")
        assert stream.getvalue() == "apollo-sync: warning: careful\n"
    finally:
        logger = logging.getLogger("apollo_sync")
        for h in list(logger.handlers):
            if getattr(h, "_apollo_sync_cli", False):
                logger.removeHandler(h)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


def test_levels() -> None:
    assert logconfig.level_for(0, 0) == logging.WARNING
    assert logconfig.level_for(1, 0) == logging.INFO
    assert logconfig.level_for(2, 0) == logging.DEBUG
    assert logconfig.level_for(0, 1) == logging.ERROR
    assert logconfig.level_for(0, 0, "json") == logging.INFO
    assert logconfig.level_for(2, 1, "json") == logging.ERROR


@pytest.mark.skipif(not apollo_sync._core.FAULTS, reason="needs the fault-injection build")
def test_the_cli_logs_json_lines_with_the_numbers_of_the_sync(
    model_factory: Factory, tmp_path: Path
) -> None:
    """A sync killed mid-write, then the command line's next sync: it logs the
    recovery (a warning) and the sync (with the numbers its --json result has),
    every stderr line one JSON object."""
    live = small()
    root = model_factory(live)
    for t in live.values():
        t[::2, ::3] += 1  # most blocks of every tensor, so there are several writes
    live_path = tmp_path / "live.safetensors"
    save_file(live, str(live_path))
    child = (
        "import sys, apollo_sync; from safetensors.torch import load_file; "
        "apollo_sync.sync(sys.argv[1], load_file(sys.argv[2]))"
    )
    killed = subprocess.run(
        [sys.executable, "-c", child, str(root), str(live_path)],
        env={**os.environ, "APOLLO_SYNC_CRASH_AT": "write:2"},
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL
    # the producer side: handles for the same tensors, from this process
    handles = tmp_path / "run" / "handles.pt"
    apollo_sync.export_handles(live, path=handles, metadata={"model_path": str(root)})
    p = cli("sync", "--handles", str(handles), "--json", "--log-format", "json")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    records = [json.loads(line) for line in p.stderr.splitlines()]
    recovered = [r for r in records if r.get("event") == "recovered"]
    assert len(recovered) == 1 and recovered[0]["level"] == "warning"
    assert recovered[0]["rolled_back"] == [1] == result["recovered"]
    (sync,) = [r for r in records if r.get("event") == "sync"]
    assert sync["generation"] == result["generation"] == 1
    assert sync["bytes_changed"] == result["total_changed"] > 0
    assert sync["elements_changed"] == result["elements_changed"]
    assert sync["log_bytes"] == result["log_bytes"]
    assert sync["bytes_compared"] == result["total_compared"]
    quiet = cli("-q", "sync", "--handles", str(handles))
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_cli_errors_stay_one_line_and_json_errors_are_records(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pt")
    text = cli("sync", "-q", "--handles", missing, "--model-dir", str(tmp_path))
    assert text.returncode == 1
    assert text.stderr.startswith("apollo-sync: error: HandlesError")
    assert len(text.stderr.strip().splitlines()) == 1
    js = cli("sync", "--log-format", "json", "--handles", missing, "--model-dir", str(tmp_path))
    assert js.returncode == 1
    (record,) = [json.loads(line) for line in js.stderr.splitlines()]
    assert record["level"] == "error" and record["error"] == "HandlesError"
    assert "exc" not in record  # tracebacks with -v only
    verbose = cli("sync", "-v", "--log-format", "json", "--handles", missing)
    assert "Traceback" in json.loads(verbose.stderr.splitlines()[-1])["exc"]
