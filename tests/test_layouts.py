"""vLLM merged layouts and name prefixes, mapped by what is on disk."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apollo_sync import LayoutError, ModelDir, RefusedError, from_torch, map_tensors, sync
from apollo_sync.layouts import refusal
from apollo_sync.refusals import check_producer, producer_refusals
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


@pytest.mark.parametrize("fused", ["in_proj_qkvz", "in_proj"])
def test_gdn_projection_folded_with_b_and_a(model_factory: Factory, fused: str) -> None:
    hf = hf_layer("model.")
    root = model_factory(hf)
    p = "model.layers.0.linear_attn."
    parts = ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"]
    live = torch.cat([hf[p + f"{x}.weight"] for x in parts])
    live[-1] += 1  # the last row of a
    r = sync(root, {p + f"{fused}.weight": live})
    assert r.tensors_synced == 4
    got = load_file(root / "model.safetensors")
    assert torch.equal(got[p + "in_proj_a.weight"], live[-6:])
    assert torch.equal(got[p + "in_proj_qkv.weight"], live[:64])


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


# --- fused MoE experts -------------------------------------------------------------


def moe_disk(prefix: str, parts: tuple[str, str, str], experts: int = 4) -> dict[str, torch.Tensor]:
    gate, up, down = parts
    out = {}
    for e in range(experts):
        p = f"{prefix}experts.{e}."
        out[p + f"{gate}.weight"] = randn(12, 16, seed=100 + e)
        out[p + f"{up}.weight"] = randn(12, 16, seed=200 + e)
        out[p + f"{down}.weight"] = randn(16, 12, seed=300 + e)
    return out


def fused_experts(
    disk: dict[str, torch.Tensor], prefix: str, parts: tuple[str, str, str], experts: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up, down = parts
    w13 = torch.stack(
        [
            torch.cat(
                [
                    disk[f"{prefix}experts.{e}.{gate}.weight"],
                    disk[f"{prefix}experts.{e}.{up}.weight"],
                ]
            )
            for e in range(experts)
        ]
    )
    w2 = torch.stack([disk[f"{prefix}experts.{e}.{down}.weight"] for e in range(experts)])
    return w13, w2


@pytest.mark.parametrize(
    ("hf_prefix", "parts", "names"),
    [
        ("model.layers.0.mlp.", ("gate_proj", "up_proj", "down_proj"), ("w13_weight", "w2_weight")),
        ("model.layers.0.block_sparse_moe.", ("w1", "w3", "w2"), ("w13_weight", "w2_weight")),
        ("model.layers.0.block_sparse_moe.", ("w1", "w3", "w2"), ("ws", "w2s")),
    ],
)
def test_fused_experts_split_per_expert_gate_first(
    model_factory: Factory, hf_prefix: str, parts: tuple[str, str, str], names: tuple[str, str]
) -> None:
    disk = moe_disk(hf_prefix, parts)
    root = model_factory(disk, shards=2)
    w13, w2 = fused_experts(disk, hf_prefix, parts)
    w13[1, 3, 5] += 1  # gate rows of expert 1
    w13[2, 12 + 4, 0] += 1  # up rows of expert 2
    w2[3, -1, -1] += 1
    live = {hf_prefix + "experts." + names[0]: w13, hf_prefix + "experts." + names[1]: w2}
    r = sync(root, live)
    assert r.tensors_synced == len(disk)
    got: dict[str, torch.Tensor] = {}
    for f in root.glob("*.safetensors"):
        got |= load_file(f)
    gate, up, down = parts
    for e in range(4):
        p = f"{hf_prefix}experts.{e}."
        assert torch.equal(got[p + f"{gate}.weight"], w13[e, :12])
        assert torch.equal(got[p + f"{up}.weight"], w13[e, 12:])
        assert torch.equal(got[p + f"{down}.weight"], w2[e])
    assert not torch.equal(
        got[f"{hf_prefix}experts.1.{gate}.weight"], disk[f"{hf_prefix}experts.1.{gate}.weight"]
    )


def test_fused_experts_on_disk_pass_through(model_factory: Factory) -> None:
    # transformers' (and Qwen3.5-MoE's) fused 3-D experts: same shape as vLLM's
    disk = {
        "model.layers.0.mlp.experts.gate_up_proj": randn(4, 24, 16, seed=1),
        "model.layers.0.mlp.experts.down_proj": randn(4, 16, 12, seed=2),
    }
    root = model_factory(disk)
    live = {
        "model.layers.0.mlp.experts.w13_weight": randn(4, 24, 16, seed=3),
        "model.layers.0.mlp.experts.w2_weight": randn(4, 16, 12, seed=4),
    }
    m = map_tensors({k: from_torch(k, v) for k, v in live.items()}, ModelDir.open(root).tensors)
    assert sorted(x.disk.name for x in m.matches) == sorted(disk)
    sync(root, live)
    got = load_file(root / "model.safetensors")
    assert torch.equal(
        got["model.layers.0.mlp.experts.gate_up_proj"],
        live["model.layers.0.mlp.experts.w13_weight"],
    )
    assert torch.equal(
        got["model.layers.0.mlp.experts.down_proj"], live["model.layers.0.mlp.experts.w2_weight"]
    )


def test_fused_experts_stored_transposed_are_refused_even_when_square(
    model_factory: Factory,
) -> None:
    # Llama 4 / GPT-OSS store gate_up_proj as [E, H, 2I] and down_proj as [E, I, H];
    # with I == H, vLLM's w2 [E, H, I] has down_proj's shape but not its layout
    disk = {
        "model.layers.0.mlp.experts.gate_up_proj": randn(4, 16, 32, seed=1),
        "model.layers.0.mlp.experts.down_proj": randn(4, 16, 16, seed=2),
    }
    root = model_factory(disk)
    live = {
        "model.layers.0.mlp.experts.w13_weight": randn(4, 32, 16, seed=3),
        "model.layers.0.mlp.experts.w2_weight": randn(4, 16, 16, seed=4),
    }
    m = map_tensors({k: from_torch(k, v) for k, v in live.items()}, ModelDir.open(root).tensors)
    assert not m.matches and {p.kind for p in m.problems} == {"refused"}
    digest = dir_digest(root)
    with pytest.raises(RefusedError, match="would need a transpose"):
        sync(root, live)
    assert dir_digest(root) == digest


def test_an_untied_head_left_on_disk_is_warned_about(model_factory: Factory) -> None:
    disk = {"model.embed_tokens.weight": randn(64, 16), "lm_head.weight": randn(64, 16, seed=1)}
    root = model_factory(disk)  # no config.json: whether the model ties is unknown
    live = {"model.embed_tokens.weight": randn(64, 16, seed=2)}
    r = sync(root, live)
    assert r.total_changed > 0
    assert any("'lm_head.weight'" in w and "stale" in w for w in r.warnings)


@pytest.mark.parametrize(
    ("experts", "intermediate", "match"),
    [
        (2, 12, "holds 2 experts, the checkpoint 4: expert parallelism"),
        (5, 12, "holds 5 experts, the checkpoint 4"),
        (4, 16, "MoE kernel padded"),
    ],
)
def test_experts_that_do_not_match_are_refused(
    model_factory: Factory, experts: int, intermediate: int, match: str
) -> None:
    parts = ("gate_proj", "up_proj", "down_proj")
    root = model_factory(moe_disk("model.layers.0.mlp.", parts))
    digest = dir_digest(root)
    live = {"model.layers.0.mlp.experts.w13_weight": randn(experts, 2 * intermediate, 16)}
    with pytest.raises(RefusedError, match=match):
        sync(root, live)
    assert dir_digest(root) == digest


# --- shapes that differ on purpose --------------------------------------------------


def test_padded_vocab_writes_only_the_checkpoint_rows(model_factory: Factory) -> None:
    disk = {
        "model.embed_tokens.weight": randn(100, 8, seed=1),
        "lm_head.weight": randn(100, 8, seed=2),
    }
    root = model_factory(disk)
    live = {
        "model.embed_tokens.weight": torch.cat(
            [disk["model.embed_tokens.weight"], torch.zeros(28, 8, dtype=torch.bfloat16)]
        ),
        "lm_head.weight": torch.cat(
            [disk["lm_head.weight"], torch.zeros(28, 8, dtype=torch.bfloat16)]
        ),
    }
    live["model.embed_tokens.weight"][99] += 1
    live["lm_head.weight"][0] += 1
    r = sync(root, live)
    assert r.tensors_synced == 2
    got = load_file(root / "model.safetensors")
    assert torch.equal(got["model.embed_tokens.weight"], live["model.embed_tokens.weight"][:100])
    assert torch.equal(got["lm_head.weight"], live["lm_head.weight"][:100])


@pytest.mark.parametrize("rows", [128, 192])
def test_padding_rows_not_zero_or_not_vllm_padding_refused(
    model_factory: Factory, rows: int
) -> None:
    root = model_factory({"model.embed_tokens.weight": randn(100, 8)})
    digest = dir_digest(root)
    live = torch.zeros(rows, 8, dtype=torch.bfloat16)
    live[:100] = randn(100, 8)
    if rows == 128:
        live[127, 0] = 1.0  # vLLM fills padding rows with zeros
        match = "padding rows are not zero"
    else:
        match = r"live shape \[192, 8\]"  # not 100 rounded up to a multiple of 64
    with pytest.raises(LayoutError, match=match):
        sync(root, {"model.embed_tokens.weight": live})
    assert dir_digest(root) == digest


def test_tied_head_absent_on_disk_is_fine_only_when_equal(model_factory: Factory) -> None:
    emb = randn(64, 8)
    root = model_factory({"model.embed_tokens.weight": emb})
    live_emb = emb.clone()
    live_emb[3] += 1
    r = sync(root, {"model.embed_tokens.weight": live_emb, "lm_head.weight": live_emb})
    assert r.tensors_synced == 1 and not r.missing
    assert torch.equal(load_file(root / "model.safetensors")["model.embed_tokens.weight"], live_emb)
    with pytest.raises(LayoutError, match="lm_head.weight: no tensor on disk"):
        sync(root, {"model.embed_tokens.weight": live_emb, "lm_head.weight": live_emb + 1})


@pytest.mark.parametrize("tied", [True, False])
def test_tied_head_on_disk_only_follows_the_config(model_factory: Factory, tied: bool) -> None:
    disk = {
        "model.embed_tokens.weight": randn(100, 8, seed=1),
        "lm_head.weight": randn(100, 8, seed=1),
    }
    root = model_factory(disk)
    (root / "config.json").write_text(json.dumps({"text_config": {"tie_word_embeddings": tied}}))
    live = torch.cat([disk["model.embed_tokens.weight"], torch.zeros(28, 8, dtype=torch.bfloat16)])
    live[5] += 1
    r = sync(root, {"language_model.model.embed_tokens.weight": live})
    got = load_file(root / "model.safetensors")
    assert torch.equal(got["model.embed_tokens.weight"], live[:100])
    if tied:
        assert r.tensors_synced == 2 and torch.equal(got["lm_head.weight"], live[:100])
    else:
        assert r.tensors_on_disk_only == 1 and torch.equal(
            got["lm_head.weight"], disk["lm_head.weight"]
        )


def test_upcast_writes_only_elements_whose_live_value_changed(model_factory: Factory) -> None:
    # values that bf16 cannot hold: rounding them would change every one
    file32 = torch.randn(30000, generator=torch.Generator().manual_seed(0)) * 1.2345
    root = model_factory(
        {"model.layers.0.linear_attn.A_log": file32, "x": randn(4000, dtype=torch.float32)}
    )
    live = file32.to(torch.bfloat16)
    changed = [7, 15000, 29999]
    live[changed] += 1
    m = map_tensors(
        {"language_model.model.layers.0.linear_attn.A_log": from_torch("a", live)},
        ModelDir.open(root).tensors,
    )
    assert [x.kind for x in m.matches] == ["upcast"]
    r = sync(root, {"model.layers.0.linear_attn.A_log": live})
    got = load_file(root / "model.safetensors")["model.layers.0.linear_attn.A_log"]
    assert got.dtype == torch.float32
    keep = torch.ones(30000, dtype=torch.bool)
    keep[changed] = False
    assert torch.equal(got[keep].view(torch.int32), file32[keep].view(torch.int32))
    assert torch.equal(got[changed], live[changed].float())
    assert torch.equal(got.to(torch.bfloat16), live)
    # one 4 KiB block per changed element, of the 30 the tensor spans
    assert 1 <= sum(f.blocks_changed for f in r.files) <= len(changed)
    # an unchanged live tensor rewrites nothing
    again = sync(root, {"model.layers.0.linear_attn.A_log": live})
    assert again.total_changed == 0


# --- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("live", "match"),
    [
        ({"model.layers.0.mlp.gate_up_proj.weight_scale": torch.ones(2)}, "quantization parameter"),
        (
            {"model.layers.0.mlp.down_proj.qweight": torch.zeros(4, 2, dtype=torch.int32)},
            "quantization",
        ),
        ({"model.layers.0.mlp.down_proj.base_layer.weight": randn(8, 16)}, "LoRA"),
        ({"model.layers.0.mlp.down_proj.lora_a_stacked": randn(1, 8, 16)}, "LoRA"),
        (
            {"model.layers.0.mlp.down_proj.weight": randn(8, 16).to(torch.float8_e4m3fn)},
            "quantized or packed",
        ),
        (
            {"model.layers.0.mlp.gate_up_proj.weight": randn(24, 16).to(torch.float8_e4m3fn)},
            "quantized or packed",
        ),
    ],
)
def test_quantized_and_lora_refused_before_writing(
    model_factory: Factory, live: dict[str, torch.Tensor], match: str
) -> None:
    root = model_factory(
        {
            "model.layers.0.mlp.down_proj.weight": randn(8, 16),
            "model.layers.0.mlp.gate_proj.weight": randn(12, 16),
            "model.layers.0.mlp.up_proj.weight": randn(12, 16),
        }
    )
    digest = dir_digest(root)
    with pytest.raises(RefusedError, match=match):
        sync(root, {"model.layers.0.mlp.down_proj.weight": randn(8, 16, seed=5), **live})
    assert dir_digest(root) == digest


@pytest.mark.parametrize(
    "name",
    ["w13_weight_scale", "w2_qweight", "input_scale", "weight_scale_inv", "k_scale", "g_idx"],
)
def test_quantization_names_are_refused(name: str) -> None:
    assert "quantization parameter" in (refusal(f"model.layers.0.mlp.{name}") or "")


def test_float_parameters_named_like_scales_still_sync(model_factory: Factory) -> None:
    hf = {"vision.blocks.0.layer_scale": randn(8), "model.layers.0.attn.scale_emb": randn(8)}
    root = model_factory(hf)
    live = {k: v + 1 for k, v in hf.items()}
    assert refusal("vision.blocks.0.layer_scale") is None
    r = sync(root, live)
    assert r.tensors_synced == 2
    got = load_file(root / "model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in live.items())


def test_tensor_parallel_shard_is_explained(model_factory: Factory) -> None:
    hf = hf_layer("model.")
    root = model_factory(hf)
    live = vllm_live(hf, "model.")
    key = "language_model.model.layers.0.mlp.gate_up_proj.weight"
    live[key] = live[key][:80]
    with pytest.raises(LayoutError, match="1/2 of the rows: a tensor-parallel shard"):
        sync(root, live)


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"tensor_parallel_size": 2}, "tensor parallelism"),
        ({"quantization": "fp8"}, "quantization 'fp8'"),
        ({"lora_enabled": True}, "LoRA"),
        ({"expert_parallel": True}, "expert parallelism"),
        ({"moe_repacked": ["model.layers.0.mlp.experts: rocm_aiter_moe_enabled"]}, "reorders"),
    ],
)
def test_producer_metadata_refusals(meta: dict[str, object], match: str) -> None:
    assert producer_refusals({"tensor_parallel_size": 1, "quantization": None}) == []
    with pytest.raises(RefusedError, match=match):
        check_producer(meta)
