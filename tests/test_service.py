"""Running as a service: the systemd units and the cron line in docs/ parse and
say what the docs promise, and ``apollo-sync watch`` ends cleanly on SIGTERM
(a sync in progress finishes first) and opens its handles again on SIGHUP."""

from __future__ import annotations

import configparser
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any

import pytest

from apollo_sync import ModelDir, load_handles, status
from apollo_sync import journal as gens
from apollo_sync.cli import build_parser
from apollo_sync.demo import Producer, make_demo_model
from apollo_sync.verify import mismatches
from watching import watch_process

DOCS = Path(__file__).resolve().parent.parent / "docs"
UNITS = DOCS / "systemd"
EXE = "/usr/local/bin/apollo-sync"


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    cp.read(UNITS / name)
    return cp


def env_file() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in (UNITS / "apollo-sync.env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return dict(pairs)


def exec_args(command: str, env: dict[str, str]) -> list[str]:
    """ExecStart= as systemd splits it: ``$VAR`` becomes the variable's words."""
    words = []
    for word in shlex.split(command):
        m = re.fullmatch(r"\$\{?(\w+)\}?", word)
        words += env[m.group(1)].split() if m else [word]
    return words


@pytest.mark.parametrize(
    ("name", "command"),
    [("apollo-sync-watch.service", "watch"), ("apollo-sync-sync.service", "sync")],
)
def test_the_units_run_commands_the_cli_accepts(name: str, command: str) -> None:
    service = unit(name)["Service"]
    assert service["EnvironmentFile"] == "/etc/apollo-sync/apollo-sync.env"
    env = env_file()
    assert "APOLLO_SYNC_HANDLES" in env  # the handles path comes from the environment
    argv = exec_args(service["ExecStart"], env)
    assert argv[0] == EXE and argv[1] == command
    args = build_parser().parse_args(argv[1:])  # exits (fails the test) if it does not parse
    assert args.command == command and args.log_format == "json"
    if command == "watch":
        assert service["Restart"] == "on-failure"
        assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
        assert service["KillSignal"] == "SIGTERM" and args.metrics_port == 9464
    else:
        assert service["Type"] == "oneshot"
        assert args.metrics_textfile is not None and args.lock_timeout == 300
    timer = unit("apollo-sync-sync.timer")["Timer"]
    assert timer["OnCalendar"] == "*:0/10"


def test_the_cron_line_in_the_docs_parses() -> None:
    text = (DOCS / "OPERATIONS.md").read_text()
    (line,) = re.findall(r"^\*/10 \* \* \* \* .*$", text, flags=re.M)
    words = [w for w in shlex.split(line)[5:] if not re.match(r"\d?>", w)]  # no redirections
    assert words.pop(0).startswith("APOLLO_SYNC_HANDLES=")  # the handles path, for the command
    assert words[0] == EXE
    args = build_parser().parse_args(words[1:])
    # below the ten minutes between runs: at most one run waits for the lock
    assert args.command == "sync" and 300 <= args.lock_timeout < 600
    assert args.metrics_textfile is not None


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    """The units as systemd reads them (the executable put where it is installed
    here: verify checks that it exists)."""
    exe = shutil.which("apollo-sync") or sys.executable
    names = ["apollo-sync-watch.service", "apollo-sync-sync.service", "apollo-sync-sync.timer"]
    for name in names:
        (tmp_path / name).write_text((UNITS / name).read_text().replace(EXE, exe))
    p = subprocess.run(
        ["systemd-analyze", "verify", *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0 and p.stderr == "" and p.stdout == "", p.stderr


# --- signals ---------------------------------------------------------------------


def watcher(*args: str) -> AbstractContextManager[subprocess.Popen[str]]:
    return watch_process("--json", "--log-format", "json", *args)


def line(stream: IO[str] | None, timeout: float = 120.0) -> dict[str, Any]:
    assert stream is not None
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"nothing in {timeout} s"
    text = stream.readline()
    assert text, "the watcher exited early"
    record: dict[str, Any] = json.loads(text)
    return record


def until(stream: IO[str] | None, event: str) -> dict[str, Any]:
    """The next JSON log record of ``event`` (stderr)."""
    while (record := line(stream)).get("event") != event:
        pass
    return record


def test_sigterm_during_a_sync_lets_it_finish_then_ends_cleanly(tmp_path: Path) -> None:
    model = make_demo_model(tmp_path / "model", size_mb=8, shards=2)
    handles = tmp_path / "run" / "handles.pt"
    args = ("--handles", str(handles), "--interval", "3600")
    with Producer(model, handles, fraction=0.01, step_counter=True) as prod, watcher(*args) as w:
        assert line(w.stdout)["generation"] is None  # the first sync: nothing to do
        with gens.ModelLock(model):  # another writer: the next sync waits inside
            prod.step()
            until(w.stderr, "lock_wait")  # the sync has started and waits for the lock
            w.send_signal(signal.SIGTERM)
        assert line(w.stdout)["generation"] == 1  # it finished, committed
        assert line(w.stdout)["stopped"] == "stopped"  # then stopped
        assert w.wait(timeout=60) == 0
        with load_handles(handles) as h:
            assert mismatches(ModelDir.open(model), h.tensors) == []
    st = status(model, look_for_producer=False)
    assert st.generation == 1 and st.awaiting_recovery == []


def test_sighup_opens_the_handles_again(tmp_path: Path) -> None:
    model = make_demo_model(tmp_path / "model", size_mb=8, shards=1)
    handles = tmp_path / "run" / "handles.pt"
    # no step counter and an hour's interval: only the first sync, unless reopened
    args = ("--handles", str(handles), "--interval", "3600")
    with Producer(model, handles, fraction=0.01) as prod, watcher(*args) as w:
        until(w.stderr, "handles_opened")
        assert line(w.stdout)["generation"] is None
        prod.step()
        w.send_signal(signal.SIGHUP)
        until(w.stderr, "handles_opened")  # opened again ...
        assert line(w.stdout)["generation"] == 1  # ... and synced at once
        w.send_signal(signal.SIGTERM)
        end = line(w.stdout)
        assert (end["stopped"], end["reopened"], end["syncs"]) == ("stopped", 1, 2)
        assert w.wait(timeout=60) == 0
        with load_handles(handles) as h:
            assert mismatches(ModelDir.open(model), h.tensors) == []
    assert os.path.exists(model / ".apollo_sync" / "last_sync.json")
