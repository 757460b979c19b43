"""Learner actor: one DeepSpeed rank. Constructed empty so rank 0 can report its address before any rank
joins the process group (`init_distributed` blocks until all have)."""
from __future__ import annotations

import socket


class LearnerActor:
    def __init__(self):
        self.learner = None

    def address(self) -> tuple[str, int]:
        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, **kwargs) -> None:
        from sari_ray.engines.learner import DeepSpeedLearner

        self.learner = DeepSpeedLearner(**kwargs)

    def sft_step(self, samples, style, learning_rate):
        return self.learner.sft_step(samples, style, learning_rate)

    def grpo_step(self, records, learning_rate):
        return self.learner.grpo_step(records, learning_rate)

    def export_weight_bucket_refs(self, bucket_bytes: int, include_frozen: bool = True) -> tuple[list, int]:
        """Buckets go into the object store as each fills; only their refs travel to the driver, with their total
        size. Call on every rank (ZeRO-3 gathers are collectives); rank 0 returns the refs, the others ([], 0).
        A failing `ray.put` on rank 0 makes every rank raise (`DeepSpeedLearner.export_weight_buckets`)."""
        import ray

        nbytes = 0

        def put(bucket: bytes):
            nonlocal nbytes
            nbytes += len(bucket)
            return ray.put(bucket)

        refs = self.learner.export_weight_buckets(bucket_bytes, include_frozen, put=put)
        return refs, nbytes

    def weight_sync_plan(self, bucket_bytes: int, include_frozen: bool = True) -> list:
        return self.learner.weight_sync_plan(bucket_bytes, include_frozen)

    def open_weight_sync_store(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        """Rank 0: the collective sync group's store on this node; returns (host, port) for the engines."""
        import ray

        host = ray.util.get_node_ip_address()
        return host, self.learner.open_weight_sync_store(host, world_size, timeout_s)

    def join_weight_sync_group(self, host: str, port: int, world_size: int, timeout_s: float,
                               op_timeout_s: float | None = None) -> None:
        self.learner.join_weight_sync_group(host, port, world_size, timeout_s, op_timeout_s)

    def broadcast_weights(self, plan: list, bucket_bytes: int, include_frozen: bool = True) -> int:
        return self.learner.broadcast_weights(plan, bucket_bytes, include_frozen)

    def param_sums(self) -> dict[str, float]:
        return self.learner.param_sums()

    def reset_reference(self) -> None:
        self.learner.reset_reference()

    def save_checkpoint(self, directory, client_state=None):
        return self.learner.save_checkpoint(directory, client_state)

    def load_checkpoint(self, directory):
        return self.learner.load_checkpoint(directory)
