"""The filled-frames encoder patch checks vLLM's `_process_audio_input` before wrapping it: a renamed method or
changed arguments turn it off (logged once, full window), and a batch it cannot cut still runs."""
from __future__ import annotations

import logging
import types

import pytest
import torch

from sari_ray.engines import vllm_worker_ext
from sari_ray.engines.vllm_worker_ext import WeightSyncExtension, filled_frames_patch_problem

pytestmark = pytest.mark.unit


class Qwen2AudioEncoder(torch.nn.Module):  # named as vLLM's tower; the patch only installs a forward on it
    pass


def worker(process_fn):
    """A worker extension over a fake model whose `_process_audio_input` is `process_fn` (None: absent)."""
    model = types.SimpleNamespace(audio_tower=Qwen2AudioEncoder())
    if process_fn is not None:
        model._process_audio_input = types.MethodType(process_fn, model)
    ext = object.__new__(WeightSyncExtension)
    ext.model_runner = types.SimpleNamespace(get_model=lambda: model)
    return ext, model


@pytest.fixture(autouse=True)
def fresh_log():
    vllm_worker_ext._patch_off_said.clear()
    yield
    vllm_worker_ext._patch_off_said.clear()


def test_expected_signature_is_wrapped_and_batches_are_cut():
    seen = []

    def process(self, audio_input):
        seen.append(audio_input["input_features"].shape[-1])
        return "embeddings"

    ext, model = worker(process)
    assert ext.sari_encode_filled_frames_only() is True
    mask = torch.zeros(2, 3000, dtype=torch.long)
    mask[:, :100] = 1  # 1 s clips
    assert model._process_audio_input({"input_features": torch.zeros(2, 128, 3000),
                                       "feature_attention_mask": mask}) == "embeddings"
    assert seen == [102]  # cut after the longest clip (+2 frames), not the 3000-frame window


@pytest.mark.parametrize("process, says", [
    (lambda self, audio_input, audio_lens: None, "is not (audio_input)"),  # a new required argument
    (lambda self, mm_input: None, "is not (audio_input)"),  # renamed argument
    (None, "no _process_audio_input"),  # renamed method
])
def test_changed_vllm_turns_the_patch_off_logged_once(process, says, caplog):
    with caplog.at_level(logging.WARNING, logger="sari_ray.filled_frames"):
        for _ in range(3):  # every engine start of the run: one line
            ext, model = worker(process)
            assert ext.sari_encode_filled_frames_only() is False
    lines = [r.getMessage() for r in caplog.records if r.name == "sari_ray.filled_frames"]
    assert len(lines) == 1 and says in lines[0] and "full 30 s window" in lines[0]
    assert not getattr(model.audio_tower, "encodes_filled_frames_only", False)  # the tower is left as it was
    if process is not None:
        assert model._process_audio_input.__func__ is process  # requests go to vLLM's own method


def test_optional_extra_arguments_pass_through():
    def process(self, audio_input, *, chunk=None):
        return chunk

    ext, model = worker(process)
    assert ext.sari_encode_filled_frames_only() is True
    assert model._process_audio_input({"input_features": None}, chunk=4) == 4


def test_a_batch_it_cannot_cut_runs_in_full(caplog):
    def process(self, audio_input):
        return audio_input["input_features"].shape[-1]

    ext, model = worker(process)
    assert ext.sari_encode_filled_frames_only() is True
    with caplog.at_level(logging.WARNING, logger="sari_ray.filled_frames"):
        # a mask of another shape than filled_frames expects: the wrapper falls back, the request is served
        assert model._process_audio_input({"input_features": torch.zeros(1, 128, 3000),
                                           "feature_attention_mask": "not a tensor"}) == 3000
    assert "cutting a batch failed" in caplog.text


def test_the_installed_vllm_matches():
    qwen2_audio = pytest.importorskip("vllm.model_executor.models.qwen2_audio")
    bound = types.MethodType(qwen2_audio.Qwen2AudioForConditionalGeneration._process_audio_input, object())
    assert filled_frames_patch_problem(bound) is None
