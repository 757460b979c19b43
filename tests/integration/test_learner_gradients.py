"""The learner's step gradient does not depend on how the batch is split: 2 DeepSpeed ranks (gloo) x 2
micro-batches give the gradient of one process with the whole batch, for every loss_type, with uneven completion
lengths, a padding row and truncated-importance-sampling weights. This is the real learner and the real
DeepSpeed gradient averaging (ZeRO stage 0, where the reduced gradient is readable in `param.grad`).

A clip's rows span micro-batches on each rank, so the split run shares each clip's audio embeddings across
micro-batches (the encoder's backward riding on the last one) while the whole batch, one micro-batch, encodes
as the per-micro-batch path did: equal gradients, audio tower included, and one tower forward per clip per
pass in both."""
from __future__ import annotations

import socket

import pytest

pytestmark = pytest.mark.integration

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
LENGTHS = [2, 2, 10, 10, 3, 7, 5, 4]  # rank 0 gets the short ones: the case per-shard means got wrong


def _records(sample_rows, render):
    records = []
    for i, length in enumerate(LENGTHS):
        row = sample_rows[i % 3]  # rank 0 gets clips 0, 2, 1, 0: clip 0 in both of its micro-batches
        records.append({"prompt": render(row), "audio": row["audio"], "completion_ids": [20 + (i + t) % 50 for t in range(length)],
                        "sampling_logprobs": [-4.0 - 0.1 * t for t in range(length)], "advantage": (-1.0) ** i * (1 + i / 8),
                        "truncated": i == 5, "weight": 1.0})
    return records


def _run(rank, world, port, model, rows, out, micro):
    import torch

    from sari_ray.data.schema import AudioMCQ
    from sari_ray.engines.learner import DeepSpeedLearner
    from sari_ray.grpo import GRPOSettings

    grads, forwards = {}, {}
    for loss_type in LOSS_TYPES:
        settings = GRPOSettings(beta=0.0, num_generations=2, loss_type=loss_type, max_completion_length=12,
                                mask_truncated_completions=True, vllm_importance_sampling_correction=True)
        if not grads:
            learner = DeepSpeedLearner(model, rank=rank, world_size=world, master_port=port, zero_stage=0,
                                       micro_batch_size=micro, grpo_settings=settings, device="cpu", torch_threads=1,
                                       gradient_clipping=0.0)
            captured = {}

            def capture():  # read the reduced gradient, apply nothing
                captured.clear()
                captured.update({n: p.grad.detach().clone() for n, p in learner.engine.module.named_parameters()
                                 if p.grad is not None})
                learner.engine.zero_grad()
            learner.engine.step = capture
        learner.grpo = settings
        records = _records(rows, lambda r: learner.render(AudioMCQ.from_dict(r), "implicit"))
        records = records + [{**records[0], "weight": 0.0}] * (world - 1)  # the driver's padding row
        shard = records[rank::world] if world > 1 else records
        metrics = learner.grpo_step(shard, 1e-3)
        grads[loss_type] = {n: g.clone() for n, g in captured.items()}
        forwards[loss_type] = metrics["learn/encoder_forwards_per_clip_per_pass"]
    if rank == 0:
        torch.save({"grads": grads, "forwards": forwards}, out)


def _spawn(world, model, rows, out, micro):
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_run, args=(world, port, str(model), rows, str(out), micro), nprocs=world)


def test_split_step_gradient_equals_whole_batch_gradient(tiny_qwen2_audio, synth_data, tmp_path):
    import torch

    from sari_ray.data.readers import read_samples

    rows = [s.to_dict() for s in read_samples(str(synth_data), "jsonl")[:4]]
    _spawn(1, tiny_qwen2_audio, rows, tmp_path / "whole.pt", micro=16)
    _spawn(2, tiny_qwen2_audio, rows, tmp_path / "split.pt", micro=2)  # 2 ranks x 2+ micro-batches
    whole, split = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "split.pt")
    assert set(whole["forwards"].values()) == set(split["forwards"].values()) == {1.0}
    whole, split = whole["grads"], split["grads"]
    for loss_type in LOSS_TYPES:
        a, b = whole[loss_type], split[loss_type]
        assert a.keys() == b.keys() and len(a) > 10
        assert max(float(v.abs().max()) for v in a.values()) > 1e-4  # a gradient that is there
        assert max(float(v.abs().max()) for n, v in a.items() if "audio_tower" in n) > 1e-6  # through the encoder
        diff = max(float((a[n] - b[n]).abs().max()) for n in a)
        assert diff <= 1e-6, f"{loss_type}: split gradient differs from the whole-batch one by {diff}"
