"""Mapping live (vLLM) tensor names and merged layouts onto the tensors on disk.

Two small tables drive it:

* :data:`PREFIX_RULES`: a live name prefix and the checkpoint prefixes it may
  stand for, in order. The first candidate whose names exist on disk wins, so
  ``language_model.model.X`` becomes ``model.language_model.X`` in the official
  multimodal checkpoints and ``model.X`` in text-only ones.
* :data:`MERGED_RULES`: a fused module and the modules it concatenates along
  the first dimension. Row counts come from the headers of the parts on disk and
  must add up to the live tensor's rows. Where the checkpoint stores the fused
  tensor itself, it passes through unsplit.

Nothing is skipped silently: a live tensor that matches nothing, or whose dtype or
shape differs from the file, is reported by name (and is an error for a sync).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from math import prod

from apollo_sync.live import LiveTensor
from apollo_sync.model_dir import DiskTensor


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


MERGED_RULES: tuple[MergedRule, ...] = (
    MergedRule("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    MergedRule("gate_up_proj", ("gate_proj", "up_proj")),
    MergedRule("in_proj_qkvz", ("in_proj_qkv", "in_proj_z")),
    MergedRule("in_proj_ba", ("in_proj_b", "in_proj_a")),
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
    """A disk tensor and the live bytes that belong in it."""

    disk: DiskTensor
    live: LiveTensor
    rule: str
    live_name: str


@dataclass(frozen=True)
class Problem:
    """A live tensor that cannot be synced, and why."""

    live_name: str
    kind: str  # "unmatched" | "shape" | "dtype" | "split"
    detail: str


@dataclass
class LayoutMap:
    """The outcome of mapping: what will be synced, what cannot be, what is left alone."""

    matches: list[Match] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    disk_only: list[str] = field(default_factory=list)


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


def map_tensors(live: Mapping[str, LiveTensor], disk: Mapping[str, DiskTensor]) -> LayoutMap:
    """Matches every live tensor to disk tensors (see the module docs)."""
    result = LayoutMap()
    claimed: dict[str, str] = {}
    for live_name, t in live.items():
        matched = _match_one(live_name, t, disk)
        if isinstance(matched, Problem):
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
    result.disk_only = sorted(set(disk) - set(claimed))
    return result


def _match_one(
    live_name: str, t: LiveTensor, disk: Mapping[str, DiskTensor]
) -> list[Match] | Problem:
    tried: list[str] = []
    for name, label in candidate_names(live_name):
        if name in disk:
            m = Match(disk[name], _renamed(t, name), label, live_name)
            return _check([m]) or [m]
        for rule, parts in _split_candidates(name):
            if all(p in disk for p in parts):
                return _split(t, rule, [disk[p] for p in parts], label)
            tried.extend(parts)
        tried.append(name)
    return Problem(
        live_name,
        "unmatched",
        "no tensor on disk named " + " or ".join(repr(n) for n in dict.fromkeys(tried)),
    )


def _renamed(t: LiveTensor, name: str) -> LiveTensor:
    return replace(t, name=name)


def _check(matches: list[Match]) -> Problem | None:
    for m in matches:
        if m.live.dtype != m.disk.dtype:
            return Problem(
                m.live.name,
                "dtype",
                f"live {m.live.dtype} but {m.disk.name!r} is {m.disk.dtype} on disk",
            )
        if m.live.shape != m.disk.shape:
            return Problem(
                m.live.name,
                "shape",
                f"live shape {list(m.live.shape)} but {m.disk.name!r} is "
                f"{list(m.disk.shape)} on disk",
            )
    return None


def _split(
    t: LiveTensor, rule: MergedRule, parts: list[DiskTensor], label: str
) -> list[Match] | Problem:
    fused = f"{rule.fused} -> {'+'.join(rule.parts)}"
    if not t.shape:
        return Problem(t.name, "split", f"{fused}: a 0-d tensor cannot be split by rows")
    for p in parts:
        if p.dtype != t.dtype:
            return Problem(t.name, "dtype", f"live {t.dtype} but {p.name!r} is {p.dtype} on disk")
        if not p.shape or tuple(p.shape[1:]) != t.shape[1:]:
            return Problem(
                t.name,
                "shape",
                f"{fused}: {p.name!r} has shape {list(p.shape)}, live rows are {list(t.shape[1:])}",
            )
    rows = [p.shape[0] for p in parts]
    if sum(rows) != t.shape[0]:
        return Problem(
            t.name,
            "split",
            f"{fused}: parts on disk have {' + '.join(map(str, rows))} = {sum(rows)} rows, "
            f"live tensor has {t.shape[0]}",
        )
    out = []
    start = 0
    for p, n in zip(parts, rows, strict=True):
        out.append(Match(p, t.rows(start, start + n, p.name), f"{label}; split {fused}", t.name))
        start += n
    assert prod(t.shape) == sum(prod(m.live.shape) for m in out)
    return out
