"""vLLM merged layouts and name prefixes, mapped by what is on disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apollo_sync import LayoutError, ModelDir, from_torch, map_tensors, sync
from conftest import dir_digest, randn

Factory = Callable[..., Path]


def hf_layer(prefix: str, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    p = prefix + "layers.0."
    return {
        p + "self_attn.q_proj.weight": randn(96, 32, dtype=dtype, seed=1),  # gated: 2x head dim
        p + "self_attn.k_proj.weight": randn(16, 32, dtype=dtype, seed=2),
        p + "self_attn.v_proj.weight": randn(16, 32, dtype=dtype, seed=3),
        p + "self_attn.q_proj.bias": randn(96, dtype=dtype, seed=4),
        p + "self_attn.k_proj.bias": randn(16, dtype=dtype, seed=5),
        p + "self_attn.v_proj.bias": randn(16, dtype=dtype, seed=6),
        p + "mlp.gate_proj.weight": randn(80, 32, dtype=dtype, seed=7),
        p + "mlp.up_proj.weight": randn(80, 32, dtype=dtype, seed=8),
        p + "linear_attn.in_proj_qkv.weight": randn(64, 32, dtype=dtype, seed=9),
        p + "linear_attn.in_proj_z.weight": randn(24, 32, dtype=dtype, seed=10),
        p + "linear_attn.in_proj_b.weight": randn(6, 32, dtype=dtype, seed=11),
        p + "linear_attn.in_proj_a.weight": randn(6, 32, dtype=dtype, seed=12),
        prefix + "embed_tokens.weight": randn(50, 32, dtype=dtype, seed=13),
    }


def vllm_live(hf: dict[str, torch.Tensor], hf_prefix: str) -> dict[str, torch.Tensor]:
    p = hf_prefix + "layers.0."
    v = "language_model.model.layers.0."

    def cat(*names: str) -> torch.Tensor:
        return torch.cat([hf[p + n] for n in names]).clone()

    return {
        v + "self_attn.qkv_proj.weight": cat(*(f"self_attn.{x}_proj.weight" for x in "qkv")),
        v + "self_attn.qkv_proj.bias": cat(*(f"self_attn.{x}_proj.bias" for x in "qkv")),
        v + "mlp.gate_up_proj.weight": cat("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        v + "linear_attn.in_proj_qkvz.weight": cat(
            "linear_attn.in_proj_qkv.weight", "linear_attn.in_proj_z.weight"
        ),
        v + "linear_attn.in_proj_ba.weight": cat(
            "linear_attn.in_proj_b.weight", "linear_attn.in_proj_a.weight"
        ),
        "language_model.model.embed_tokens.weight": hf[hf_prefix + "embed_tokens.weight"].clone(),
    }


@pytest.mark.parametrize("hf_prefix", ["model.", "model.language_model."])
def test_merged_params_split_by_disk_rows_and_prefix_found_on_disk(
    model_factory: Factory, hf_prefix: str
) -> None:
    hf = hf_layer(hf_prefix)
    root = model_factory(hf, shards=2)
    live = vllm_live(hf, hf_prefix)
    # a training step lands in every part of every merged tensor
    for t in live.values():
        t.view(-1)[0] += 1
        t.view(-1)[-1] += 1
    m = map_tensors({k: from_torch(k, v) for k, v in live.items()}, ModelDir.open(root).tensors)
    assert not m.problems and not m.disk_only
    assert len(m.matches) == len(hf)
    r = sync(root, live)
    assert r.tensors_synced == len(hf)
    disk = {}
    for f in root.glob("*.safetensors"):
        disk |= load_file(f)
    p = hf_prefix + "layers.0."
    qkv = live["language_model.model.layers.0.self_attn.qkv_proj.weight"]
    assert torch.equal(disk[p + "self_attn.q_proj.weight"], qkv[:96])
    assert torch.equal(disk[p + "self_attn.k_proj.weight"], qkv[96:112])
    assert torch.equal(disk[p + "self_attn.v_proj.weight"], qkv[112:])
    bias = live["language_model.model.layers.0.self_attn.qkv_proj.bias"]
    assert torch.equal(disk[p + "self_attn.v_proj.bias"], bias[112:])
    ba = live["language_model.model.layers.0.linear_attn.in_proj_ba.weight"]
    assert torch.equal(disk[p + "linear_attn.in_proj_b.weight"], ba[:6])
    assert torch.equal(disk[p + "linear_attn.in_proj_a.weight"], ba[6:])
    gu = live["language_model.model.layers.0.mlp.gate_up_proj.weight"]
    assert torch.equal(disk[p + "mlp.up_proj.weight"], gu[80:])
    assert torch.equal(
        disk[hf_prefix + "embed_tokens.weight"], live["language_model.model.embed_tokens.weight"]
    )


def test_fused_tensor_on_disk_passes_through(model_factory: Factory) -> None:
    # Qwen3-Next stores in_proj_qkvz fused in the checkpoint: no split
    fused = {"model.layers.0.linear_attn.in_proj_qkvz.weight": randn(40, 8)}
    root = model_factory(fused)
    live = {"language_model.model.layers.0.linear_attn.in_proj_qkvz.weight": randn(40, 8, seed=9)}
    m = map_tensors({k: from_torch(k, v) for k, v in live.items()}, ModelDir.open(root).tensors)
    assert [x.disk.name for x in m.matches] == list(fused)
    assert "split" not in m.matches[0].rule
    sync(root, live)
    assert torch.equal(
        load_file(root / "model.safetensors")[next(iter(fused))], next(iter(live.values()))
    )


def test_lm_head_prefix(model_factory: Factory) -> None:
    root = model_factory({"lm_head.weight": randn(10, 4)})
    live = {"language_model.lm_head.weight": randn(10, 4, seed=3)}
    sync(root, live)
    assert torch.equal(
        load_file(root / "model.safetensors")["lm_head.weight"],
        live["language_model.lm_head.weight"],
    )


def test_rows_that_do_not_add_up_are_refused(model_factory: Factory) -> None:
    hf = hf_layer("model.")
    root = model_factory(hf)
    live = vllm_live(hf, "model.")
    key = "language_model.model.layers.0.mlp.gate_up_proj.weight"
    live[key] = torch.cat([live[key], live[key][:2]])
    digest = dir_digest(root)
    with pytest.raises(LayoutError, match=r"gate_up_proj.*80 \+ 80 = 160 rows.*162"):
        sync(root, live)
    assert dir_digest(root) == digest


def test_part_missing_on_disk_is_unmatched(model_factory: Factory) -> None:
    hf = hf_layer("model.")
    del hf["model.layers.0.self_attn.v_proj.weight"]
    root = model_factory(hf)
    live = vllm_live(hf_layer("model."), "model.")
    with pytest.raises(LayoutError, match="qkv_proj.weight: no tensor on disk named"):
        sync(root, live)
