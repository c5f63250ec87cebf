"""``diagnose``: how every live name maps onto the files, as a readable table."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from apollo_sync.handles import load_handles
from apollo_sync.layouts import map_tensors
from apollo_sync.model_dir import ModelDir


@dataclass(frozen=True)
class Diagnosis:
    model_dir: str
    live_count: int
    disk_count: int
    matched: list[tuple[str, str, str]]  # live name, disk name, rule
    only_live: list[tuple[str, str]]  # live name, why
    mismatched: list[tuple[str, str, str]]  # live name, kind, detail
    only_disk: list[str]

    @property
    def ok(self) -> bool:
        return not self.only_live and not self.mismatched

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def render(self, limit: int | None = 20) -> str:
        rows = [
            ("matched (disk tensors)", len(self.matched)),
            ("only live (no file counterpart)", len(self.only_live)),
            ("shape / dtype / split mismatch", len(self.mismatched)),
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

        section("only live", [f"{n}: {why}" for n, why in self.only_live])
        section("mismatch", [f"{n} [{k}]: {d}" for n, k, d in self.mismatched])
        section("only on disk", self.only_disk)
        section("matched", [f"{live} -> {disk}   ({rule})" for live, disk, rule in self.matched])
        return "\n".join(out)


def diagnose(
    model_dir: str | os.PathLike[str] | None = None,
    handles: str | os.PathLike[str] | None = None,
) -> Diagnosis:
    """Maps the handles' live tensors onto ``model_dir`` and reports every outcome."""
    with load_handles(handles) as h:
        if model_dir is None:
            mp = h.metadata.get("model_path")
            if not isinstance(mp, str):
                raise TypeError("no --model-dir given and the handles carry no model_path")
            model_dir = mp
        md = ModelDir.open(model_dir)
        m = map_tensors(h.tensors, md.tensors)
        return Diagnosis(
            model_dir=str(md.path),
            live_count=len(h.tensors),
            disk_count=len(md.tensors),
            matched=[(x.live_name, x.disk.name, x.rule) for x in m.matches],
            only_live=[(p.live_name, p.detail) for p in m.problems if p.kind == "unmatched"],
            mismatched=[
                (p.live_name, p.kind, p.detail) for p in m.problems if p.kind != "unmatched"
            ],
            only_disk=m.disk_only,
        )
