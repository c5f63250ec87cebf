"""An independent model of how vLLM shards a Hugging Face checkpoint over ranks.

Written from vLLM's weight loaders (vllm-project/vllm, read at 0036d38de46c for
``linear.py``, 00db0119c376 for ``vocab_parallel_embedding.py``; ``FusedMoE``'s
``_load_w13`` / ``_load_w2`` and the Qwen3-Next / Qwen3.5 GDN constructors from
code-search excerpts whose commit the index did not name), not from
:mod:`apollo_sync.tp`: for each rank it builds a stand-in of the model vLLM
would hold, with vLLM's parameter names, vLLM's layer class names and the
attributes the worker extension reads, and fills each parameter the way the
named loader does:

* ``QKVParallelLinear.weight_loader``: q narrowed at ``tp_rank * shard``, k and v
  at ``(tp_rank // num_kv_head_replicas) * shard``, where ``num_kv_heads = 1``
  and ``num_kv_head_replicas = tp // total_num_kv_heads`` once ``tp >=
  total_num_kv_heads``; placed q, k, v one after the other;
* ``MergedColumnParallelLinear.weight_loader``: shard ``loaded_shard_id`` at
  ``sum(output_sizes[:id]) // tp``, narrowed at ``tp_rank * size // tp`` (gate/up;
  Qwen3.5's GDN ``in_proj_qkvz`` from ``in_proj_qkv`` (ids 0, 1, 2) and
  ``in_proj_z`` (3), ``in_proj_ba`` from ``in_proj_b`` and ``in_proj_a``);
* ``RowParallelLinear.weight_loader``: ``input_dim`` narrowed at ``tp_rank * shard``;
* ``VocabParallelEmbedding.weight_loader``: ``pad_vocab_size(vocab, 64)`` rows
  split evenly (``vocab_range_from_global_vocab_size``); the rank copies its
  ``org_vocab_start_index .. org_vocab_end_index`` rows and ``fill_(0)`` the rest;
* ``FusedMoE.weight_loader``: ``expert_map`` global to local (linear placement:
  contiguous blocks; round robin: ``e % ep``), ``_load_w13`` (gate in the first
  half, up in the second, each narrowed at ``tp_rank * shard`` on the output
  dimension), ``_load_w2`` (narrowed on the input dimension);
* ``mamba_v2_sharded_weight_loader([key, key, value])`` for the GDN ``conv1d``
  (each section narrowed at ``tp_rank * size // tp``) and
  ``sharded_weight_loader(0)`` for ``A_log`` and ``dt_bias``;
* everything else (norms, ``q_norm``/``k_norm``, the router ``gate``) is
  replicated whole on every rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

VOCAB_PADDING = 64  # DEFAULT_VOCAB_PADDING_SIZE


def pad_vocab_size(vocab: int, pad_to: int = VOCAB_PADDING) -> int:
    return -(-vocab // pad_to) * pad_to


# -- stand-ins named as vLLM's layer classes (the extension reads class names) --


class LinearBase(nn.Module):
    def __init__(self, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size


class ColumnParallelLinear(LinearBase):
    output_size: int


class MergedColumnParallelLinear(ColumnParallelLinear):
    output_sizes: list[int]


class QKVParallelLinear(ColumnParallelLinear):
    total_num_heads: int
    total_num_kv_heads: int
    head_size: int
    num_kv_head_replicas: int


class RowParallelLinear(LinearBase):
    pass


class ReplicatedLinear(LinearBase):
    pass


class VocabParallelEmbedding(nn.Module):
    org_vocab_size: int
    num_embeddings_padded: int
    tp_size: int


class ParallelLMHead(VocabParallelEmbedding):
    pass


class FusedMoE(nn.Module):
    local_num_experts: int
    global_num_experts: int
    expert_map: torch.Tensor | None
    intermediate_size_per_partition: int
    tp_rank: int
    tp_size: int


class GatedDeltaNet(nn.Module):
    key_dim: int
    value_dim: int
    num_v_heads: int
    tp_rank: int
    tp_size: int


def _param(t: torch.Tensor, **attrs: int) -> nn.Parameter:
    p = nn.Parameter(t.contiguous(), requires_grad=False)
    for k, v in attrs.items():
        setattr(p, k, v)  # set_weight_attrs
    return p


def _put(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Places ``module`` at dotted ``path`` (plain modules in between); returns it,
    or the module already there."""
    *parents, last = path.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    if hasattr(node, last):
        found: nn.Module = getattr(node, last)
        return found
    node.add_module(last, module)
    return module


@dataclass(frozen=True)
class Shape:
    """What the loaders need to know about the model."""

    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int = 0
    moe_inter: int = 0
    gdn_key_dim: int = 0  # linear_num_key_heads * linear_key_head_dim
    gdn_value_dim: int = 0
    gdn_v_heads: int = 0
    #: the live names of the multimodal Qwen3.5 model's text tower
    prefix: str = ""


