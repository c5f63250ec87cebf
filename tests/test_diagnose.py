"""``diagnose`` explains every live name that matches nothing, rule by rule."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from apollo_sync.diagnose import diagnose
from conftest import randn

Factory = Callable[..., Path]


def disk_layer() -> dict[str, torch.Tensor]:
    p = "model.language_model.layers.0."
    return {
        p + "self_attn.q_proj.weight": randn(16, 8),
        p + "self_attn.k_proj.weight": randn(8, 8),
        p + "mlp.experts.0.gate_proj.weight": randn(4, 8),
        p + "mlp.down_proj.weight": randn(8, 8),
        "model.language_model.norm.weight": randn(8),
    }


def test_unmatched_names_are_explained_by_the_nearest_rule(model_factory: Factory) -> None:
    root = model_factory(disk_layer())
    v = "language_model.model.layers.0."
    live = {
        # v_proj is missing on disk: the merged rule came nearest
        v + "self_attn.qkv_proj.weight": randn(32, 8),
        # no per-expert up_proj on disk: the expert rule names what it needed
        v + "mlp.experts.w13_weight": randn(1, 8, 8),
        # a prefix no rule knows: the similar disk name and the rule that would map it
        "text_model.layers.0.mlp.down_proj.weight": randn(8, 8),
        # nothing like it on disk
        "vision_tower.patch_embed.proj.weight": randn(8, 8),
        v + "mlp.down_proj.weight": randn(8, 8),
        "model.language_model.norm.weight": randn(8),
    }
    d = diagnose(root, tensors=live)
    assert not d.ok
    assert [n for n, _ in d.only_live] == list(live)[:4]
    qkv = d.explanations[v + "self_attn.qkv_proj.weight"]
    assert qkv == [
        "nearest rule: prefix language_model.model. -> model.language_model.; merged qkv_proj "
        "-> q_proj+k_proj+v_proj: on disk model.language_model.layers.0.self_attn.q_proj.weight, "
        "model.language_model.layers.0.self_attn.k_proj.weight; missing "
        "model.language_model.layers.0.self_attn.v_proj.weight"
    ]
    w13 = d.explanations[v + "mlp.experts.w13_weight"]
    assert w13 == [
        "nearest rule: prefix language_model.model. -> model.language_model.; experts.w13_weight "
        "-> experts.N.gate_proj+up_proj: on disk "
        "model.language_model.layers.0.mlp.experts.0.gate_proj.weight; missing "
        "model.language_model.layers.0.mlp.experts.0.up_proj.weight"
    ]
    odd = d.explanations["text_model.layers.0.mlp.down_proj.weight"]
    assert odd[0].startswith("no rule gets near")
    assert odd[1] == (
        "similar on disk: 'model.language_model.layers.0.mlp.down_proj.weight' (the same after "
        "the prefix; a rule text_model. -> model.language_model. would match it)"
    )
    vision = d.explanations["vision_tower.patch_embed.proj.weight"]
    assert vision[-1].startswith("nothing similar on disk")
    text = d.render()
    assert "missing model.language_model.layers.0.self_attn.v_proj.weight" in text
    assert "a rule text_model. -> model.language_model. would match it" in text


def test_tied_head_and_refusals_are_reported(model_factory: Factory) -> None:
    emb = randn(64, 8)
    root = model_factory({"model.embed_tokens.weight": emb})
    d = diagnose(root, tensors={"model.embed_tokens.weight": emb, "lm_head.weight": emb})
    assert d.ok and d.skipped and "tied" in d.skipped[0][1]
    d = diagnose(root, tensors={"model.embed_tokens.weight.weight_scale": torch.ones(1)})
    assert [k for _, k, _ in d.mismatched] == ["refused"]
    assert "quantization parameter" in d.render()
