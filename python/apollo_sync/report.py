"""``apollo-sync report``: what training changed, per layer and per generation.

Built from the history alone (``state.json``, a cache of the logs' commit
records): every kept generation lists the elements it changed per tensor. Each
tensor is put in a *row* (its layer: ``layers.N`` / ``h.N`` in its name; the
embedding and LM head in ``embed``; everything else outside the layers in
``other``) and a *kind* (attention, MLP, experts, embedding, norms, other).
A cell is the fraction of the row's (or kind's) elements the generation
changed: elements changed / elements in the tensors of that row, using the
element counts of the shards' headers.

A generation whose log was pruned keeps only its total, not its per-tensor
counts: its column is unknown (``None``; grey in the picture).

Where a 4 KiB unit holds the end of one tensor and the start of the next, the
log cannot tell which of them an element of a run across it belongs to: the
history shares such a run's elements out by the bytes it covers of each
(:func:`apollo_sync.journal.tensor_elements`). Rows and kinds are sums of those
per-tensor counts, so a cell can differ from an element-exact count by the
changes in the units at its tensors' edges.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apollo_sync import journal as gens
from apollo_sync.model_dir import ModelDir

KINDS = ("attention", "mlp", "experts", "embedding", "norms", "other")

_LAYER = re.compile(r"^(.*?)(?:^|\.)(?:layers|h)\.(\d+)\.")


def kind_of(name: str) -> str:
    """The kind of tensor ``name`` is, from its name (HF and vLLM spellings)."""
    n = name.lower()
    parts = n.split(".")
    if any("norm" in p for p in parts) or re.search(r"(^|\.)ln_?(f|\d)", n):
        return "norms"
    if ".experts." in n or "shared_expert" in n or n.endswith("mlp.gate.weight"):
        return "experts"  # routed experts, the shared expert, the router
    if "embed" in n or "lm_head" in n or parts[-2:-1] in (["wte"], ["wpe"]):
        return "embedding"
    if any(p in ("self_attn", "attn", "attention", "linear_attn", "cross_attn") for p in parts):
        return "attention"
    if any(p in ("mlp", "feed_forward", "ffn") for p in parts):
        return "mlp"
    return "other"


def row_of(name: str) -> tuple[str, int]:
    """The row of tensor ``name``: ``(stack, layer)``, the stack being what comes
    before ``layers.N`` (the main stack and, say, an MTP head's differ), or
    ``("embed", -1)`` / ``("other", -1)`` outside the layers."""
    m = _LAYER.match(name)
    if m:
        return (m.group(1), int(m.group(2)))
    return ("embed", -1) if kind_of(name) == "embedding" else ("other", -1)


@dataclass(frozen=True)
class ChangeReport:
    """Elements changed, per row (layer) and kind, per generation (oldest first)."""

    model_dir: str
    generations: list[int]
    times: list[float]
    #: "sync", or "rollback to N".
    labels: list[str]
    #: Row names, in model order: ``embed``, ``L0`` .. ``L{n}`` (another stack's
    #: layers as ``<stack> N``), ``other``.
    rows: list[str]
    #: Elements in each row's tensors (from the shards' headers).
    row_elements: list[int]
    #: ``row_changed[r][c]``: elements of row r generation c changed (None: its
    #: per-tensor counts were pruned).
    row_changed: list[list[int | None]]
    kinds: list[str]
    kind_elements: list[int]
    kind_changed: list[list[int | None]]
    #: Elements each generation changed in all (kept after pruning too).
    total_changed: list[int]
    model_elements: int
    #: Tensors the history names that the shards no longer hold (not counted).
    unknown_tensors: list[str] = field(default_factory=list)

    @property
    def row_fraction(self) -> list[list[float | None]]:
        return _fractions(self.row_changed, self.row_elements)

    @property
    def kind_fraction(self) -> list[list[float | None]]:
        return _fractions(self.kind_changed, self.kind_elements)

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["row_fraction"] = self.row_fraction
        d["kind_fraction"] = self.kind_fraction
        return d


def _fractions(changed: list[list[int | None]], elements: list[int]) -> list[list[float | None]]:
    return [
        [None if c is None else (c / n if n else 0.0) for c in row]
        for row, n in zip(changed, elements, strict=True)
    ]


def change_report(model_dir: str | os.PathLike[str], last: int | None = None) -> ChangeReport:
    """The report for the last ``last`` generations of ``model_dir`` (all by default)."""
    if last is not None and last < 1:
        raise ValueError(f"--last must be at least 1, not {last}")
    md = ModelDir.open(model_dir)
    history = gens.history(model_dir).history
    if last is not None:
        history = history[-last:]
    numel = {name: math.prod(t.shape) for name, t in md.tensors.items()}
    row_keys = sorted({row_of(n) for n in numel}, key=_row_order)
    main = _main_stack(row_keys)
    row_index = {k: i for i, k in enumerate(row_keys)}
    kind_index = {k: i for i, k in enumerate(KINDS)}
    row_elements = [0] * len(row_keys)
    kind_elements = [0] * len(KINDS)
    for name, n in numel.items():
        row_elements[row_index[row_of(name)]] += n
        kind_elements[kind_index[kind_of(name)]] += n
    cols = len(history)
    row_changed: list[list[int | None]] = [[0] * cols for _ in row_keys]
    kind_changed: list[list[int | None]] = [[0] * cols for _ in KINDS]
    unknown: set[str] = set()
    for c, g in enumerate(history):
        if not g.log:  # pruned (or synced without a log): no per-tensor counts
            for table in (row_changed, kind_changed):
                for row in table:
                    row[c] = None
            continue
        for name, n in g.tensors.items():
            if name not in numel:
                unknown.add(name)
                continue
            r, k = row_index[row_of(name)], kind_index[kind_of(name)]
            row_changed[r][c] = (row_changed[r][c] or 0) + n
            kind_changed[k][c] = (kind_changed[k][c] or 0) + n
    return ChangeReport(
        model_dir=str(model_dir),
        generations=[g.number for g in history],
        times=[g.time for g in history],
        labels=[
            g.kind if g.rollback_to is None else f"rollback to {g.rollback_to}" for g in history
        ],
        rows=[_row_label(k, main) for k in row_keys],
        row_elements=row_elements,
        row_changed=row_changed,
        kinds=list(KINDS),
        kind_elements=kind_elements,
        kind_changed=kind_changed,
        total_changed=[g.elements_changed for g in history],
        model_elements=sum(numel.values()),
        unknown_tensors=sorted(unknown),
    )


def _row_order(key: tuple[str, int]) -> tuple[int, str, int]:
    stack, layer = key
    return (0 if stack == "embed" and layer < 0 else 2 if layer < 0 else 1, stack, layer)


def _main_stack(keys: list[tuple[str, int]]) -> str:
    stacks: dict[str, int] = {}
    for stack, layer in keys:
        if layer >= 0:
            stacks[stack] = stacks.get(stack, 0) + 1
    return max(stacks, key=lambda s: stacks[s]) if stacks else ""


def _row_label(key: tuple[str, int], main: str) -> str:
    stack, layer = key
    if layer < 0:
        return stack
    return f"L{layer}" if stack == main else f"{stack} {layer}"


def _pct(f: float | None) -> str:
    if f is None:
        return "?"
    if f == 0:
        return "-"
    p = 100 * f
    return f"{p:.1f}" if p >= 1 else f"{p:.2f}" if p >= 0.01 else "<.01"


def render(rep: ChangeReport, columns: int = 12) -> str:
    """Tables for a terminal: % of elements changed per kind and per layer, for the
    last ``columns`` generations (the PNG and the JSON hold them all)."""
    if not rep.generations:
        return f"{rep.model_dir}: no generation yet (nothing synced has changed anything)"
    start = max(0, len(rep.generations) - columns)
    gens_shown = rep.generations[start:]
    width = max(6, *(len(str(g)) + 1 for g in gens_shown))
    label_w = max(9, *(len(r) for r in rep.rows))

    def table(title: str, names: list[str], fr: list[list[float | None]]) -> list[str]:
        head = f"{title:<{label_w}}" + "".join(f"{g:>{width}}" for g in gens_shown)
        out = [head]
        for name, row in zip(names, fr, strict=True):
            out.append(f"{name:<{label_w}}" + "".join(f"{_pct(f):>{width}}" for f in row[start:]))
        return out

    lines = [
        f"{rep.model_dir}: % of elements changed, per generation (columns)"
        + (f"; the last {len(gens_shown)} of {len(rep.generations)}" if start else ""),
        "('-' none, '?' per-tensor counts pruned with the log)",
        "",
    ]
    lines += table("kind", rep.kinds, rep.kind_fraction)
    total = [c / rep.model_elements if rep.model_elements else 0.0 for c in rep.total_changed]
    lines.append(f"{'all':<{label_w}}" + "".join(f"{_pct(f):>{width}}" for f in total[start:]))
    lines.append("")
    lines += table("layer", rep.rows, rep.row_fraction)
    rollbacks = [
        f"{g} ({label})"
        for g, label in zip(rep.generations[start:], rep.labels[start:], strict=True)
        if label != "sync"
    ]
    if rollbacks:
        lines += ["", "rollbacks: " + ", ".join(rollbacks)]
    if rep.unknown_tensors:
        lines += [
            "",
            f"{len(rep.unknown_tensors)} tensor(s) in the history are not in the shards "
            f"now (not counted), e.g. {rep.unknown_tensors[0]}",
        ]
    return "\n".join(lines)


def heatmap(rep: ChangeReport, path: str | os.PathLike[str]) -> Path:
    """Writes the report as a PNG: layers × generations above, kinds × generations
    below, colour the fraction of elements changed (log scale), grey where the
    per-tensor counts were pruned. Sized so that 64 layers × 100 generations
    stay readable."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "the report's picture needs matplotlib: pip install 'apollo-sync[report]'"
        ) from None
    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    if not rep.generations:
        raise ValueError(f"{rep.model_dir}: no generation to draw yet")
    rows = np.array(
        [[np.nan if f is None else f for f in r] for r in rep.row_fraction], dtype=float
    )
    present = [i for i, n in enumerate(rep.kind_elements) if n]  # kinds the model has
    kind_names = [rep.kinds[i] for i in present]
    kinds = np.array(
        [[np.nan if f is None else f for f in rep.kind_fraction[i]] for i in present], dtype=float
    ).reshape(len(present), len(rep.generations))
    positive = np.concatenate([rows[rows > 0], kinds[kinds > 0]])
    vmax = float(positive.max()) if positive.size else 1.0
    vmin = float(positive.min()) if positive.size else vmax / 10
    vmin = min(vmin, vmax / 10)
    # grey: pruned (unknown); near-black: no element changed
    cmap = plt.get_cmap("viridis").with_extremes(bad="#bbbbbb", under="#000033")
    norm = LogNorm(vmin=vmin, vmax=vmax)
    ncols, nrows = len(rep.generations), len(rep.rows)
    fig_w = min(40.0, 3.0 + 0.14 * ncols)
    fig_h = min(40.0, 2.5 + 0.15 * (nrows + len(kind_names)))
    fig, (top, bottom) = plt.subplots(
        2,
        1,
        figsize=(max(fig_w, 7.0), max(fig_h, 5.0)),
        gridspec_kw={"height_ratios": [max(nrows, 1), len(kind_names) + 1]},
        sharex=True,
        constrained_layout=True,
    )
    # 0 is drawn in the "under" colour: LogNorm cannot place it
    shown_rows = np.where(rows == 0, vmin / 2, rows)
    shown_kinds = np.where(kinds == 0, vmin / 2, kinds)
    im = top.imshow(shown_rows, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    bottom.imshow(shown_kinds, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    ystep = max(1, math.ceil(nrows / 70))
    top.set_yticks(range(0, nrows, ystep), rep.rows[::ystep], fontsize=6 if nrows > 30 else 8)
    bottom.set_yticks(range(len(kind_names)), kind_names, fontsize=8)
    xstep = max(1, math.ceil(ncols / 30))
    bottom.set_xticks(
        range(0, ncols, xstep), [str(g) for g in rep.generations[::xstep]], fontsize=7
    )
    bottom.set_xlabel("generation")
    top.set_ylabel("layer")
    top.set_title(f"{rep.model_dir}: fraction of elements changed per generation", fontsize=10)
    for c, label in enumerate(rep.labels):
        if label != "sync":  # mark rollbacks
            for ax in (top, bottom):
                ax.axvline(c, color="red", linewidth=0.8, alpha=0.7)
    bar = fig.colorbar(im, ax=[top, bottom], extend="min", shrink=0.8)
    bar.set_label("fraction of elements changed (grey: pruned; darkest: none)")
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
