"""GRPO math: group advantages, KL estimators, the clipped policy loss and its aggregations.

Pure torch (no Ray, no engines) so every variant is testable on CPU in milliseconds. Each family is a
small registry keyed by a str-Enum; the public functions always go through it, and an unknown name lists
the valid ones. Shapes: B = completions in the micro-batch (num_prompts * G), T = completion length
(right-padded, `completion_mask` marks real tokens), V = vocabulary, P = prompts, G = num_generations.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Callable, Sequence, TypeVar

import torch

__all__ = [
    "AdvantageEstimator", "KLEstimator", "LossAggregation", "GRPOSettings",
    "StepNormalizer", "compute_advantages", "uniform_group_mask", "kl_penalty", "policy_loss", "aggregate_loss",
    "mask_truncated", "entropy_from_logits", "gather_logprobs", "metrics_to_floats",
]

E = TypeVar("E", bound=Enum)


def _parse(enum_cls: type[E], value: str | E, what: str) -> E:
    """Name -> enum member, or a ValueError that lists the valid names."""
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"unknown {what} {value!r}; valid: {valid}") from None


# ---------------------------------------------------------------------------------------------- advantages
class AdvantageEstimator(str, Enum):
    GRPO = "grpo"        # (r - mean) / (std + eps): DeepSeekMath (Shao et al. 2024), R1-AQA
    DR_GRPO = "dr_grpo"  # r - mean, no std: Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training")


def _adv_grpo(grouped: torch.Tensor, eps: float) -> torch.Tensor:
    """(P, G) -> (P, G). Unbiased std as in TRL, so numbers match R1-AQA's runs."""
    return (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + eps)


def _adv_dr_grpo(grouped: torch.Tensor, eps: float) -> torch.Tensor:
    """(P, G) -> (P, G). No std: dividing by it up-weights near-uniform (too easy / too hard) groups."""
    return grouped - grouped.mean(1, keepdim=True)


ADVANTAGE_ESTIMATORS: dict[AdvantageEstimator, Callable[[torch.Tensor, float], torch.Tensor]] = {
    AdvantageEstimator.GRPO: _adv_grpo,
    AdvantageEstimator.DR_GRPO: _adv_dr_grpo,
}


def _grouped(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    if rewards.dim() != 1 or num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be 1-D with a multiple of num_generations={num_generations} "
                         f"entries (prompt-major, G contiguous completions each); got shape {tuple(rewards.shape)}")
    return rewards.view(-1, num_generations)


def compute_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: bool = True,
                       eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages. rewards: (P*G,) float, the G completions of a prompt contiguous.

    Returns (P*G,) float32. `scale_rewards=False` is Dr. GRPO (no division by the group std).
    num_generations must be >= 2 when scaling (the std of one sample is undefined).
    """
    if scale_rewards and num_generations < 2:
        raise ValueError(f"num_generations={num_generations}: group std needs >= 2 completions per prompt")
    name = AdvantageEstimator.GRPO if scale_rewards else AdvantageEstimator.DR_GRPO
    fn = ADVANTAGE_ESTIMATORS[_parse(AdvantageEstimator, name, "advantage estimator")]
    return fn(_grouped(rewards.float(), num_generations), eps).reshape(-1)


def uniform_group_mask(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(P*G,) -> bool (P,): True where all G rewards of a prompt are equal, i.e. zero advantage / no signal.

    Used by `drop_uniform_groups` (DAPO's dynamic sampling filter); expand with `.repeat_interleave(G)`.
    """
    g = _grouped(rewards, num_generations)
    return g.amax(1) == g.amin(1)


# ---------------------------------------------------------------------------------------------- KL
class KLEstimator(str, Enum):
    """Estimators of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence", 2020)."""

    K1 = "k1"  # log(pi/ref): unbiased, high variance, can be negative per token
    K2 = "k2"  # 0.5 * log(pi/ref)^2: biased, low variance, >= 0
    K3 = "k3"  # ref/pi - log(ref/pi) - 1: unbiased, >= 0; GRPO (DeepSeekMath) and R1-AQA (beta 0.04)


