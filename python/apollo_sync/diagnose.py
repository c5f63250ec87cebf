"""``diagnose``: how every live name maps onto the files, as a readable table.

Every live name that matches nothing is explained rule by rule (see
:func:`apollo_sync.layouts.explain`): the rule that came nearest and the names it
needed that the checkpoint lacks, or the most similar names on disk and the
prefix rule that would have mapped onto them. Refusals from the producer's
metadata (tensor parallelism, quantization, LoRA, reordered experts) are listed too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from apollo_sync.layouts import explain, map_tensors, tied_embeddings
from apollo_sync.live import LiveTensor, from_torch
from apollo_sync.model_dir import ModelDir
from apollo_sync.ranks import HandlesArg, open_handles
from apollo_sync.refusals import producer_refusals


@dataclass(frozen=True)
class Diagnosis:
    model_dir: str
    live_count: int
    disk_count: int
    matched: list[tuple[str, str, str]]  # live name, disk name, rule
    only_live: list[tuple[str, str]]  # live name, why
    mismatched: list[tuple[str, str, str]]  # live name, kind, detail
    only_disk: list[str]
    #: live name -> lines explaining which rule came nearest (only_live names)
    explanations: dict[str, list[str]] = field(default_factory=dict)
    #: live names deliberately not written, and why (a tied head the file lacks)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: reasons the producer's metadata gives to refuse any sync
    refusals: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.only_live and not self.mismatched and not self.refusals

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def render(self, limit: int | None = 20) -> str:
        rows = [
            ("matched (disk tensors)", len(self.matched)),
            ("only live (no file counterpart)", len(self.only_live)),
            ("shape / dtype / split / refused", len(self.mismatched)),
            ("skipped on purpose (tied)", len(self.skipped)),
            ("only on disk (left as is)", len(self.only_disk)),
        ]
        out = [
            f"model dir: {self.model_dir}",
            f"live tensors: {self.live_count}   disk tensors: {self.disk_count}",
            "",
        ]
        out += [f"  {label:<34} {n:>6}" for label, n in rows]

        def section(title: str, items: list[str]) -> None:
            if not items:
                return
            out.append(f"\n{title}:")
            shown = items if limit is None else items[:limit]
            out.extend(f"  {s}" for s in shown)
            if len(shown) < len(items):
                out.append(f"  ... {len(items) - len(shown)} more (-v shows all)")

        section("refused by the producer's settings", self.refusals)
        section(
            "only live",
            [
                "\n    ".join([f"{n}: {why}", *self.explanations.get(n, [])])
                for n, why in self.only_live
            ],
        )
        section("mismatch", [f"{n} [{k}]: {d}" for n, k, d in self.mismatched])
        section("skipped", [f"{n}: {why}" for n, why in self.skipped])
        section("only on disk", self.only_disk)
        section("matched", [f"{live} -> {disk}   ({rule})" for live, disk, rule in self.matched])
        return "\n".join(out)


def diagnose(
    model_dir: str | os.PathLike[str] | None = None,
    handles: HandlesArg = None,
    *,
    tensors: Mapping[str, torch.Tensor | LiveTensor] | None = None,
) -> Diagnosis:
    """Maps the live tensors (``tensors``, or the handles file's) onto ``model_dir``
    and reports every outcome."""
    if tensors is not None:
        if model_dir is None:
            raise TypeError("model_dir is required when live tensors are passed directly")
        live = {n: t if isinstance(t, LiveTensor) else from_torch(n, t) for n, t in tensors.items()}
        return _diagnose(ModelDir.open(model_dir), live, {})
    with open_handles(handles) as h:
        if model_dir is None:
            mp = h.metadata.get("model_path")
            if not isinstance(mp, str):
                raise TypeError("no --model-dir given and the handles carry no model_path")
            model_dir = mp
        return _diagnose(ModelDir.open(model_dir), h.tensors, h.metadata)


def _diagnose(md: ModelDir, live: Mapping[str, LiveTensor], meta: Mapping[str, Any]) -> Diagnosis:
    m = map_tensors(live, md.tensors, tied=tied_embeddings(md.path))
    only_live = [(p.live_name, p.detail) for p in m.problems if p.kind == "unmatched"]
    return Diagnosis(
        model_dir=str(md.path),
        live_count=len(live),
        disk_count=len(md.tensors),
        matched=[(x.live_name, x.disk.name, x.rule) for x in m.matches],
        only_live=only_live,
        mismatched=[(p.live_name, p.kind, p.detail) for p in m.problems if p.kind != "unmatched"],
        only_disk=m.disk_only,
        explanations={n: explain(n, md.tensors) for n, _ in only_live},
        skipped=list(m.skipped),
        refusals=producer_refusals(meta),
    )
