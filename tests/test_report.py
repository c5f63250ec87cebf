"""``apollo-sync report``: the fractions it gives are what real syncs changed,
counted independently by comparing the tensors before and after each step."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import apollo_sync
from apollo_sync import journal as gens
from apollo_sync.demo import make_demo_model
from apollo_sync.model_dir import ModelDir
from apollo_sync.report import change_report, heatmap, kind_of, render, row_of

#: The demo model's tensors by kind, spelled out here rather than taken from the
#: code under test.
DEMO_KINDS = {
    "self_attn.q_proj.weight": "attention",
    "self_attn.k_proj.weight": "attention",
    "self_attn.v_proj.weight": "attention",
    "self_attn.o_proj.weight": "attention",
    "mlp.gate_proj.weight": "mlp",
    "mlp.up_proj.weight": "mlp",
    "mlp.down_proj.weight": "mlp",
    "input_layernorm.weight": "norms",
    "post_attention_layernorm.weight": "norms",
    "model.norm.weight": "norms",
    "model.embed_tokens.weight": "embedding",
    "lm_head.weight": "embedding",
}


def demo_kind(name: str) -> str:
    return next(k for suffix, k in DEMO_KINDS.items() if name.endswith(suffix))


def demo_row(name: str) -> str:
    parts = name.split(".")
    if "layers" in parts:
        return f"L{parts[parts.index('layers') + 1]}"
    return "embed" if demo_kind(name) == "embedding" else "other"


def interior(md: ModelDir, name: str) -> np.ndarray:
    """Indices of the elements of ``name`` that lie in 4 KiB units of the shard
    holding no byte of another tensor (a rollback's log counts a run across a
    shared unit by bytes; a sync's counts each tensor's own elements)."""
    t = md.tensors[name]
    size = (t.end - t.start) // math.prod(t.shape)
    offsets = t.start + np.arange(math.prod(t.shape)) * size
    units = offsets // 4096
    return np.flatnonzero((units * 4096 >= t.start) & ((units + 1) * 4096 <= t.end))


def train_like(
    live: dict[str, torch.Tensor],
    md: ModelDir,
    rng: np.random.Generator,
    skip: set[str],
    *,
    anywhere: bool = False,
) -> dict[str, int]:
    """Changes a random fraction (different per tensor) of the elements of every
    tensor not in ``skip`` (the interior ones, unless ``anywhere``: then also
    those in units two tensors share); returns the elements that differ bitwise
    after, per tensor, counted by comparing copies."""
    changed = {}
    for name, t in live.items():
        before = t.clone()
        idx = np.arange(t.numel()) if anywhere else interior(md, name)
        if name not in skip and len(idx):  # a tensor smaller than a unit shares them all
            pick = rng.choice(idx, size=max(1, int(len(idx) * rng.uniform(0.001, 0.2))))
            t.view(-1)[torch.from_numpy(pick)] += 1.0
        diff = (before.view(torch.int16) != t.view(torch.int16)).sum().item()
        if diff:
            changed[name] = int(diff)
    return changed


def test_the_report_equals_an_independent_count_of_what_changed(tmp_path: Path) -> None:
    root = make_demo_model(tmp_path / "model", size_mb=8, shards=2)
    md = ModelDir.open(root)
    live = load_file(str(root / "model-00001-of-00002.safetensors")) | load_file(
        str(root / "model-00002-of-00002.safetensors")
    )
    rng = np.random.default_rng(0)
    truth = []  # per generation: elements changed per tensor
    for n in range(4):
        skip = {k for k in live if ".layers.1." in k} if n == 1 else set()  # a layer untouched
        if n == 2:
            skip |= {k for k in live if "embed" in k or "lm_head" in k}
        # syncs 1 and 2 change elements anywhere, units two tensors share too
        truth.append(train_like(live, md, rng, skip, anywhere=n < 2))
        assert apollo_sync.sync(root, live).generation == n + 1
    apollo_sync.rollback(root, 2)  # generation 5 undoes 3 and 4

    rep = change_report(root)
    assert rep.generations == [1, 2, 3, 4, 5]
    assert rep.labels == ["sync"] * 4 + ["rollback to 2"]
    numel = {k: t.numel() for k, t in live.items()}
    rows = ["embed", "L0", "L1", "L2", "other"]  # the 8 MB demo model has 3 layers
    assert {demo_row(k) for k in live} == set(rows)
    assert rep.rows == rows
    row_numel = {r: sum(n for k, n in numel.items() if demo_row(k) == r) for r in rows}
    kind_numel = {k: sum(n for t, n in numel.items() if demo_kind(t) == k) for k in rep.kinds}
    assert rep.row_elements == [row_numel[r] for r in rows]
    assert rep.kind_elements == [kind_numel[k] for k in rep.kinds]
    assert rep.model_elements == sum(numel.values())
    expected = [*truth, {}]
    for name in set(truth[2]) | set(truth[3]):  # the rollback undid both
        expected[4][name] = truth[2].get(name, 0) + truth[3].get(name, 0)
    for c, per_tensor in enumerate(expected):
        for r, row in enumerate(rows):
            want = sum(n for k, n in per_tensor.items() if demo_row(k) == row)
            assert rep.row_changed[r][c] == want, (row, c)
            assert rep.row_fraction[r][c] == pytest.approx(want / row_numel[row])
        for i, kind in enumerate(rep.kinds):
            want = sum(n for k, n in per_tensor.items() if demo_kind(k) == kind)
            assert rep.kind_changed[i][c] == want, (kind, c)
        assert rep.total_changed[c] == sum(per_tensor.values())
    assert rep.row_changed[rows.index("L1")][1] == 0  # the layer left alone
    assert rep.kind_changed[rep.kinds.index("embedding")][2] == 0

    text = render(rep)
    assert "L1" in text and "attention" in text and "rollbacks: 5 (rollback to 2)" in text
    out = subprocess.run(
        [sys.executable, "-m", "apollo_sync", "report", "--model-dir", str(root), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert json.loads(out)["row_changed"] == rep.row_changed

    # pruned generations keep their totals, not their per-tensor counts
    gens.wait_flushes(gens.Layout(root))
    apollo_sync.prune(root, keep=2)
    last3 = change_report(root, last=3)
    assert last3.generations == [3, 4, 5]
    assert all(row[0] is None for row in last3.row_changed)  # 3 was pruned
    assert last3.total_changed[0] == sum(truth[2].values())
    assert [row[1:] for row in last3.row_changed] == [row[3:] for row in rep.row_changed]
    assert "?" in render(last3)


def test_kinds_and_rows_of_other_architectures() -> None:
    assert kind_of("model.layers.3.mlp.experts.7.down_proj.weight") == "experts"
    assert kind_of("model.layers.3.mlp.experts.gate_up_proj") == "experts"
    assert kind_of("model.layers.3.mlp.gate.weight") == "experts"  # the router
    assert kind_of("model.layers.3.self_attn.q_norm.weight") == "norms"
    assert kind_of("model.language_model.layers.0.linear_attn.A_log") == "attention"
    assert kind_of("transformer.h.0.ln_1.weight") == "norms"
    assert kind_of("transformer.h.0.attn.c_attn.weight") == "attention"
    assert row_of("transformer.h.11.mlp.c_fc.weight") == ("transformer", 11)
    assert row_of("model.language_model.layers.5.mlp.up_proj.weight") == (
        "model.language_model",
        5,
    )
    assert row_of("mtp.layers.0.mlp.up_proj.weight") == ("mtp", 0)
    assert row_of("lm_head.weight") == ("embed", -1)
    assert row_of("model.norm.weight") == ("other", -1)


def test_the_heatmap_of_64_layers_and_100_generations_is_readable(tmp_path: Path) -> None:
    """A real 64-layer model, 100 real syncs: the PNG has room for every cell."""
    import matplotlib.image as mpimg  # `make install` installs it: not skipped when missing

    live = {}
    for i in range(64):
        live[f"model.layers.{i}.self_attn.o_proj.weight"] = torch.zeros(
            32, 64, dtype=torch.bfloat16
        )
        live[f"model.layers.{i}.mlp.up_proj.weight"] = torch.zeros(32, 64, dtype=torch.bfloat16)
    root = tmp_path / "model"
    root.mkdir()
    from safetensors.torch import save_file

    save_file(live, str(root / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    names = list(live)
    for n in range(100):
        for k in range(8):  # a few tensors a step, in the layers the step index picks
            t = live[names[(n * 8 + k * 13) % len(names)]]
            idx = torch.randint(0, t.numel(), (1 + n % 50,), generator=g)
            t.view(-1)[idx] += 1.0
        assert apollo_sync.sync(root, live, keep=100, undo_budget=1 << 30).generation == n + 1
    rep = change_report(root)
    assert len(rep.rows) == 64 and len(rep.generations) == 100
    png = heatmap(rep, tmp_path / "changes.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    img = mpimg.imread(png)
    height, width = img.shape[:2]
    assert height / (64 + 6) >= 10 and width / 100 >= 10  # pixels per cell, roughly
    assert float(np.std(img[..., :3])) > 0.05  # not one colour
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "apollo_sync",
            "report",
            "--model-dir",
            str(root),
            "--last",
            "30",
            "--png",
            str(tmp_path / "last30.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert "64 layer row(s) x 30 generation(s)" in cli.stdout
    assert (tmp_path / "last30.png").stat().st_size > 10_000


def test_a_missing_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = {"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 64, dtype=torch.bfloat16)}
    root = tmp_path / "model"
    root.mkdir()
    from safetensors.torch import save_file

    save_file(live, str(root / "model.safetensors"))
    live["model.layers.0.mlp.up_proj.weight"][0, 0] = 1
    apollo_sync.sync(root, live)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'apollo-sync\[report\]'"):
        heatmap(change_report(root), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