def _kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


def _kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


def _kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


KL_ESTIMATORS: dict[KLEstimator, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    KLEstimator.K1: _kl_k1, KLEstimator.K2: _kl_k2, KLEstimator.K3: _kl_k3,
}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str | KLEstimator = "k3"
               ) -> torch.Tensor:
    """Per-token KL estimate. logprobs, ref_logprobs: (B, T) -> (B, T). Gradient flows through `logprobs`."""
    return KL_ESTIMATORS[_parse(KLEstimator, estimator, "kl_estimator")](logprobs, ref_logprobs)


# ---------------------------------------------------------------------------------------------- aggregation
class LossAggregation(str, Enum):
    """How per-token losses become one scalar. Every variant is defined over the whole optimizer step (all
    micro-batches of all data-parallel ranks, see `StepNormalizer`), so splitting a batch never changes the
    gradient. Over a whole step `bnpo` and `dapo` coincide (TRL's bnpo normalises by the local batch's tokens,
    which differs from dapo only once a batch is split; here it is never split)."""

    GRPO = "grpo"        # mean over sequences of per-sequence token means (DeepSeekMath; R1-AQA via TRL)
    BNPO = "bnpo"        # token mean over the batch (TRL's "bnpo")
    DAPO = "dapo"        # token mean over the global batch (DAPO, Yu et al. 2025)
    DR_GRPO = "dr_grpo"  # sum / (num_sequences * max_completion_length): length-unbiased constant (Dr. GRPO)


@dataclass(frozen=True)
class StepNormalizer:
    """Denominators of one optimizer step, counted over every micro-batch of every rank.

    Padding rows (weight 0) and masked tokens (e.g. `mask_truncated_completions`) count nowhere: a sequence
    counts when it has at least one active token. The learner all-reduces the local counts once per step.
    """

    num_tokens: float
    num_sequences: float

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "StepNormalizer":
        """Counts of one (B, T) mask: the whole step when the batch is not split."""
        mask = mask.float()
        return cls(float(mask.sum()), float((mask.sum(-1) > 0).sum()))


def _agg_grpo(per_token, mask, norm: StepNormalizer, max_completion_length):
    """Each sequence weighs the same, so long answers' tokens count less (the length bias Dr. GRPO names)."""
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / max(norm.num_sequences, 1.0)


def _agg_token_mean(per_token, mask, norm: StepNormalizer, max_completion_length):
    return (per_token * mask).sum() / max(norm.num_tokens, 1.0)


def _agg_dr_grpo(per_token, mask, norm: StepNormalizer, max_completion_length):
    if max_completion_length is None or max_completion_length < 1:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length >= 1 (the constant normaliser); "
                         f"got {max_completion_length!r}")
    return (per_token * mask).sum() / (max(norm.num_sequences, 1.0) * max_completion_length)


LOSS_AGGREGATIONS: dict[LossAggregation, Callable[..., torch.Tensor]] = {
    LossAggregation.GRPO: _agg_grpo, LossAggregation.BNPO: _agg_token_mean,
    LossAggregation.DAPO: _agg_token_mean, LossAggregation.DR_GRPO: _agg_dr_grpo,
}


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str | LossAggregation = "grpo", *,
                   max_completion_length: int | None = None, normalizer: StepNormalizer | None = None
                   ) -> torch.Tensor:
    """(B, T) per-token loss + (B, T) mask -> scalar, by the named aggregation.

    `normalizer`: the step's counts when this (B, T) is one micro-batch of a larger step; the sum of the
    micro-batches' losses is then the whole step's loss. None: this batch is the whole step.
    """
    fn = LOSS_AGGREGATIONS[_parse(LossAggregation, loss_type, "loss_type")]
    mask = mask.to(per_token.dtype)
    return fn(per_token, mask, normalizer or StepNormalizer.from_mask(mask), max_completion_length)


