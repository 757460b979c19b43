"""Shared fixtures: tiny checkpoints and synthetic data are built once per test session (they are real
artefacts: a random-init model of the published architecture, wav files on disk)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MMAU_TEST_MINI = SHARED / "data" / "mmau" / "mmau-test-mini.json"
KUBERAY_CRDS = SHARED / "data" / "kuberay"

# Everything a vLLM engine / DeepSpeed / torch process spawns inherits this; 2 cores are shared.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_qwen2_audio(tmp_path_factory) -> Path:
    from sari_ray.models.tiny import build_tiny

    out = tmp_path_factory.mktemp("tiny-qwen2-audio")
    build_tiny("qwen2-audio", out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_qwen2_5_omni(tmp_path_factory) -> Path:
    from sari_ray.models.tiny import build_tiny

    out = tmp_path_factory.mktemp("tiny-qwen2.5-omni")
    build_tiny("qwen2.5-omni", out, seed=0)
    return out


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A small synthetic set (jsonl + wav files); returns the jsonl path."""
    from sari_ray.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    return synthesize(out, n=48, seed=0)
