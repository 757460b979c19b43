"""An HF export over the shard limit is written as published checkpoints are: numbered shards and an index that
maps every tensor to its file (what transformers and vLLM read); one shard stays model.safetensors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sari_ray.engines.learner import _name_shards

pytestmark = pytest.mark.unit


def test_several_shards_get_an_index(tmp_path):
    save_file({"a.weight": torch.ones(2)}, str(tmp_path / "model-00001.safetensors"))
    save_file({"b.weight": torch.zeros(3), "c.bias": torch.ones(1)}, str(tmp_path / "model-00002.safetensors"))
    _name_shards(tmp_path, ["model-00001.safetensors", "model-00002.safetensors"])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a.weight": "model-00001-of-00002.safetensors",
                                   "b.weight": "model-00002-of-00002.safetensors",
                                   "c.bias": "model-00002-of-00002.safetensors"}
    assert torch.equal(load_file(str(tmp_path / "model-00002-of-00002.safetensors"))["b.weight"], torch.zeros(3))


def test_one_shard_is_model_safetensors(tmp_path):
    save_file({"a.weight": torch.ones(2)}, str(tmp_path / "model-00001.safetensors"))
    _name_shards(tmp_path, ["model-00001.safetensors"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
