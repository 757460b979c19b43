"""Model side: tiny random-init checkpoints of the real architectures (`tiny`) and the transformers policy
used by the learners and the parity tests (`policy`). vLLM lives in `sari_ray.engines`."""
