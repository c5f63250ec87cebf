"""Mapping live (vLLM) tensor names and merged layouts onto the tensors on disk.

Small tables drive it, each checked against vLLM's and transformers' sources:

* :data:`PREFIX_RULES`: a live name prefix and the checkpoint prefixes it may
  stand for, in order. The first candidate whose names exist on disk wins, so
  ``language_model.model.X`` becomes ``model.language_model.X`` in the official
  multimodal checkpoints and ``model.X`` in text-only ones.
* :data:`MERGED_RULES`: a fused module and the modules it concatenates along
  the first dimension (vLLM's ``qkv_proj`` = q, k, v; ``gate_up_proj`` = gate, up;
  Qwen3.5's ``in_proj_qkvz`` = qkv, z and ``in_proj_ba`` = b, a, or, in builds
  that fold them together, ``in_proj_qkvz`` / ``in_proj`` = qkv, z, b, a). Row
  counts come from the headers of the parts on disk and must add up to the live
  tensor's rows; where several rules share a fused name, the first whose rows add
  up wins (so the gated q block of Qwen3.5, twice the head dim, needs no special
  case either).
  Where the checkpoint stores the fused tensor itself (Qwen3-Next's
  ``in_proj_qkvz``), it passes through unsplit.
* :data:`EXPERT_RULES`: vLLM's fused MoE parameters (``experts.w13_weight``
  ``[E, 2I, H]``, gate rows first, and ``experts.w2_weight`` ``[E, H, I]``; the
  old ``experts.ws`` / ``experts.w2s`` naming too) and what they stand for on
  disk: per-expert tensors (``experts.N.gate_proj/up_proj/down_proj`` or
  Mixtral's ``w1/w3/w2``), or transformers' fused 3-D ``experts.gate_up_proj`` /
  ``experts.down_proj`` where the checkpoint has those.

Shapes that differ on purpose are handled, and checked:

* a vocabulary padded by vLLM to a multiple of :data:`VOCAB_PAD` rows: only the
  checkpoint's rows are synced, and the padding rows must be zero (what vLLM's
  loader puts there), else the layout is not the one this module understands;
* tied embeddings: a live ``lm_head`` absent on disk is fine when it holds the
  embedding's values; an ``lm_head`` on disk with no live one gets the embedding
  when the checkpoint's config says the two are tied;
* a checkpoint tensor in float32 that vLLM holds in bf16/fp16 is an *upcast*
  match: :func:`apollo_sync.upcast.upcast_live` turns it into the float32 bytes
  to write (see there).

What cannot be written back byte for byte is refused with the reason:
quantized or packed weights (scales, zero points, packed integers, fp8 against a
float file), LoRA wrappers, and MoE experts whose count or shape differs from the
checkpoint (expert parallelism, redundant experts, padding kernels). Nothing is
skipped silently: a live tensor that matches nothing, or whose dtype or shape
differs from the file, is reported by name (and is an error for a sync).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from math import prod
from pathlib import Path

import torch

from apollo_sync.live import LiveTensor
from apollo_sync.model_dir import DiskTensor

#: vLLM pads the vocabulary of embeddings and LM heads to a multiple of this
#: (``DEFAULT_VOCAB_PADDING_SIZE``) and fills the padding rows with zeros.
VOCAB_PAD = 64

#: Last two name components of tensors whose first dimension is the vocabulary.
VOCAB_TENSORS: tuple[str, ...] = (
    "embed_tokens.weight",
    "lm_head.weight",
    "embed_in.weight",
    "embed_out.weight",
    "wte.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
)

#: Float dtypes a checkpoint may hold in float32 while vLLM holds them narrower.
UPCAST_FROM: frozenset[str] = frozenset({"BF16", "F16"})

#: Live dtypes that mean quantized or packed weights when the file holds floats.
_PACKED_DTYPES: frozenset[str] = frozenset(
    {"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0", "I8", "U8", "I32", "U32"}
)
_FLOAT_DTYPES: frozenset[str] = frozenset({"F64", "F32", "F16", "BF16"})

#: Last name components that only quantized layers have (vLLM's fp8, GPTQ, AWQ,
#: Marlin, compressed-tensors, ModelOpt and bitsandbytes parameters, fused-MoE
#: variants such as ``w13_weight_scale`` or ``w2_qweight`` included). Anchored on
#: the quantization vocabulary so that an ordinary float parameter such as a
#: vision tower's ``layer_scale`` is not mistaken for one.
_QUANT_NAME = re.compile(
    r"^(?:w13_|w2_|w1_|w3_)?(?:"
    r"(?:weight|input|output|k|v|q|prob|bias)_(?:global_)?scale(?:_inv|_2)?"
    r"|(?:weight|input)_zero_point"
    r"|qweight|qzeros|scales|g_idx|g_idx_sort_indices|workspace"
    r"|weight_packed|weight_shape|weight_g_idx"
    r")$"
)
_LORA_MARKERS: tuple[str, ...] = ("lora_a", "lora_b", "lora_embedding")


@dataclass(frozen=True)
class MergedRule:
    """``fused`` (a module name) concatenates ``parts`` along dimension 0."""

    fused: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class PrefixRule:
    """A live name starting with ``live`` may stand for any of ``disk`` on disk."""

    live: str
    disk: tuple[str, ...]


@dataclass(frozen=True)
class ExpertRule:
    """vLLM's ``experts.<fused>`` ``[E, rows, cols]`` on disk: per expert, ``parts``
    concatenated along the rows (``experts.N.<part>.weight``), or whole as
    transformers' ``experts.<hf_fused>`` of the same shape."""

    fused: str
    parts: tuple[str, ...]
    hf_fused: str


