"""Methods vLLM injects into its workers (`LLM(worker_extension_cls=...)`), called via `collective_rpc`.

Names carry a `sari_` prefix: the worker already has `update_weights` and friends, and an extension method
with a colliding name would shadow or be shadowed silently.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

# Test-only: seconds a worker sleeps after each bucket it receives by broadcast, printing a line to stderr
# first, so that a test can kill a worker while a collective sync is in flight (a tiny model's broadcast
# takes milliseconds). Unset (the default) it does nothing; no run should set it.
TEST_RECEIVE_PAUSE_ENV = "SARI_TEST_RECEIVE_PAUSE_S"

_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                   "vllm.model_executor.model_loader.reload.inplace")


class _FrozenEncoderFilter(logging.Filter):
    """A sync that leaves out the frozen audio encoder (`learner.train_audio_encoder: false`) makes vLLM warn once
    per encoder layer it did not get (~200 lines per sync at 7B), naming only the layer class. While no encoder
    tensor has arrived, drop those, and drop the encoder's names from the list of weights not loaded: any other
    name there is still reported. Rotary embeddings are dropped always: their cos/sin cache is derived, never
    in a checkpoint, and vLLM keeps the one it has (one warning per sync otherwise)."""

    def __init__(self):
        super().__init__()
        self.encoder_received = False

    def filter(self, record: logging.LogRecord) -> bool:
        failed_load = "Failed to load weights" in str(record.msg)
        if failed_load and str((record.args or ("",))[0]).endswith("RotaryEmbedding"):
            return False
        if self.encoder_received:
            return True
        if failed_load:
            return False
        if "were not loaded" in str(record.msg) and record.args and isinstance(record.args[0], (set, frozenset)):
            rest = {n for n in record.args[0] if "audio_tower." not in n}
            if not rest:
                return False
            record.args = (rest,)
        return True

    def watch(self, tensors: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
        for name, tensor in tensors:
            if "audio_tower." in name:
                self.encoder_received = True
            yield name, tensor


@contextlib.contextmanager
def _frozen_encoder_filter():
    log_filter = _FrozenEncoderFilter()
    loggers = [logging.getLogger(name) for name in _RELOAD_LOGGERS]
    for logger in loggers:
        logger.addFilter(log_filter)
    try:
        yield log_filter
    finally:
        for logger in loggers:
            logger.removeFilter(log_filter)


FILLED_FRAMES_LOG = logging.getLogger("sari_ray.filled_frames")
_patch_off_said: set[str] = set()


def filled_frames_patch_problem(process) -> str | None:
    """Why the filled-frames patch cannot wrap `process`, vLLM's bound `Qwen2AudioForConditionalGeneration.
    _process_audio_input` (checked against vLLM 0.32 / 0.33: one argument, the audio input), or None. A renamed
    method or one that takes other required arguments would otherwise be skipped silently or fail every request."""
    import inspect

    if process is None or not callable(process):
        return "this vLLM's Qwen2-Audio model has no _process_audio_input (renamed?)"
    try:
        params = list(inspect.signature(process).parameters.values())
    except (TypeError, ValueError):
        return "the signature of this vLLM's _process_audio_input cannot be read"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not positional or positional[0].name != "audio_input" or len(required) != 1:
        return (f"this vLLM's _process_audio_input{inspect.signature(process)} is not (audio_input) as in vLLM "
                f"0.32 / 0.33")
    return None


def _log_patch_off_once(problem: str) -> None:
    if problem not in _patch_off_said:
        _patch_off_said.add(problem)
        FILLED_FRAMES_LOG.warning("the filled-frames audio encoder patch is off: %s; the encoder runs on the "
                                  "full 30 s window (slower on short clips, same results)", problem)


class WeightSyncExtension:
    """Worker-side half of `VLLMEngine.load_weights` / `receive_weights` / `param_sums` (mixed into the worker).

    One sync is one `reload_weights` call whose iterator yields the tensors as they arrive, bucket by bucket:
    vLLM's in-place reload finalises every layer at the end of each call, so a layer split across calls (q/k/v
    feed one fused qkv_proj) ends up half loaded -- NaN logits, measured with one tensor per call -- and every
    call warns about all the layers it did not get. Buckets hold whole layers and are applied as they arrive,
    so a worker holds about one bucket beyond the model, never the whole model.

    Object-store path: the reload runs in a thread for the length of the sync (`sari_stream_begin`), fed one
    bucket per RPC (`sari_stream_bucket`, which returns once that bucket is applied); `sari_stream_end` closes
    it. Collective path: `sari_receive_broadcast` runs the reload over tensors received from the sync group.
    During a sync the engine must not generate (layers not yet loaded sit on the meta device).
    """

    def sari_stream_begin(self) -> None:
        import queue
        import threading

        if self.__dict__.get("_sari_stream") is not None:
            raise RuntimeError("a weight stream is already open on this worker (sari_stream_end was not called)")
        stream = {"inbox": queue.Queue(), "acks": queue.Queue(), "count": 0}

        def tensors():
            from safetensors.torch import load

            while (data := stream["inbox"].get()) is not None:
                bucket = load(data)
                del data
                stream["count"] += len(bucket)
                yield from bucket.items()
                del bucket
                stream["acks"].put(None)  # asked for more: this bucket's layers are complete and applied

        def run():
            try:
                with _frozen_encoder_filter() as log_filter:
                    self.reload_weights(weights_iterator=log_filter.watch(tensors()), is_checkpoint_format=True)
                stream["acks"].put(None)
            except BaseException as err:  # reported by the stream call waiting for it
                stream["acks"].put(err)

        stream["thread"] = threading.Thread(target=run, name="sari-weight-stream", daemon=True)
        self.__dict__["_sari_stream"] = stream
        stream["thread"].start()

    def sari_stream_bucket(self, data: bytes) -> int:
        """Apply one safetensors bucket (published checkpoint names, whole layers); returns once it is applied,
        so the worker never holds more than this bucket."""
        stream = self._sari_open_stream()
        stream["inbox"].put(data)
        del data
        self._sari_wait(stream)
        return stream["count"]

    def sari_stream_end(self) -> int:
        """Close the stream: vLLM finalises the reload (layers that got no tensor keep their weights). Returns
        the tensor count."""
        stream = self._sari_open_stream()
        stream["inbox"].put(None)
        self._sari_wait(stream)
        stream["thread"].join()
        self.__dict__["_sari_stream"] = None
        return stream["count"]

    def sari_stream_abort(self) -> None:
        """After a failed sync: end the reload if it still runs (the layers already applied stay applied)."""
        stream = self.__dict__.pop("_sari_stream", None)
        if stream is not None and stream["thread"].is_alive():
            stream["inbox"].put(None)
            stream["thread"].join(timeout=60)

    def _sari_wait(self, stream: dict) -> None:
        error = stream["acks"].get()
        if error is not None:
            self.__dict__["_sari_stream"] = None
            raise RuntimeError(f"weight reload failed: {error!r}") from error

    def _sari_open_stream(self) -> dict:
        stream = self.__dict__.get("_sari_stream")
        if stream is None:
            raise RuntimeError("no weight stream is open on this worker (call sari_stream_begin first)")
        return stream

    def sari_join_sync_group(self, host: str, port: int, world_size: int, rank_offset: int, timeout_s: float,
                             op_timeout_s: float | None = None) -> int:
        """Join the collective sync group as rank `rank_offset + this worker's rank in its engine`, within
        `timeout_s`; each broadcast on it then times out after `op_timeout_s`. A group this worker still holds
        (the group is formed again after a worker's restart) is aborted and dropped first."""
        from sari_ray.engines.weight_sync_group import backend_for, join_group

        self.sari_leave_sync_group()
        rank = rank_offset + int(getattr(self, "rank", 0))
        device = self.model_runner.device
        self.__dict__["_sari_group"] = join_group(host, port, rank, world_size, backend=backend_for(device),
                                                  timeout_s=timeout_s, op_timeout_s=op_timeout_s)
        return rank

    def sari_leave_sync_group(self) -> None:
        from sari_ray.engines.weight_sync_group import release_group

        group = self.__dict__.pop("_sari_group", None)
        if group is not None:
            release_group(group)

    def sari_receive_broadcast(self, plan: list) -> int:
        """One sync over the collective group: receive the buckets `plan` lays out (from learner rank 0) and
        reload them as they arrive. Returns the tensor count. A receive that fails (a member died, an operation
        timed out) leaves the group broken: it is dropped here, and the driver forms a new one."""
        from sari_ray.engines.weight_sync_group import receive_buckets

        group = self.__dict__.get("_sari_group")
        if group is None:
            raise RuntimeError("this worker is in no weight-sync group (sari_join_sync_group was not called)")
        count = 0
        pause_s = float(os.environ.get(TEST_RECEIVE_PAUSE_ENV) or 0)

        def pause(bucket: int) -> None:  # test-only (see TEST_RECEIVE_PAUSE_ENV)
            print(f"sari test pause: weight bucket {bucket + 1}/{len(plan)} received, pausing {pause_s} s",
                  file=sys.stderr, flush=True)
            time.sleep(pause_s)

        def tensors():
            nonlocal count
            for item in receive_buckets(group, plan, self.model_runner.device, on_bucket=pause if pause_s else None):
                count += 1
                yield item

        try:
            with _frozen_encoder_filter() as log_filter:
                self.reload_weights(weights_iterator=log_filter.watch(tensors()), is_checkpoint_format=True)
        except BaseException:
            self.sari_leave_sync_group()
            raise
        return count

    def sari_encode_filled_frames_only(self) -> bool:
        """Qwen2-Audio: run the audio encoder on the frames a batch's clips fill, not the whole 30 s window
        (`policy.encode_filled_frames_only`, the learner does the same). False where the model is another arch,
        or this vLLM's `_process_audio_input` is missing or takes other arguments (`filled_frames_patch_problem`:
        logged once, and the full window runs, as before). A batch the wrapper cannot cut also runs in full."""
        import copy

        import torch

        from sari_ray.models.policy import encode_filled_frames_only, filled_frames

        model = self.model_runner.get_model()
        tower, process = getattr(model, "audio_tower", None), getattr(model, "_process_audio_input", None)
        if type(tower).__name__ != "Qwen2AudioEncoder":
            return False
        problem = filled_frames_patch_problem(process)
        if problem:
            _log_patch_off_once(problem)
            return False
        encode_filled_frames_only(tower)

        def process_filled_frames(audio_input, *args, **kwargs):
            try:
                features = audio_input.get("input_features")
                if isinstance(features, torch.Tensor) and features.dim() == 3:  # (clips, mels, 3000), stacked
                    cut = filled_frames(features, audio_input.get("feature_attention_mask"))
                    audio_input = copy.copy(audio_input)
                    if isinstance(audio_input, dict):
                        audio_input["input_features"] = cut
                    else:
                        audio_input.input_features = cut
            except Exception as err:  # noqa: BLE001 - never fail a request over an optimisation
                _log_patch_off_once(f"cutting a batch failed ({type(err).__name__}: {err})")
            return process(audio_input, *args, **kwargs)

        model._process_audio_input = process_filled_frames
        return True

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