@dataclass
class Rank:
    """One rank: its stand-in vLLM model and where it sits."""

    tp_rank: int
    pp_rank: int
    model: nn.Module
    names: list[str] = field(default_factory=list)


def _rows(t: torch.Tensor, dim: int, start: int, n: int) -> torch.Tensor:
    return t.narrow(dim, start, n)


def shard(
    hf: dict[str, torch.Tensor],
    shape: Shape,
    tp: int,
    *,
    pp: int = 1,
    layers: int = 1,
    ep: str | None = None,
) -> list[Rank]:
    """Every rank's stand-in model for checkpoint ``hf`` (HF names), in rank order
    (``pp_rank * tp + tp_rank``). ``pp`` stages take contiguous blocks of the
    ``layers`` layers, the embedding the first, the final norm and head the last
    (vLLM's ``get_pp_indices``). ``ep``: expert parallelism over the ``tp`` ranks
    (``"linear"`` or ``"round_robin"`` placement), MoE tensor-parallel size 1."""
    out = []
    for pp_rank in range(pp):
        lo, hi = pp_rank * layers // pp, (pp_rank + 1) * layers // pp
        for tp_rank in range(tp):
            root = nn.Module()
            r = Rank(tp_rank, pp_rank, root)
            for name in hf:
                m = re.search(r"\.layers\.(\d+)\.", name)
                if m is not None and not lo <= int(m[1]) < hi:
                    continue
                if m is None and "embed_tokens" in name and pp_rank != 0:
                    continue
                if m is None and "embed_tokens" not in name and pp_rank != pp - 1:
                    continue
                _load(root, name, hf, shape, tp_rank, tp, ep)
            r.names = [n for n, _ in root.named_parameters()]
            out.append(r)
    return out


