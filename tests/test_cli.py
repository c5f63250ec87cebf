"""The command line, in separate processes: a producer holds live weights, the
CLI syncs them from another process through a handles file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from apollo_sync import ModelDir, load_handles
from apollo_sync.demo import Producer, make_demo_model
from apollo_sync.verify import mismatches
from conftest import dir_digest


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    p = subprocess.run(
        [sys.executable, "-m", "apollo_sync", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def producer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Producer]:
    root = tmp_path_factory.mktemp("cli")
    model = make_demo_model(root / "model", size_mb=24, shards=3)
    handles = root / "run" / "handles.pt"
    with Producer(model, handles, fraction=0.005) as prod:
        yield model, handles, prod


def test_two_process_sync_through_the_cli(producer: tuple[Path, Path, Producer]) -> None:
    model, handles, prod = producer
    first = json.loads(cli("sync", "--handles", str(handles), "--json").stdout)
    assert first["total_changed"] == 0 and first["tensors_missing"] == 0
    assert first["model_dir"] == str(model)  # from the handles metadata
    blocks = prod.step()
    out = json.loads(cli("sync", "--handles", str(handles), "--json").stdout)
    assert 0 < out["total_changed"] <= blocks * 4096
    assert out["bytes_written"] == out["total_changed"]
    assert out["files_changed"]
    with load_handles(handles) as h:
        assert mismatches(ModelDir.open(model), h.tensors) == []
    again = json.loads(cli("sync", "--handles", str(handles), "--json").stdout)
    assert again["total_changed"] == 0


def test_dry_run_and_human_output(producer: tuple[Path, Path, Producer]) -> None:
    model, handles, prod = producer
    prod.step()
    digest = dir_digest(model)
    out = cli("sync", "--handles", str(handles), "--model-dir", str(model), "--dry-run").stdout
    assert "would write" in out and "changed" in out
    assert dir_digest(model) == digest
    cli("sync", "--handles", str(handles))


def test_diagnose_table(producer: tuple[Path, Path, Producer]) -> None:
    _, handles, _ = producer
    out = cli("diagnose", "--handles", str(handles)).stdout
    assert "matched (disk tensors)" in out
    assert "qkv_proj.weight -> model.layers.0.self_attn.q_proj.weight" in out
    data = json.loads(cli("diagnose", "--handles", str(handles), "--json").stdout)
    assert data["ok"] and not data["only_live"] and not data["mismatched"]


def test_errors_are_one_line_and_nonzero(tmp_path: Path) -> None:
    p = cli(
        "sync", "--handles", str(tmp_path / "missing.pt"), "--model-dir", str(tmp_path), check=False
    )
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apollo-sync: error: HandlesError")
    verbose = cli("-v", "sync", "--handles", str(tmp_path / "missing.pt"), check=False)
    assert "Traceback" in verbose.stderr


def test_demo_trains_syncs_and_rolls_back(tmp_path: Path) -> None:
    """The default demo: real AdamW steps on a transformers model built on the
    producer's shared memory change a few percent of the elements but most blocks;
    every sync leaves files == live, and the rollback verifies."""
    pytest.importorskip("transformers")
    p = cli("demo", "--size-mb", "8", "--steps", "2", "--dir", str(tmp_path))
    lines = p.stdout.strip().splitlines()
    assert "adamw (lr 1e-05) steps of LlamaForCausalLM" in lines[0]
    head = re.split(r"\s{2,}", lines[1].strip())
    assert head[0] == "sync" and head[-1] == "files == live"
    rows = [dict(zip(head, re.split(r"\s{2,}", line.strip()), strict=True)) for line in lines[3:6]]
    assert [r["sync"] for r in rows] == ["initial", "step 1", "step 2"]
    assert [r["generation"] for r in rows] == ["-", "1", "2"]
    assert all(r["files == live"] == "yes" for r in rows)
    assert "undo journal" in head or "log" in head
    for r in rows[1:]:
        elements = float(re.search(r"\(([\d.]+)%\)", r["elements changed"])[1])  # type: ignore[index]
        blocks = float(r["4 KiB blocks changed"].rstrip("%"))
        assert 0 < elements < 20 and blocks > 50, r  # elements sparse, blocks not
        assert float(r["loss"]) > 0
    assert (
        "rollback to generation 1 (as generation 3): files equal what that sync wrote: yes;"
        in p.stdout
    )
    assert "and forward to 2 again: yes" in p.stdout
    assert "rollback to 2" in p.stdout and "<- current" in p.stdout  # the history


def test_demo_sparse_mode(tmp_path: Path) -> None:
    out = cli(
        "demo", "--mode", "sparse", "--size-mb", "8", "--steps", "2", "--dir", str(tmp_path)
    ).stdout
    assert "sparse updates to 0.50% of the 4 KiB blocks" in out
    assert "and forward to 2 again: yes" in out


@pytest.mark.parametrize("args", [[], ["sync"]], ids=["top", "sync"])
def test_help_states_the_readers_contract(args: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "apollo_sync", *args, "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    text = " ".join(out.split())
    assert "current through this host's page cache" in text
    assert "apollo-sync recover" in text and "at boot" in text
    assert "apollo_sync.reading(model_dir)" in text
