"""Engines: the vLLM rollout wrapper, its worker extension and the weight-bucket format shared with the
learners. Usable without Ray; vLLM is imported only when an engine is created."""
