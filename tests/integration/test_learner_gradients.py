"""The learner's step gradient does not depend on how the batch is split: 2 DeepSpeed ranks (gloo) x 2-3
micro-batches give the gradient of one process with the whole batch, for every loss_type, with uneven completion
lengths, padding rows and truncated-importance-sampling weights. This is the real learner and the real
DeepSpeed gradient reduction, under ZeRO-2 and ZeRO-3 (the shipped configs' stages; the reduced gradient read
with `deepspeed.utils.safe_get_full_grad`).

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


def _run(rank, world, port, model, rows, out, micro, zero_stage):
    import torch
    from deepspeed.utils import safe_get_full_grad

    from sari_ray.data.schema import AudioMCQ
    from sari_ray.engines.learner import DeepSpeedLearner
    from sari_ray.grpo import GRPOSettings

    grads, forwards = {}, {}
    for loss_type in LOSS_TYPES:
        settings = GRPOSettings(beta=0.0, num_generations=2, loss_type=loss_type, max_completion_length=12,
                                mask_truncated_completions=True, vllm_importance_sampling_correction=True)
        if not grads:
            learner = DeepSpeedLearner(model, rank=rank, world_size=world, master_port=port, zero_stage=zero_stage,
                                       micro_batch_size=micro, grpo_settings=settings, device="cpu", torch_threads=1,
                                       gradient_clipping=0.0)
            captured = {}

            def read_then(step):  # read the reduced gradient (a collective under ZeRO), then step at lr 0
                def wrapped(*args, **kwargs):
                    captured.clear()
                    for n, p in learner.engine.module.named_parameters():
                        grad = safe_get_full_grad(p)
                        if grad is not None:
                            captured[n] = grad.detach().float().clone().reshape(getattr(p, "ds_shape", p.shape))
                    return step(*args, **kwargs)
                return wrapped
            if zero_stage == 3:  # ZeRO-3 fills its fp32 gradient partitions inside step(), before the inner optimizer's
                inner = learner.engine.optimizer.optimizer
                inner.step = read_then(inner.step)
            else:
                learner.engine.step = read_then(learner.engine.step)
        learner.grpo = settings
        records = _records(rows, lambda r: learner.render(AudioMCQ.from_dict(r), "implicit"))
        # the driver's padding rows: every rank runs as many micro-batches (ZeRO reduces at each one)
        records = records + [{**records[0], "weight": 0.0}] * (2 * (world - 1))
        shard = records[rank::world] if world > 1 else records
        metrics = learner.grpo_step(shard, 0.0)  # lr 0: the weights stay those every run starts from
        grads[loss_type] = {n: g.clone() for n, g in captured.items()}
        forwards[loss_type] = metrics["learn/encoder_forwards_per_clip_per_pass"]
    if rank == 0:
        torch.save({"grads": grads, "forwards": forwards}, out)


def _spawn(world, model, rows, out, micro, zero_stage):
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_run, args=(world, port, str(model), rows, str(out), micro, zero_stage), nprocs=world)


def test_split_step_gradient_equals_whole_batch_gradient(tiny_qwen2_audio, synth_data, tmp_path):
    import torch

    from sari_ray.data.readers import read_samples

    rows = [s.to_dict() for s in read_samples(str(synth_data), "jsonl")[:4]]
    _spawn(1, tiny_qwen2_audio, rows, tmp_path / "whole.pt", micro=16, zero_stage=0)
    whole = torch.load(tmp_path / "whole.pt")
    assert set(whole["forwards"].values()) == {1.0}
    for stage in (2, 3):
        _spawn(2, tiny_qwen2_audio, rows, tmp_path / f"split{stage}.pt", micro=2, zero_stage=stage)  # 2 ranks x 3
        split = torch.load(tmp_path / f"split{stage}.pt")
        assert set(split["forwards"].values()) == {1.0}
        for loss_type in LOSS_TYPES:
            a, b = whole["grads"][loss_type], split["grads"][loss_type]
            assert a.keys() == b.keys() and len(a) > 10
            assert max(float(v.abs().max()) for v in a.values()) > 1e-4  # a gradient that is there
            assert max(float(v.abs().max()) for n, v in a.items() if "audio_tower" in n) > 1e-6  # through the encoder
            diff = max(float((a[n] - b[n]).abs().max()) for n in a)
            assert diff <= 1e-6, f"ZeRO-{stage} {loss_type}: split gradient differs from the whole batch's by {diff}"
