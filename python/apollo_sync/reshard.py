"""Shards re-split at pipeline stage boundaries, so that each host of a group
(:mod:`apollo_sync.group`) writes files of its own.

A shard that holds tensors of two pipeline stages placed on different hosts
cannot be committed by either host alone. :func:`reshard` rewrites each such
shard as one file per host (``<stem>-host<h>.safetensors``), tensors and their
bytes unchanged, and rewrites ``model.safetensors.index.json`` to name them:
Hugging Face loaders and vLLM only follow the index. Shards of one host are
left as they are.

A tensor of decoder layer ``i`` (``...layers.<i>....``) belongs to the host whose
stage holds layer ``i``; of the others, embeddings (a name with ``embed``) belong
to the first host, as vLLM's first pipeline stage holds them, and the rest
(final norm, head) to the last host.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from apollo_sync import journal as gens
from apollo_sync.errors import ModelDirError
from apollo_sync.model_dir import INDEX_NAME, ModelDir

_LAYER = re.compile(r"(?:^|\.)layers\.([0-9]+)\.")


def host_of(name: str, stages: Sequence[range]) -> int:
    """The host (index into ``stages``, the layers each host holds) of tensor ``name``."""
    m = _LAYER.search(name)
    if m is None:
        return 0 if "embed" in name else len(stages) - 1
    layer = int(m[1])
    for h, r in enumerate(stages):
        if layer in r:
            return h
    raise ModelDirError(f"{name}: layer {layer} is in no stage of {_show(stages)}")


def parse_stages(text: str) -> list[range]:
    """``"0-17,18-35"`` (inclusive layer ranges, one per host, in host order)."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*([0-9]+)\s*-\s*([0-9]+)\s*", part)
        if m is None or int(m[1]) > int(m[2]):
            raise ValueError(
                f"--stages {text!r}: expected FIRST-LAST layer ranges, e.g. 0-17,18-35"
            )
        out.append(range(int(m[1]), int(m[2]) + 1))
    return out


def _show(stages: Sequence[range]) -> str:
    return ",".join(f"{r.start}-{r.stop - 1}" for r in stages)


def reshard(model_dir: str | os.PathLike[str], stages: Sequence[range]) -> dict[str, int]:
    """Splits every shard of ``model_dir`` that holds tensors of several hosts
    (``stages``: the decoder layers each host holds) into one file per host, and
    rewrites the index. New files are durable before the index names them; the
    old shards are removed last. Refused once the directory has a sync history
    (its logs are bound to the files). Returns each shard file's host."""
    root = Path(model_dir)
    top = gens.Layout(root).top
    if top.exists() and (any(top.rglob("*.xlog")) or (top / gens.GROUP_FILENAME).exists()):
        raise ModelDirError(
            f"{root}: has a sync history ({top}), whose logs are bound to the shard files "
            "as they are; reshard before the first sync, or remove that directory first "
            "(its rollback points are lost)"
        )
    md = ModelDir.open(root)
    by_file: dict[str, dict[int, list[str]]] = {}
    for t in md.tensors.values():
        name = Path(md.headers[t.shard].path).name
        by_file.setdefault(name, {}).setdefault(host_of(t.name, stages), []).append(t.name)
    weight_map = {t.name: Path(md.headers[t.shard].path).name for t in md.tensors.values()}
    owners: dict[str, int] = {}
    split: list[str] = []
    for name, hosts in sorted(by_file.items()):
        if len(hosts) == 1:
            owners[name] = next(iter(hosts))
            continue
        split.append(name)
        with safe_open(str(root / name), framework="pt") as f:
            meta = f.metadata()
            for h, names in sorted(hosts.items()):
                new = f"{Path(name).stem}-host{h}.safetensors"
                tmp = root / f".{new}.tmp"
                save_file({n: f.get_tensor(n) for n in sorted(names)}, str(tmp), metadata=meta)
                gens.fsync_file(tmp)
                os.replace(tmp, root / new)
                owners[new] = h
                weight_map |= dict.fromkeys(names, new)
    if not split:
        return owners
    gens.fsync_dir(root)
    index_path = root / INDEX_NAME
    index = json.loads(index_path.read_text()) if index_path.exists() else {"metadata": {}}
    index["weight_map"] = dict(sorted(weight_map.items()))
    tmp = root / f".{INDEX_NAME}.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    gens.fsync_file(tmp)
    os.replace(tmp, index_path)  # the switch: loaders now read the new files
    for name in split:
        (root / name).unlink()
    gens.fsync_dir(root)
    return owners