def _load(
    root: nn.Module,
    name: str,
    hf: dict[str, torch.Tensor],
    s: Shape,
    rank: int,
    tp: int,
    ep: str | None,
) -> None:
    t = hf[name]
    live = s.prefix + name
    base, _, pname = live.rpartition(".")
    attn = re.match(r"(.*\.self_attn)\.(q|k|v)_proj\.(weight|bias)$", live)
    if attn:
        if attn[2] != "q":
            return  # loaded with q below
        layer: Any = _put(root, attn[1] + ".qkv_proj", QKVParallelLinear(rank, tp))
        reps = tp // s.kv_heads if tp >= s.kv_heads else 1
        # Qwen3-Next / Qwen3.5 gated attention builds QKVParallelLinear with
        # total_num_heads * (1 + attn_output_gate) heads: q rows are what count
        q_rows = hf[name.rsplit(".", 2)[0] + f".q_proj.{attn[3]}"].shape[0]
        layer.total_num_heads, layer.total_num_kv_heads = q_rows // s.head_dim, s.kv_heads
        layer.head_size, layer.num_kv_head_replicas = s.head_dim, reps
        hf_base = name.rsplit(".", 2)[0]
        parts = []
        for x in "qkv":
            full = hf[f"{hf_base}.{x}_proj.{attn[3]}"]
            shard_rank = rank if x == "q" else rank // reps
            n = full.shape[0] // tp if x == "q" else full.shape[0] * reps // tp
            parts.append(_rows(full, 0, shard_rank * n, n))
        layer.register_parameter(attn[3], _param(torch.cat(parts), output_dim=0))
        return
    merged = {
        "mlp.gate_proj": ("mlp.gate_up_proj", ("gate_proj", "up_proj")),
        "linear_attn.in_proj_qkv": ("linear_attn.in_proj_qkvz", ("in_proj_qkv", "in_proj_z")),
        "linear_attn.in_proj_b": ("linear_attn.in_proj_ba", ("in_proj_b", "in_proj_a")),
    }
    for first, (fused, parts_names) in merged.items():
        if base.endswith("." + first):
            owner = base[: -len(first)]
            hf_owner = owner[len(s.prefix) :]
            sources = [hf[f"{hf_owner}{first.rsplit('.', 1)[0]}.{p}.{pname}"] for p in parts_names]
            if fused.endswith("in_proj_qkvz"):  # output_sizes [key, key, value, value]
                q, k, v = sources[0].split([s.gdn_key_dim, s.gdn_key_dim, s.gdn_value_dim])
                sources = [q, k, v, sources[1]]
            layer = _put(root, owner + fused, MergedColumnParallelLinear(rank, tp))
            layer.output_sizes = [x.shape[0] for x in sources]
            pieces = [_rows(x, 0, rank * x.shape[0] // tp, x.shape[0] // tp) for x in sources]
            layer.register_parameter(pname, _param(torch.cat(pieces), output_dim=0))
            return
        if any(base.endswith("." + first.rsplit(".", 1)[0] + "." + p) for p in parts_names[1:]):
            return  # loaded with the first part
    if base.endswith("linear_attn.in_proj_z") or base.endswith("linear_attn.in_proj_a"):
        return
    row = re.search(r"\.(o_proj|down_proj|out_proj)$", base)
    if row and ".experts." not in base:
        layer = _put(root, base, RowParallelLinear(rank, tp))
        n = t.shape[1] // tp
        layer.register_parameter(pname, _param(_rows(t, 1, rank * n, n), input_dim=1))
        return
    if base.endswith(("embed_tokens", "lm_head")):
        cls = VocabParallelEmbedding if base.endswith("embed_tokens") else ParallelLMHead
        layer = _put(root, base, cls())
        padded = pad_vocab_size(t.shape[0])
        per = padded // tp
        start, end = min(rank * per, t.shape[0]), min((rank + 1) * per, t.shape[0])
        w = torch.zeros(per, *t.shape[1:], dtype=t.dtype)
        w[: end - start] = t[start:end]
        layer.org_vocab_size, layer.num_embeddings_padded, layer.tp_size = t.shape[0], padded, tp
        layer.register_parameter(pname, _param(w, output_dim=0))
        return
    expert = re.match(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", live)
    if expert:
        if expert[2] != "0" or expert[3] != "gate_proj":
            return  # every expert loaded with expert 0's gate
        _load_experts(root, expert[1], name, hf, s, rank, tp, ep)
        return
    gdn = re.match(r"(.*\.linear_attn)\.(conv1d\.weight|A_log|dt_bias)$", live)
    if gdn:
        mixer: Any = _put(root, gdn[1], GatedDeltaNet())
        mixer.key_dim, mixer.value_dim, mixer.num_v_heads = (
            s.gdn_key_dim,
            s.gdn_value_dim,
            s.gdn_v_heads,
        )
        mixer.tp_rank, mixer.tp_size = rank, tp
        if gdn[2] == "conv1d.weight":
            conv = _put(root, gdn[1] + ".conv1d", ColumnParallelLinear(rank, tp))
            sections = t.split([s.gdn_key_dim, s.gdn_key_dim, s.gdn_value_dim])
            pieces = [_rows(x, 0, rank * x.shape[0] // tp, x.shape[0] // tp) for x in sections]
            conv.output_size = t.shape[0]
            conv.register_parameter("weight", _param(torch.cat(pieces), output_dim=0))
        else:
            n = t.shape[0] // tp
            mixer.register_parameter(gdn[2], _param(_rows(t, 0, rank * n, n)))
        return
    # replicated: norms, q_norm / k_norm, the router
    cls = ReplicatedLinear if base.endswith(".gate") else nn.Module
    layer = _put(root, base, cls(rank, tp) if cls is ReplicatedLinear else cls())
    layer.register_parameter(pname, _param(t.clone()))


def expert_ids(experts: int, ep: int, rank: int, placement: str) -> list[int]:
    """Global ids of rank ``rank``'s local experts, in local order (vLLM's
    ``determine_expert_map``: linear blocks, or round robin)."""
    if placement == "round_robin":
        return list(range(rank, experts, ep))
    per = experts // ep
    return list(range(rank * per, (rank + 1) * per))


def _load_experts(
    root: nn.Module,
    owner: str,
    name: str,
    hf: dict[str, torch.Tensor],
    s: Shape,
    rank: int,
    tp: int,
    ep: str | None,
) -> None:
    hf_owner = owner[len(s.prefix) :]
    moe: Any = _put(root, owner, FusedMoE())
    if ep:
        ids = expert_ids(s.experts, tp, rank, ep)
        moe_rank, moe_tp = 0, 1
        emap = torch.full((s.experts,), -1, dtype=torch.int32)
        for local, g in enumerate(ids):
            emap[g] = local
        moe.expert_map = emap
    else:
        ids, moe_rank, moe_tp = list(range(s.experts)), rank, tp
        moe.expert_map = None
    n = s.moe_inter // moe_tp
    moe.local_num_experts, moe.global_num_experts = len(ids), s.experts
    moe.intermediate_size_per_partition, moe.tp_rank, moe.tp_size = n, moe_rank, moe_tp
    w13, w2 = [], []
    for g in ids:
        gate, up = (hf[f"{hf_owner}.{g}.{p}.weight"] for p in ("gate_proj", "up_proj"))
        w13.append(torch.cat([_rows(gate, 0, moe_rank * n, n), _rows(up, 0, moe_rank * n, n)]))
        w2.append(_rows(hf[f"{hf_owner}.{g}.down_proj.weight"], 1, moe_rank * n, n))
    moe.register_parameter("w13_weight", _param(torch.stack(w13)))
    moe.register_parameter("w2_weight", _param(torch.stack(w2)))
