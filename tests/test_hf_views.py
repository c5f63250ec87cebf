"""hf_views: HF-named tensors that alias vLLM's live memory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from apollo_sync import LayoutError, LiveTensor, from_torch, hf_views
from conftest import randn

Factory = Callable[..., Path]


def test_views_alias_merged_padded_and_fused_live_tensors(model_factory: Factory) -> None:
    p = "model.layers.0."
    disk = {
        "model.embed_tokens.weight": randn(100, 8, seed=1),
        p + "self_attn.q_proj.weight": randn(16, 8, seed=2),
        p + "self_attn.k_proj.weight": randn(8, 8, seed=3),
        p + "self_attn.v_proj.weight": randn(8, 8, seed=4),
        p + "linear_attn.A_log": torch.randn(4),  # float32 on disk
    }
    for e in range(2):
        disk[p + f"mlp.experts.{e}.gate_proj.weight"] = randn(4, 8, seed=10 + e)
        disk[p + f"mlp.experts.{e}.up_proj.weight"] = randn(4, 8, seed=20 + e)
    root = model_factory(disk)
    v = "language_model.model.layers.0."
    live = {
        "language_model.model.embed_tokens.weight": torch.zeros(128, 8, dtype=torch.bfloat16),
        v + "self_attn.qkv_proj.weight": randn(32, 8, seed=5),
        v + "linear_attn.A_log": randn(4, seed=6),
        v + "mlp.experts.w13_weight": randn(2, 8, 8, seed=7),
    }
    views = hf_views(live, root)
    assert set(views) == set(disk)
    assert views.dtype_differs == {p + "linear_attn.A_log": ("BF16", "F32")}
    assert views["model.embed_tokens.weight"].shape == (100, 8)
    up1 = views[p + "mlp.experts.1.up_proj.weight"]
    assert up1.shape == (4, 8)
    # writes through the views land in the live tensors, at the right rows
    up1.fill_(3)
    views[p + "self_attn.k_proj.weight"].fill_(5)
    views["model.embed_tokens.weight"][-1].fill_(7)
    w13 = live[v + "mlp.experts.w13_weight"]
    assert (w13[1, 4:] == 3).all() and not (w13[1, :4] == 3).any() and not (w13[0] == 3).any()
    qkv = live[v + "self_attn.qkv_proj.weight"]
    assert (qkv[16:24] == 5).all() and not (qkv[:16] == 5).any() and not (qkv[24:] == 5).any()
    emb = live["language_model.model.embed_tokens.weight"]
    assert (emb[99] == 7).all() and not emb[100:].any()

    fused = hf_views(live, root, experts="fused")
    assert fused[p + "mlp.experts.gate_up_proj"].data_ptr() == w13.data_ptr()
    assert not any(".experts.0." in n for n in fused)


def test_views_from_handles_style_live_tensors(model_factory: Factory) -> None:
    disk = {
        "model.layers.0.mlp.gate_proj.weight": randn(4, 8),
        "model.layers.0.mlp.up_proj.weight": randn(4, 8),
    }
    root = model_factory(disk)
    memory = torch.zeros(1000, dtype=torch.uint8)
    # what load_handles gives for CUDA handles: a LiveTensor over a uint8 torch tensor
    gate_up = LiveTensor(
        "model.layers.0.mlp.gate_up_proj.weight", "BF16", (8, 8), memory, offset=200
    )
    views = hf_views({gate_up.name: gate_up}, root)
    views["model.layers.0.mlp.up_proj.weight"].fill_(1.0)
    as_bf16 = memory[200 : 200 + 128].view(torch.bfloat16).view(8, 8)
    assert (as_bf16[4:] == 1).all() and not as_bf16[:4].any()
    assert not memory[:200].any() and not memory[328:].any()
    host = from_torch(gate_up.name, torch.zeros(8, 8, dtype=torch.bfloat16))  # numpy source
    with pytest.raises(LayoutError, match="mapped read-only"):
        hf_views({gate_up.name: host}, root)