MERGED_RULES: tuple[MergedRule, ...] = (
    MergedRule("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    MergedRule("gate_up_proj", ("gate_proj", "up_proj")),
    MergedRule("in_proj_qkvz", ("in_proj_qkv", "in_proj_z")),
    MergedRule("in_proj_ba", ("in_proj_b", "in_proj_a")),
    # vLLM builds that fold b and a into the GDN input projection too
    MergedRule("in_proj_qkvz", ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")),
    MergedRule("in_proj", ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")),
)

EXPERT_RULES: tuple[ExpertRule, ...] = (
    # current vLLM naming (FusedMoE): w1 = gate goes first in w13, w3 = up second
    ExpertRule("w13_weight", ("gate_proj", "up_proj"), "gate_up_proj"),
    ExpertRule("w13_weight", ("w1", "w3"), "gate_up_proj"),
    ExpertRule("w2_weight", ("down_proj",), "down_proj"),
    ExpertRule("w2_weight", ("w2",), "down_proj"),
    # old vLLM naming (MixtralMoE's ws / w2s), the same layouts
    ExpertRule("ws", ("w1", "w3"), "gate_up_proj"),
    ExpertRule("ws", ("gate_proj", "up_proj"), "gate_up_proj"),
    ExpertRule("w2s", ("w2",), "down_proj"),
    ExpertRule("w2s", ("down_proj",), "down_proj"),
)

PREFIX_RULES: tuple[PrefixRule, ...] = (
    PrefixRule("language_model.lm_head.", ("lm_head.", "language_model.lm_head.")),
    PrefixRule(
        "language_model.model.",
        ("model.language_model.", "model.", "language_model.model."),
    ),
    PrefixRule("", ("",)),
)


@dataclass(frozen=True)
class Match:
    """A disk tensor and the live bytes that belong in it.

    ``kind`` is ``"copy"`` (the live bytes are the file's bytes) or ``"upcast"``
    (the file holds float32, ``live`` holds the narrower live values; see
    :func:`apollo_sync.upcast.upcast_live`).
    """

    disk: DiskTensor
    live: LiveTensor
    rule: str
    live_name: str
    kind: str = "copy"


@dataclass(frozen=True)
class Problem:
    """A live tensor that cannot be synced, and why."""

    live_name: str
    kind: str  # "unmatched" | "shape" | "dtype" | "split" | "padding" | "refused"
    detail: str


@dataclass
class LayoutMap:
    """The outcome of mapping: what will be synced, what cannot be, what is left alone.

    ``skipped`` lists live tensors deliberately not written, with the reason (a
    tied ``lm_head`` that the checkpoint does not store). ``warnings`` says what
    may be wrong but cannot be decided from the names and shapes alone.
    """

    matches: list[Match] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    disk_only: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def candidate_names(live_name: str) -> list[tuple[str, str]]:
    """Disk names a live name may stand for, with the rule that gives each, in order."""
    out: list[tuple[str, str]] = []
    for rule in PREFIX_RULES:
        if live_name.startswith(rule.live):
            rest = live_name[len(rule.live) :]
            for prefix in rule.disk:
                label = f"prefix {rule.live or '(none)'!s} -> {prefix or '(none)'}"
                out.append((prefix + rest, label))
    return out


def _split_candidates(name: str) -> list[tuple[MergedRule, list[str]]]:
    """For a name containing a fused module, the part names it splits into."""
    out = []
    comps = name.split(".")
    for i, comp in enumerate(comps[:-1]):
        for rule in MERGED_RULES:
            if comp == rule.fused:
                out.append(
                    (rule, [".".join([*comps[:i], part, *comps[i + 1 :]]) for part in rule.parts])
                )
    return out


def _expert_base(name: str, rule: ExpertRule) -> str | None:
    """``P.experts.`` when ``name`` is ``P.experts.<rule.fused>``, else None."""
    tail = "experts." + rule.fused
    if name == tail or name.endswith("." + tail):
        return name[: -len(rule.fused)]
    return None


def refusal(live_name: str) -> str | None:
    """Why a live tensor cannot be written back byte for byte by its name alone
    (quantization parameters, LoRA wrappers), or None."""
    comps = live_name.split(".")
    if _QUANT_NAME.match(comps[-1]):
        return (
            f"a quantization parameter ({comps[-1]!r}): the live model is quantized or "
            "repacked (fp8 with rescaled scales, GPTQ/AWQ/Marlin), so its weights are not "
            "the checkpoint's bytes; serve the unquantized checkpoint to sync it"
        )
    if "base_layer" in comps or any(m in c for c in comps for m in _LORA_MARKERS):
        return (
            "a LoRA adapter wrapper (base_layer / lora_a / lora_b): the live layer is not "
            "the checkpoint's; serve without --enable-lora to sync the base weights"
        )
    return None


def map_tensors(
    live: Mapping[str, LiveTensor], disk: Mapping[str, DiskTensor], *, tied: bool = False
) -> LayoutMap:
    """Matches every live tensor to disk tensors (see the module docs).

    ``tied``: the checkpoint's config ties the LM head to the input embedding
    (see :func:`tied_embeddings`); an ``lm_head`` on disk with no live
    counterpart is then written from the live embedding.
    """
    result = LayoutMap()
    claimed: dict[str, str] = {}
    for live_name, t in live.items():
        matched = _match_one(live_name, t, disk)
        if isinstance(matched, Problem):
            skip = _tied_head_on_live_only(live_name, t, live, disk, matched)
            if skip is not None:
                result.skipped.append((live_name, skip))
            else:
                result.problems.append(matched)
            continue
        for m in matched:
            if m.disk.name in claimed:
                result.problems.append(
                    Problem(
                        live_name,
                        "unmatched",
                        f"{m.disk.name!r} is already written by {claimed[m.disk.name]!r}",
                    )
                )
                break
        else:
            for m in matched:
                claimed[m.disk.name] = live_name
                result.matches.append(m)
    if tied:
        for m in _tied_head_on_disk_only(result.matches, disk, claimed):
            claimed[m.disk.name] = m.live_name
            result.matches.append(m)
    result.disk_only = sorted(set(disk) - set(claimed))
    heads = [n for n in result.disk_only if _is_head(n)]
    if (
        heads
        and not any(_is_head(n) for n in live)
        and any(e in claimed for e in _embedding_of(list(disk)))
    ):
        result.warnings.append(
            f"{heads[0]!r} on disk is not synced while the embedding is: if the served "
            "model ties them, that file's LM head is now stale (set tie_word_embeddings "
            "in config.json, or export the head too)"
        )
    return result


def tied_embeddings(model_dir: str | Path) -> bool:
    """Whether the checkpoint's ``config.json`` ties the LM head to the embedding
    (``tie_word_embeddings``, at the top or in ``text_config``); False without one."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict):
        return False
    text = cfg.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    return bool(cfg.get("tie_word_embeddings", False))


def _is_head(name: str) -> bool:
    return name.endswith("lm_head.weight")


def _embedding_of(names: Mapping[str, object] | list[str]) -> list[str]:
    return [n for n in names if n.endswith("embed_tokens.weight")]


def _tied_head_on_live_only(
    live_name: str,
    t: LiveTensor,
    live: Mapping[str, LiveTensor],
    disk: Mapping[str, DiskTensor],
    problem: Problem,
) -> str | None:
    """A live ``lm_head`` with no file counterpart may be left out when the file
    has no head at all and the live head holds exactly the live embedding."""
    if problem.kind != "unmatched" or not _is_head(live_name):
        return None
    if any(_is_head(n) for n in disk) or not _embedding_of(list(disk)):
        return None
    for e in _embedding_of(live):
        if _same_values(t, live[e]):
            return f"tied: the checkpoint stores no lm_head and it equals {e!r}"
    return None


def _tied_head_on_disk_only(
    matches: list[Match], disk: Mapping[str, DiskTensor], claimed: Mapping[str, str]
) -> list[Match]:
    """For a tied checkpoint that still stores ``lm_head.weight``: the live
    embedding's (checkpoint) rows, when no live tensor claimed the head."""
    heads = [n for n in disk if _is_head(n) and n not in claimed]
    if len(heads) != 1 or any(_is_head(n) for n in claimed):
        return []
    embeds = [m for m in matches if m.disk.name.endswith("embed_tokens.weight")]
    if len(embeds) != 1:
        return []
    e, head = embeds[0], disk[heads[0]]
    if (head.dtype, head.shape) != (e.disk.dtype, e.disk.shape) or e.kind != "copy":
        return []
    rule = f"tied: {head.name} <- {e.disk.name}"
    return [Match(head, replace(e.live, name=head.name), rule, e.live_name)]


def _same_values(a: LiveTensor, b: LiveTensor) -> bool:
    if a.dtype != b.dtype or a.nbytes != b.nbytes:
        return False
    if a.source is b.source and a.offset == b.offset:
        return True
    if a.is_cuda or b.is_cuda:
        da = a.device_bytes() if a.is_cuda else torch.from_numpy(a.host_bytes().copy())
        db = b.device_bytes() if b.is_cuda else torch.from_numpy(b.host_bytes().copy())
        return bool(torch.equal(da, db.to(da.device)))
    return bool((a.host_bytes() == b.host_bytes()).all())


def _all_zero(t: LiveTensor) -> bool:
    if t.nbytes == 0:
        return True
    if t.is_cuda:
        return not bool(t.device_bytes().any())
    return not bool(t.host_bytes().any())


def _match_one(
    live_name: str, t: LiveTensor, disk: Mapping[str, DiskTensor]
) -> list[Match] | Problem:
    why = refusal(live_name)
    if why is not None:
        return Problem(live_name, "refused", why)
    tried: list[str] = []
    rows_off: Problem | None = None
    for name, label in candidate_names(live_name):
        if name in disk:
            return _direct(t, disk[name], label, live_name)
        for rule, parts in _split_candidates(name):
            if all(p in disk for p in parts):
                split = _split(t, rule, [disk[p] for p in parts], label)
                if not (isinstance(split, Problem) and split.kind == "split"):
                    return split
                # rows do not add up: another rule for the same fused name may fit
                rows_off = rows_off or split
            tried.extend(parts)
        if rows_off is not None:
            return rows_off
        for erule in EXPERT_RULES:
            base = _expert_base(name, erule)
            if base is None:
                continue
            fused = base + erule.hf_fused
            if fused in disk:
                why = _transposed_experts(base, disk)
                if why is not None:
                    return Problem(live_name, "refused", why)
                return _direct(
                    t, disk[fused], f"{label}; experts.{erule.fused} -> {fused}", live_name
                )
            first = [f"{base}0.{p}.weight" for p in erule.parts]
            if all(p in disk for p in first):
                return _experts(t, erule, base, disk, label)
            tried.extend([fused, *first])
        tried.append(name)
    return Problem(
        live_name,
        "unmatched",
        "no tensor on disk named " + " or ".join(repr(n) for n in dict.fromkeys(tried)),
    )


def _transposed_experts(base: str, disk: Mapping[str, DiskTensor]) -> str | None:
    """Why fused expert tensors on disk cannot take vLLM's bytes as they are: some
    checkpoints (Llama 4, GPT-OSS) store ``gate_up_proj`` as ``[E, H, 2I]`` and
    ``down_proj`` as ``[E, I, H]``, transposed from vLLM's ``[E, 2I, H]`` and
    ``[E, H, I]``; when I equals H the shapes alone cannot tell. The pair tells."""
    gate_up, down = disk.get(base + "gate_up_proj"), disk.get(base + "down_proj")
    if gate_up is None or down is None or len(gate_up.shape) != 3 or len(down.shape) != 3:
        return None
    _, rows, cols = gate_up.shape
    if rows == 2 * down.shape[2] and cols == down.shape[1]:
        return None  # [E, 2I, H] and [E, H, I]: vLLM's orientation
    return (
        f"{base}gate_up_proj {list(gate_up.shape)} and {base}down_proj "
        f"{list(down.shape)} are not stored as vLLM holds experts ([E, 2I, H] and "
        "[E, H, I]): writing them back would need a transpose"
    )


def _renamed(t: LiveTensor, name: str) -> LiveTensor:
    return replace(t, name=name)


def _direct(t: LiveTensor, d: DiskTensor, label: str, live_name: str) -> list[Match] | Problem:
    """One live tensor for one disk tensor: equal, upcast, or vocab-padded."""
    if t.dtype != d.dtype:
        if t.dtype in UPCAST_FROM and d.dtype == "F32" and t.shape == d.shape:
            return [Match(d, _renamed(t, d.name), f"{label}; upcast", live_name, "upcast")]
        if t.dtype in _PACKED_DTYPES and d.dtype in _FLOAT_DTYPES:
            return Problem(
                live_name,
                "refused",
                f"live {t.dtype} but {d.name!r} is {d.dtype} on disk: quantized or packed "
                "weights cannot be written back byte for byte",
            )
        return Problem(live_name, "dtype", f"live {t.dtype} but {d.name!r} is {d.dtype} on disk")
    if t.shape == d.shape:
        return [Match(d, _renamed(t, d.name), label, live_name)]
    if _vocab_padded(d, t):
        rows = d.shape[0]
        pad = t.rows(rows, t.shape[0], t.name + "[padding]")
        if not _all_zero(pad):
            return Problem(
                live_name,
                "padding",
                f"vocab padded from {rows} to {t.shape[0]} rows but the padding rows are not "
                "zero (vLLM fills them with zeros): not the layout this sync understands",
            )
        rule = f"{label}; vocab padded {t.shape[0]} -> {rows}"
        return [Match(d, t.rows(0, rows, d.name), rule, live_name)]
    return Problem(
        live_name,
        "shape",
        f"live shape {list(t.shape)} but {d.name!r} is {list(d.shape)} on disk"
        + _shape_hint(t.shape, d.shape),
    )


def _vocab_padded(d: DiskTensor, t: LiveTensor) -> bool:
    return (
        any(d.name == v or d.name.endswith("." + v) for v in VOCAB_TENSORS)
        and len(t.shape) == len(d.shape) >= 1
        and t.shape[1:] == d.shape[1:]
        and d.shape[0] < t.shape[0] == -(-d.shape[0] // VOCAB_PAD) * VOCAB_PAD
    )


def _shape_hint(live: tuple[int, ...], disk: tuple[int, ...]) -> str:
    """A guess at why shapes differ, where one fits."""
    if len(live) != len(disk) or not live:
        return ""
    for dim in range(len(live)):
        same = all(a == b for i, (a, b) in enumerate(zip(live, disk, strict=True)) if i != dim)
        if same and live[dim] and disk[dim] % live[dim] == 0 and disk[dim] > live[dim]:
            return (
                f" (dimension {dim} is 1/{disk[dim] // live[dim]} of the file's: a "
                "tensor-parallel shard? only tensor-parallel size 1 is supported)"
            )
    return ""


def _split(
    t: LiveTensor, rule: MergedRule, parts: list[DiskTensor], label: str
) -> list[Match] | Problem:
    fused = f"{rule.fused} -> {'+'.join(rule.parts)}"
    if not t.shape:
        return Problem(t.name, "split", f"{fused}: a 0-d tensor cannot be split by rows")
    for p in parts:
        if p.dtype != t.dtype:
            if t.dtype in _PACKED_DTYPES and p.dtype in _FLOAT_DTYPES:
                return Problem(
                    t.name,
                    "refused",
                    f"live {t.dtype} but {p.name!r} is {p.dtype} on disk: quantized or packed "
                    "weights cannot be written back byte for byte",
                )
            return Problem(t.name, "dtype", f"live {t.dtype} but {p.name!r} is {p.dtype} on disk")
        if not p.shape or tuple(p.shape[1:]) != t.shape[1:]:
            return Problem(
                t.name,
                "shape",
                f"{fused}: {p.name!r} has shape {list(p.shape)}, live rows are {list(t.shape[1:])}",
            )
    rows = [p.shape[0] for p in parts]
    if sum(rows) != t.shape[0]:
        hint = ""
        if t.shape[0] and sum(rows) % t.shape[0] == 0:
            hint = (
                f" (1/{sum(rows) // t.shape[0]} of the rows: a tensor-parallel shard? "
                "only tensor-parallel size 1 is supported)"
            )
        return Problem(
            t.name,
            "split",
            f"{fused}: parts on disk have {' + '.join(map(str, rows))} = {sum(rows)} rows, "
            f"live tensor has {t.shape[0]}" + hint,
        )
    out = []
    start = 0
    for p, n in zip(parts, rows, strict=True):
        out.append(Match(p, t.rows(start, start + n, p.name), f"{label}; split {fused}", t.name))
        start += n
    assert prod(t.shape) == sum(prod(m.live.shape) for m in out)
    return out


def _experts(
    t: LiveTensor, rule: ExpertRule, base: str, disk: Mapping[str, DiskTensor], label: str
) -> list[Match] | Problem:
    """Fused ``[E, rows, cols]`` experts split into ``E × len(parts)`` per-expert tensors."""
    what = f"experts.{rule.fused} -> experts.N.{'+'.join(rule.parts)}"
    on_disk = 0
    while all(f"{base}{on_disk}.{p}.weight" in disk for p in rule.parts):
        on_disk += 1
    if len(t.shape) != 3:
        return Problem(
            t.name, "shape", f"{what}: live shape {list(t.shape)} is not [E, rows, cols]"
        )
    experts, rows, cols = t.shape
    if experts != on_disk:
        return Problem(
            t.name,
            "refused",
            f"{what}: the live tensor holds {experts} experts, the checkpoint {on_disk}: "
            "expert parallelism or redundant (EPLB) experts reorder the experts; "
            "serve with every expert on one GPU to sync",
        )
    parts0 = [disk[f"{base}0.{p}.weight"] for p in rule.parts]
    part_rows = [p.shape[0] if p.shape else 0 for p in parts0]
    out: list[Match] = []
    for e in range(experts):
        expert = t.rows(e, e + 1, f"{t.name}[{e}]")
        expert = replace(expert, shape=(rows, cols))
        start = 0
        for part, n in zip(rule.parts, part_rows, strict=True):
            d = disk[f"{base}{e}.{part}.weight"]
            if d.dtype != t.dtype:
                kind = "refused" if t.dtype in _PACKED_DTYPES else "dtype"
                return Problem(t.name, kind, f"live {t.dtype} but {d.name!r} is {d.dtype} on disk")
            if tuple(d.shape) != (n, cols):
                return Problem(
                    t.name,
                    "shape",
                    f"{what}: {d.name!r} has shape {list(d.shape)}, live expert rows are "
                    f"[{rows}, {cols}]" + _moe_hint(rows, cols, sum(part_rows), d),
                )
            out.append(
                Match(d, expert.rows(start, start + n, d.name), f"{label}; split {what}", t.name)
            )
            start += n
        if start != rows:
            return Problem(
                t.name,
                "refused",
                f"{what}: per-expert parts on disk have {' + '.join(map(str, part_rows))} = "
                f"{start} rows, the live expert {rows}" + _moe_hint(rows, cols, start, None),
            )
    return out


def _moe_hint(rows: int, cols: int, disk_rows: int, d: DiskTensor | None) -> str:
    if rows > disk_rows or (d is not None and d.shape and cols > d.shape[-1]):
        return " (the MoE kernel padded the experts: not writable back byte for byte)"
    if rows and disk_rows % rows == 0 and disk_rows > rows:
        return " (a tensor-parallel shard? only tensor-parallel size 1 is supported)"
    return ""


def explain(live_name: str, disk: Mapping[str, DiskTensor]) -> list[str]:
    """Why ``live_name`` matched nothing, rule by rule: which prefix and layout rules
    apply to it and which of the names they need are on disk, or, when no rule
    gets near, the most similar names on disk and the prefix rule that would
    have mapped the live name onto them."""
    lines: list[str] = []
    best: tuple[int, str] | None = None
    for name, label in candidate_names(live_name):
        needs: list[tuple[str, list[str]]] = [("as is", [name])]
        for rule, parts in _split_candidates(name):
            needs.append((f"merged {rule.fused} -> {'+'.join(rule.parts)}", parts))
        for erule in EXPERT_RULES:
            base = _expert_base(name, erule)
            if base is not None:
                needs.append((f"experts.{erule.fused} -> fused", [base + erule.hf_fused]))
                per = [f"{base}0.{p}.weight" for p in erule.parts]
                needs.append((f"experts.{erule.fused} -> experts.N.{'+'.join(erule.parts)}", per))
        for what, names in needs:
            have = [n for n in names if n in disk]
            if have and (best is None or len(have) > best[0]):
                missing = [n for n in names if n not in disk]
                best = (
                    len(have),
                    f"{label}; {what}: on disk {', '.join(have)}; missing {', '.join(missing)}",
                )
    if best is not None:
        lines.append(f"nearest rule: {best[1]}")
        return lines
    lines.append("no rule gets near: " + _rules_tried(live_name))
    close = _similar(live_name, disk)
    for d in close:
        lines.append(f"similar on disk: {d!r}" + _prefix_hint(live_name, d))
    if not close:
        lines.append("nothing similar on disk (a tensor the checkpoint does not have?)")
    return lines


def _rules_tried(live_name: str) -> str:
    rules = [r for r in PREFIX_RULES if live_name.startswith(r.live)]
    return "; ".join(
        f"prefix {r.live or '(none)'} -> {' | '.join(d or '(none)' for d in r.disk)}" for r in rules
    )


def _similar(live_name: str, disk: Mapping[str, DiskTensor], n: int = 3) -> list[str]:
    tail = live_name.split(".")[-3:]
    pool = [d for d in disk if d.split(".")[-3:] == tail] or list(disk)
    return difflib.get_close_matches(live_name, pool, n=n, cutoff=0.5)


def _prefix_hint(live_name: str, disk_name: str) -> str:
    """The prefix pair that would map ``live_name`` onto ``disk_name``, if the rest agrees."""
    a, b = live_name.split("."), disk_name.split(".")
    k = 0
    while k < min(len(a), len(b)) and a[-1 - k] == b[-1 - k]:
        k += 1
    if k == 0:
        return ""
    live_pre = ".".join(a[: len(a) - k])
    disk_pre = ".".join(b[: len(b) - k])
    return (
        f" (the same after the prefix; a rule {live_pre + '.' if live_pre else '(none)'} -> "
        f"{disk_pre + '.' if disk_pre else '(none)'} would match it)"
    )
