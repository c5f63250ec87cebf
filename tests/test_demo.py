"""The demo's generated model: a checkpoint transformers loads, of the size asked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apollo_sync import ModelDir
from apollo_sync.demo import make_demo_model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("size_mb", [8, 64])
def test_the_demo_model_loads_with_transformers(tmp_path: Path, size_mb: int) -> None:
    model = make_demo_model(tmp_path, size_mb, shards=2)
    nbytes = sum(t.end - t.start for t in ModelDir.open(model).tensors.values())
    assert 0.7 * size_mb * 1e6 < nbytes < 1.3 * size_mb * 1e6
    loaded = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    on_disk = set(ModelDir.open(model).tensors)
    assert set(loaded.state_dict()) == on_disk  # every parameter from the files, no extra
    ids = torch.randint(0, loaded.config.vocab_size, (1, 8))
    assert torch.isfinite(loaded(input_ids=ids).logits).all()