# ---------------------------------------------------------------------------------------------- policy loss
def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, advantages: torch.Tensor,
                completion_mask: torch.Tensor, *, epsilon: float = 0.2, epsilon_high: float | None = None,
                beta: float = 0.0, ref_logprobs: torch.Tensor | None = None,
                kl_estimator: str | KLEstimator = "k3", loss_type: str | LossAggregation = "grpo",
                max_completion_length: int | None = None, normalizer: StepNormalizer | None = None,
                sampling_logprobs: torch.Tensor | None = None, importance_sampling_cap: float = 2.0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-ratio GRPO loss (PPO surrogate, Schulman et al. 2017, with group advantages).

    logprobs (B, T) with grad; old_logprobs (B, T) from the policy that sampled, as the learner computes it
    (None: on-policy, mu = 1, uses logprobs.detach() so ratio == 1 with the right gradient); advantages (B,);
    completion_mask (B, T) bool/0-1. per-token = -min(ratio*A, clip(ratio, 1-epsilon, 1+epsilon_high)*A)
    [* is_weight] + beta*KL. epsilon_high defaults to epsilon; a larger one is DAPO's clip-higher. beta == 0
    computes no KL and needs no ref_logprobs (no reference model is loaded). `normalizer`: see
    `aggregate_loss`.

    sampling_logprobs (B, T): the rollout engine's log-probs of the same tokens. When given, the policy-gradient
    term is weighted per token by truncated importance sampling, min(exp(old - sampling), cap), detached
    (TIS; TRL's `vllm_importance_sampling_correction`): it corrects for the sampler (vLLM: bf16, other
    kernels, stale weights) not being exactly the policy the learner computes. The KL term is not weighted.

    Returns (loss scalar, metrics). Metrics are detached 0-dim tensors: `grpo/loss`, `grpo/ratio_mean`,
    `grpo/clip_fraction_low`, `grpo/clip_fraction_high`, `grpo/clip_fraction` (fractions of unmasked
    tokens whose gradient the clip removed, as in TRL), `grpo/kl` when beta > 0, and with TIS
    `grpo/is_ratio_mean`, `grpo/is_ratio_max` (before the cap) and `grpo/is_capped_fraction`.
    """
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    if logprobs.shape != old_logprobs.shape or logprobs.shape != completion_mask.shape:
        raise ValueError(f"shape mismatch: logprobs {tuple(logprobs.shape)}, old_logprobs "
                         f"{tuple(old_logprobs.shape)}, completion_mask {tuple(completion_mask.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be (B,)={tuple(logprobs.shape[:1])}; got {tuple(advantages.shape)}")
    mask = completion_mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)                      # (B, 1)

    ratio = torch.exp(logprobs - old_logprobs)                           # (B, T)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)                   # (B, T)

    is_ratio = None
    if sampling_logprobs is not None:
        if sampling_logprobs.shape != logprobs.shape:
            raise ValueError(f"sampling_logprobs {tuple(sampling_logprobs.shape)} must match logprobs "
                             f"{tuple(logprobs.shape)}")
        is_ratio = torch.exp(old_logprobs.detach() - sampling_logprobs.to(logprobs.dtype))  # (B, T)
        per_token = per_token * torch.clamp(is_ratio, max=importance_sampling_cap)

    kl = None
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError(f"beta={beta} needs ref_logprobs (B, T) from the frozen reference model; "
                             "pass them, or set beta=0 to train without a KL term")
        kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        per_token = per_token + beta * kl

    loss = aggregate_loss(per_token, mask, loss_type, max_completion_length=max_completion_length,
                          normalizer=normalizer)

    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        low = ((ratio < 1.0 - eps_low) & (adv < 0)).to(mask.dtype) * mask
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).to(mask.dtype) * mask
        metrics = {
            "grpo/loss": loss.detach(),
            "grpo/ratio_mean": (ratio * mask).sum() / n,
            "grpo/clip_fraction_low": low.sum() / n,
            "grpo/clip_fraction_high": high.sum() / n,
            "grpo/clip_fraction": (low + high).sum() / n,
        }
        if kl is not None:
            metrics["grpo/kl"] = (kl * mask).sum() / n
        if is_ratio is not None:
            metrics["grpo/is_ratio_mean"] = (is_ratio * mask).sum() / n
            metrics["grpo/is_ratio_max"] = torch.where(mask > 0, is_ratio, torch.zeros_like(is_ratio)).max()
            metrics["grpo/is_capped_fraction"] = ((is_ratio > importance_sampling_cap).to(mask.dtype) * mask).sum() / n
    return loss, metrics


def metrics_to_floats(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Detached tensors -> python floats (one sync per value; call once per step, in the learner)."""
    return {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------- masks, logits
TRUNCATED_FINISH_REASONS = frozenset({"length"})  # vLLM: max_tokens reached before EOS / a stop string


def mask_truncated(completion_mask: torch.Tensor, truncated: torch.Tensor | Sequence[bool] | Sequence[str]
                   ) -> torch.Tensor:
    """Zero the mask rows of truncated completions (DAPO's overlong filtering): a cut-off answer is neither
    right nor wrong, so it should not push the policy. completion_mask (B, T); truncated: bool (B,) or
    vLLM finish reasons (B,) where "length" means truncated. Returns a mask of the input's dtype."""
    if len(truncated) and isinstance(truncated[0], str):
        flags = torch.tensor([r in TRUNCATED_FINISH_REASONS for r in truncated], device=completion_mask.device)
    else:
        flags = torch.as_tensor(truncated, dtype=torch.bool, device=completion_mask.device)
    if flags.shape != completion_mask.shape[:1]:
        raise ValueError(f"truncated flags must be (B,)={tuple(completion_mask.shape[:1])}; got {tuple(flags.shape)}")
    return completion_mask * (~flags).unsqueeze(1).to(completion_mask.dtype)


def _row_chunks(n: int, chunk: int):
    for start in range(0, n, max(1, chunk)):
        yield slice(start, min(n, start + max(1, chunk)))


def gather_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, chunk_size: int = 4) -> torch.Tensor:
    """log p(token) under `logits`, in fp32. logits (B, T, V), token_ids (B, T) long -> (B, T) float32.

    Caller aligns: logits[:, t] is the distribution that produced token_ids[:, t] (shift the model output
    by one). Rows go through in chunks so only chunk_size*T*V fp32 values exist at once (V ~ 150k for Qwen).
    """
    if logits.shape[:2] != token_ids.shape:
        raise ValueError(f"logits (B, T, V) {tuple(logits.shape)} and token_ids (B, T) {tuple(token_ids.shape)} differ")
    out = []
    for rows in _row_chunks(logits.shape[0], chunk_size):
        lg = logits[rows].float()
        picked = lg.gather(-1, token_ids[rows].unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(lg, dim=-1))
    return torch.cat(out, 0) if out else logits.new_zeros(token_ids.shape, dtype=torch.float32)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor, chunk_size: int = 4) -> torch.Tensor:
    """Mean per-token entropy (nats) over unmasked tokens, for logging collapse. logits (B, T, V),
    mask (B, T) -> 0-dim float32 tensor (no grad)."""
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for rows in _row_chunks(logits.shape[0], chunk_size):
        lg = logits[rows].float()
        logp = torch.log_softmax(lg, dim=-1)
        ent = -(logp.exp() * logp).sum(-1)                               # (b, T)
        total += (ent * mask[rows].float()).sum()
    return total / mask.float().sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class GRPOSettings:
    """The GRPO knobs (names as in TRL's GRPOConfig; defaults from R1-AQA, arXiv 2503.11197: G=8, beta 0.04 k3)."""

    num_generations: int = 8                  # G completions per prompt (R1-AQA: 8)
    scale_rewards: bool = True                # divide by group std (GRPO); False = Dr. GRPO
    epsilon: float = 0.2                      # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None         # upper clip, None = epsilon; DAPO clip-higher uses 0.28
    beta: float = 0.04                        # KL weight (R1-AQA 0.04); 0 = no reference model
    kl_estimator: str = "k3"                  # k1 | k2 | k3
    loss_type: str = "grpo"                   # grpo | bnpo | dapo | dr_grpo
    num_iterations: int = 1                   # mu: policy updates per rollout batch (1 = strictly on-policy)
    drop_uniform_groups: bool = False         # skip prompts whose G rewards are all equal (no signal)
    mask_truncated_completions: bool = False  # DAPO: truncated completions contribute no loss
    max_completion_length: int = 256          # R1-AQA 256; also the dr_grpo normaliser
    advantage_eps: float = 1e-4               # added to the group std
    vllm_importance_sampling_correction: bool = False  # token-level TIS against the sampler's log-probs (TRL)
    vllm_importance_sampling_cap: float = 2.0  # C in min(pi_learner / pi_sampler, C) (TIS, Yao et al. 2025: 2)

    @property
    def resolved_epsilon_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def needs_reference_model(self) -> bool:
        return self.beta > 0

    def validate(self) -> "GRPOSettings":
        """Raise ValueError naming the field, the bad value and the fix; returns self for chaining."""
        def bad(name: str, fix: str) -> ValueError:
            return ValueError(f"grpo.{name}={getattr(self, name)!r} is invalid: {fix}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.num_generations) or self.num_generations < 2:
            raise bad("num_generations", "use an integer >= 2 (group advantages need several completions; "
                      "R1-AQA uses 8)")
        if not isinstance(self.epsilon, (int, float)) or not 0 < self.epsilon < 1:
            raise bad("epsilon", "use a value in (0, 1), e.g. 0.2")
        if self.epsilon_high is not None and (not isinstance(self.epsilon_high, (int, float))
                                              or not math.isfinite(self.epsilon_high) or self.epsilon_high <= 0):
            raise bad("epsilon_high", "use a value > 0 (DAPO: 0.28), or null to reuse epsilon")
        if not isinstance(self.beta, (int, float)) or not math.isfinite(self.beta) or self.beta < 0:
            raise bad("beta", "use a value >= 0 (R1-AQA: 0.04; 0 disables the KL term and the reference model)")
        for name, enum_cls in (("kl_estimator", KLEstimator), ("loss_type", LossAggregation)):
            try:
                _parse(enum_cls, getattr(self, name), name)
            except ValueError as err:
                raise bad(name, f"choose one of {', '.join(repr(m.value) for m in enum_cls)}") from err
        if self.beta > 0 and _parse(KLEstimator, self.kl_estimator, "kl_estimator") is KLEstimator.K1:
            raise bad("kl_estimator", "k1 = log(pi/ref) as a loss term has zero expected gradient (its gradient "
                      "is the score function, whose mean under pi is 0), so it would not pull toward the "
                      "reference; use k3 (GRPO, R1-AQA) or k2")
        if (not isinstance(self.vllm_importance_sampling_cap, (int, float))
                or not math.isfinite(self.vllm_importance_sampling_cap) or self.vllm_importance_sampling_cap < 1):
            raise bad("vllm_importance_sampling_cap", "use a finite value >= 1 (TIS: 2)")
        if not is_int(self.num_iterations) or self.num_iterations < 1:
            raise bad("num_iterations", "use an integer >= 1 (1 = on-policy; > 1 reuses each rollout batch)")
        if not is_int(self.max_completion_length) or self.max_completion_length < 1:
            raise bad("max_completion_length", "use an integer >= 1 (R1-AQA: 256)")
        if not isinstance(self.advantage_eps, (int, float)) or self.advantage_eps <= 0:
            raise bad("advantage_eps", "use a small value > 0, e.g. 1e-4 (it guards division by a zero std)")
        for name in ("scale_rewards", "drop_uniform_groups", "mask_truncated_completions",
                     "vllm_importance_sampling_correction"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "use true or false")
        return self

    def to_dict(self) -> dict:
        return asdict(self)
