"""The whole promise, proven with transformers on tiny real models.

For each architecture: a random model saved with ``save_pretrained`` (sharded);
live tensors in vLLM's layout built from those files (merged ``qkv_proj`` with its
bias, ``gate_up_proj``, Qwen3.5's ``in_proj_qkvz`` / ``in_proj_ba``, fused MoE
experts, the vocabulary padded to a multiple of 64 with zero rows, no ``lm_head``
when tied); a fresh transformers model built on :func:`apollo_sync.hf_views` of
them, as a training worker does; real optimizer steps on it, which change the
live tensors in place; a sync; and then ``from_pretrained`` of the directory must
give the trained model exactly: every parameter and the logits, and every file
must still load with ``safetensors``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import apollo_sync
from apollo_sync import ModelDir, hf_views, sync
from apollo_sync.verify import mismatches

transformers = pytest.importorskip("transformers")

VOCAB = 100  # padded to 128 by "vLLM"
FP32_IN_CHECKPOINT = ("linear_attn.A_log", "linear_attn.norm.weight")


def tiny_configs() -> dict[str, Any]:
    common: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    cfgs: dict[str, Any] = {
        "llama": transformers.LlamaConfig(**common, head_dim=8),
        "qwen2": transformers.Qwen2Config(**common, tie_word_embeddings=True),
        "qwen3_moe": transformers.Qwen3MoeConfig(
            **common,
            head_dim=8,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        ),
    }
    qwen35 = getattr(transformers, "Qwen3_5TextConfig", None)
    if qwen35 is not None:
        cfgs["qwen3_5"] = qwen35(
            **common,
            head_dim=8,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention"],
        )
    return cfgs


CONFIGS = tiny_configs()


def read_dir(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out |= load_file(f)  # every file must load with safetensors
    return out


def store_fp32(root: Path, names: tuple[str, ...]) -> None:
    """Rewrites the shards so that tensors ending in ``names`` are float32 with
    values bf16 cannot hold, as the official Qwen3.5 checkpoints store them."""
    g = torch.Generator().manual_seed(7)
    for f in sorted(root.glob("*.safetensors")):
        tensors = load_file(f)
        hit = [n for n in tensors if n.endswith(names)]
        if not hit:
            continue
        for n in hit:
            t = tensors[n].float()
            tensors[n] = t + t.abs().clamp(min=1e-3) * torch.rand(t.shape, generator=g) * 1e-3
        save_file(tensors, str(f), metadata={"format": "pt"})


def to_vllm(hf: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as vLLM holds them at tensor-parallel size 1."""
    out: dict[str, torch.Tensor] = {}
    merged = {
        r"(.*)\.self_attn\.q_proj\.(weight|bias)$": (
            r"\1.self_attn.qkv_proj.\2",
            ("q_proj", "k_proj", "v_proj"),
        ),
        r"(.*)\.mlp\.gate_proj\.weight$": (r"\1.mlp.gate_up_proj.weight", ("gate_proj", "up_proj")),
        r"(.*)\.linear_attn\.in_proj_qkv\.weight$": (
            r"\1.linear_attn.in_proj_qkvz.weight",
            ("in_proj_qkv", "in_proj_z"),
        ),
        r"(.*)\.linear_attn\.in_proj_b\.weight$": (
            r"\1.linear_attn.in_proj_ba.weight",
            ("in_proj_b", "in_proj_a"),
        ),
    }
    consumed: set[str] = set()
    for name in hf:
        for pattern, (target, parts) in merged.items():
            if re.match(pattern, name):
                names = [name.replace(f".{parts[0]}.", f".{p}.") for p in parts]
                out[re.sub(pattern, target, name)] = torch.cat([hf[n] for n in names])
                consumed |= set(names)
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in hf.items():
        m = re.match(r"(.*\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = t
            consumed.add(name)
    for base, by_expert in experts.items():
        ids = sorted(by_expert)
        out[base + "w13_weight"] = torch.stack(
            [torch.cat([by_expert[e]["gate_proj"], by_expert[e]["up_proj"]]) for e in ids]
        )
        out[base + "w2_weight"] = torch.stack([by_expert[e]["down_proj"] for e in ids])
    for name, t in hf.items():
        if name in consumed:
            continue
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            pad = torch.zeros(-(-t.shape[0] // 64) * 64 - t.shape[0], t.shape[1], dtype=t.dtype)
            t = torch.cat([t, pad])
        if name.endswith(FP32_IN_CHECKPOINT):
            t = t.to(torch.bfloat16)  # norm.weight is bf16 in vLLM (A_log too in older builds)
        out[name] = t.clone()
    if arch == "qwen3_5":  # the multimodal model's text tower
        out = {"language_model." + k: v for k, v in out.items()}
    return {k: v.contiguous() for k, v in out.items()}


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
        ],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_train_on_views_sync_and_reload(tmp_path: Path, arch: str, device: str) -> None:
    cfg = CONFIGS[arch]
    torch.manual_seed(0)
    saved = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    root = tmp_path / arch
    saved.save_pretrained(root, max_shard_size="20KB")
    if arch == "qwen3_5":
        store_fp32(root, FP32_IN_CHECKPOINT)
    before = read_dir(root)
    assert len(list(root.glob("*.safetensors"))) > 1
    live = {k: v.to(device) for k, v in to_vllm(before, arch).items()}
    assert not any("lm_head" in n for n in live) or not cfg.tie_word_embeddings

    # the training worker: a transformers model whose parameters are views into vLLM's
    views = hf_views(live, root, experts="fused")
    if arch == "qwen3_5":
        assert sorted(views.dtype_differs) == sorted(
            n for n in before if n.endswith(FP32_IN_CHECKPOINT)
        )
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).to(device)
    missing, unexpected = model.load_state_dict(views, strict=False, assign=True)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if cfg.tie_word_embeddings:
        model.tie_weights()
    live_ptrs = {
        (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in live.values()
    }
    for name, p in model.named_parameters():
        assert (p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) in live_ptrs, name
    snapshot = {k: v.clone() for k, v in live.items()}

    frozen = [n for n, p in model.named_parameters() if n.endswith("0.linear_attn.norm.weight")]
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (2, 12), generator=g).to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    # the training reached every one of vLLM's tensors but the frozen one
    unchanged = [k for k in live if torch.equal(live[k], snapshot[k])]
    assert [k.removeprefix("language_model.") for k in unchanged] == frozen
    for k, t in live.items():
        if k.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert not t[VOCAB:].any(), "training must not touch vLLM's padding rows"

    result = sync(root, live)
    assert result.tensors_missing == 0 and result.total_changed > 0
    assert (
        mismatches(ModelDir.open(root), {k: apollo_sync.from_torch(k, v) for k, v in live.items()})
        == []
    )

    after = read_dir(root)
    assert set(after) == set(before)
    for n in frozen:  # a float32 tensor training did not change keeps its bits
        assert torch.equal(after[n].view(torch.int32), before[n].view(torch.int32))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(root, dtype=torch.bfloat16)
    reloaded = reloaded.to(device)
    trained = model.state_dict()
    for name, t in reloaded.state_dict().items():
        assert torch.equal(t, trained[name]), name
    model.eval()
    reloaded.eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=g).to(device)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    again = sync(root, live)
    assert again.total_changed == 0 and again.bytes_written == 0


def test_refused_live_tensors_give_no_views(tmp_path: Path) -> None:
    cfg = CONFIGS["llama"]
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(
        tmp_path
    )
    live = to_vllm(read_dir(tmp_path), "llama")
    live["model.layers.0.mlp.down_proj.weight_scale"] = torch.ones(1)
    with pytest.raises(apollo_sync.RefusedError, match="quantization parameter"):
        hf_views(live, tmp_path)
    live.pop("model.layers.0.mlp.down_proj.weight_scale")
    key = "model.layers.0.self_attn.qkv_proj.weight"
    live[key] = live[key].t().contiguous().t()
    with pytest.raises(apollo_sync.LayoutError, match="not contiguous"):
        hf_views(live, tmp_path)
