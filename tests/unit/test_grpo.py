"""GRPO math on toy inputs: equivalences between variants, hand-computed values, loop references."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from sari_ray import grpo
from sari_ray.grpo import GRPOSettings, KLEstimator, LossAggregation

pytestmark = pytest.mark.unit


def _toy(B=4, T=5, seed=0, lengths=(5, 3, 4, 1)):
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(B, T, generator=g) * 2).requires_grad_(True)
    old = logprobs.detach() + 0.3 * torch.randn(B, T, generator=g)
    ref = logprobs.detach() + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return logprobs, old, ref, adv, mask


# ---------------------------------------------------------------------------------------------- advantages
def test_grpo_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = grpo.compute_advantages(r, 4)
    std = torch.tensor([1.0, 0.0, 1.0, 0.0]).std().item()  # unbiased, as TRL
    expected = torch.tensor([0.5, -0.5, 0.5, -0.5]) / (std + 1e-4)
    assert torch.allclose(adv[:4], expected)
    assert torch.equal(adv[4:], torch.zeros(4))  # uniform group: no signal


def test_dr_grpo_advantages_are_grpo_without_std():
    r = torch.tensor([3.0, 1.0, 0.0, 2.0, 0.5, 0.5, 1.5, 4.0, 1.0])
    dr = grpo.compute_advantages(r, 3, scale_rewards=False)
    g = grpo.compute_advantages(r, 3, scale_rewards=True, eps=0.0)
    std = r.view(3, 3).std(1, keepdim=True)
    assert torch.allclose(dr.view(3, 3), g.view(3, 3) * std)
    assert torch.allclose(dr.view(3, 3).sum(1), torch.zeros(3), atol=1e-6)


def test_advantage_shape_errors():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        grpo.compute_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match=">= 2"):
        grpo.compute_advantages(torch.zeros(4), 1)


def test_uniform_group_mask():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert grpo.uniform_group_mask(r, 2).tolist() == [True, False, True]


# ---------------------------------------------------------------------------------------------- KL
def test_kl_estimators_hand_computed():
    lp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    d = math.log(0.25) - math.log(0.5)  # log(ref/pi) = -log 2
    assert grpo.kl_penalty(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert grpo.kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert grpo.kl_penalty(lp, ref, KLEstimator.K3).item() == pytest.approx(math.exp(d) - d - 1)
    assert grpo.kl_penalty(lp, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)


def test_k3_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(1)
    lp, ref = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    assert (grpo.kl_penalty(lp, ref, "k3") >= 0).all()
    assert (grpo.kl_penalty(lp, ref, "k2") >= 0).all()
    assert torch.equal(grpo.kl_penalty(lp, lp, "k3"), torch.zeros_like(lp))


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
        grpo.kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")
    with pytest.raises(ValueError, match="'grpo', 'bnpo', 'dapo', 'dr_grpo'"):
        grpo.aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "token_mean")


# ---------------------------------------------------------------------------------------------- aggregation
def test_token_mean_equals_seq_mean_iff_lengths_equal():
    per_token = torch.arange(12, dtype=torch.float32).view(3, 4)
    full = torch.ones(3, 4)
    seq_full, tok_full = (grpo.aggregate_loss(per_token, full, k).item() for k in ("grpo", "bnpo"))
    assert seq_full == pytest.approx(tok_full)
    ragged = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)
    seq = grpo.aggregate_loss(per_token, ragged, "grpo").item()
    tok = grpo.aggregate_loss(per_token, ragged, "bnpo").item()
    assert seq == pytest.approx((1.5 + 4 + 8.5) / 3)
    assert tok == pytest.approx((0 + 1 + 2 + 3 + 4 + 8 + 9) / 7)
    assert seq != pytest.approx(tok)


def test_dr_grpo_and_dapo_normalisers():
    per_token = torch.ones(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    assert grpo.aggregate_loss(per_token, mask, "dr_grpo", max_completion_length=10).item() == pytest.approx(3 / 20)
    assert grpo.aggregate_loss(per_token, mask, "dapo").item() == pytest.approx(1.0)
    step = grpo.StepNormalizer(num_tokens=6, num_sequences=4)  # this batch is part of a larger step
    assert grpo.aggregate_loss(per_token, mask, "dapo", normalizer=step).item() == pytest.approx(0.5)
    assert grpo.aggregate_loss(per_token, mask, "grpo", normalizer=step).item() == pytest.approx(0.5)
    assert grpo.aggregate_loss(per_token, mask, "dr_grpo", max_completion_length=10,
                               normalizer=step).item() == pytest.approx(3 / 40)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo.aggregate_loss(per_token, mask, "dr_grpo")


# ---------------------------------------------------------------------------------------------- policy loss
def _loop_reference(lp, old, adv, mask, eps_lo, eps_hi, beta, ref, loss_type, max_len):
    """Scalar-by-scalar version of the loss, for equivalence with the vectorised one."""
    B, T = len(lp), len(lp[0])
    rows, total, ntok = [], 0.0, 0
    for i in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if mask[i][t] == 0:
                continue
            r = math.exp(lp[i][t] - old[i][t])
            a = adv[i]
            v = -min(r * a, min(max(r, 1 - eps_lo), 1 + eps_hi) * a)
            if beta:
                d = ref[i][t] - lp[i][t]
                v += beta * (math.exp(d) - d - 1)
            s, n = s + v, n + 1
        if n:  # sequences with no active token count nowhere
            rows.append(s / n)
        total, ntok = total + s, ntok + n
    return {"grpo": sum(rows) / len(rows), "bnpo": total / ntok, "dr_grpo": total / (len(rows) * max_len)}[loss_type]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta,eps_high", [(0.0, None), (0.04, 0.28)])
def test_policy_loss_matches_loop_reference(loss_type, beta, eps_high):
    lp, old, ref, adv, mask = _toy()
    loss, m = grpo.policy_loss(lp, old, adv, mask, epsilon=0.2, epsilon_high=eps_high, beta=beta,
                               ref_logprobs=ref if beta else None, loss_type=loss_type, max_completion_length=7)
    expected = _loop_reference(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2,
                               eps_high or 0.2, beta, ref.tolist(), loss_type, 7)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert ("grpo/kl" in m) == bool(beta)
    assert m["grpo/loss"].item() == pytest.approx(loss.item())


def test_ratio_one_no_kl_gives_minus_mean_advantage():
    lp, _, _, adv, mask = _toy()
    loss, m = grpo.policy_loss(lp, None, adv, mask, loss_type="bnpo")
    expected = -(adv[:, None] * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert m["grpo/ratio_mean"].item() == pytest.approx(1.0)
    assert m["grpo/clip_fraction"].item() == 0.0
    # on-policy gradient is the REINFORCE one: d loss / d logp = -A / num_tokens on unmasked tokens
    loss.backward()
    assert torch.allclose(lp.grad, -adv[:, None] * mask / mask.sum(), atol=1e-7)


def test_clipping_kicks_in_exactly_beyond_asymmetric_eps():
    # ratios: inside, just inside, beyond high, beyond low; eps_low 0.2, eps_high 0.28
    ratios = torch.tensor([[1.0, 1.27, 1.29, 0.79]])
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    for a in (1.0, -1.0):
        lp = ratios.log().clone().requires_grad_(True)
        loss, m = grpo.policy_loss(lp, old, torch.tensor([a]), mask, epsilon=0.2, epsilon_high=0.28,
                                   loss_type="bnpo")
        loss.backward()
        g = lp.grad[0]
        if a > 0:   # only the upper clip binds for positive advantage
            assert g[0] != 0 and g[1] != 0 and g[2] == 0 and g[3] != 0
            assert m["grpo/clip_fraction_high"].item() == pytest.approx(0.25)
            assert m["grpo/clip_fraction_low"].item() == 0.0
        else:       # only the lower clip binds for negative advantage
            assert g[0] != 0 and g[1] != 0 and g[2] != 0 and g[3] == 0
            assert m["grpo/clip_fraction_low"].item() == pytest.approx(0.25)
            assert m["grpo/clip_fraction_high"].item() == 0.0
        assert m["grpo/clip_fraction"].item() == pytest.approx(0.25)
        # symmetric clipping at 0.2 would also clip 1.27
        lp2 = ratios.log().clone().requires_grad_(True)
        grpo.policy_loss(lp2, old, torch.tensor([1.0]), mask, epsilon=0.2, loss_type="bnpo")[0].backward()
        assert lp2.grad[0, 1] == 0


def test_beta_zero_needs_no_reference_and_beta_positive_does():
    lp, old, _, adv, mask = _toy()
    loss, m = grpo.policy_loss(lp, old, adv, mask, beta=0.0, ref_logprobs=None)
    assert torch.isfinite(loss) and "grpo/kl" not in m
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo.policy_loss(lp, old, adv, mask, beta=0.04)


def test_gradient_only_through_unmasked_tokens():
    lp, old, ref, adv, mask = _toy()
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        lp.grad = None
        loss, _ = grpo.policy_loss(lp, old, adv, mask, beta=0.04, ref_logprobs=ref, loss_type=loss_type,
                                   max_completion_length=5)
        loss.backward()
        assert (lp.grad[mask == 0] == 0).all()
        assert (lp.grad[mask == 1] != 0).any()


def test_mask_truncated_from_flags_and_finish_reasons():
    mask = torch.ones(3, 4)
    by_flag = grpo.mask_truncated(mask, torch.tensor([False, True, False]))
    by_reason = grpo.mask_truncated(mask, ["stop", "length", "stop"])
    assert torch.equal(by_flag, by_reason)
    assert by_flag.sum(1).tolist() == [4, 0, 4]
    lp, old, _, adv, _ = _toy(B=3, T=4, lengths=(4, 4, 4))
    loss, _ = grpo.policy_loss(lp, old, adv, by_flag, loss_type="bnpo")
    loss.backward()
    assert (lp.grad[1] == 0).all()


def test_gather_logprobs_and_entropy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 3, 7, generator=g, dtype=torch.float64).to(torch.bfloat16).requires_grad_(True)
    ids = torch.randint(0, 7, (5, 3), generator=g)
    out = grpo.gather_logprobs(logits, ids, chunk_size=2)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-6)
    out.sum().backward()
    assert logits.grad is not None
    uniform = torch.zeros(2, 3, 8)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert grpo.entropy_from_logits(uniform, mask).item() == pytest.approx(math.log(8), rel=1e-6)
    peaked = torch.full((1, 2, 4), -1e4)
    peaked[..., 0] = 0
    assert grpo.entropy_from_logits(peaked, torch.ones(1, 2)).item() == pytest.approx(0.0, abs=1e-6)


def test_metrics_to_floats():
    out = grpo.metrics_to_floats({"grpo/loss": torch.tensor(1.5), "x": 2})
    assert out == {"grpo/loss": 1.5, "x": 2.0} and all(type(v) is float for v in out.values())


# ---------------------------------------------------------------------------------------------- settings
def test_settings_defaults_follow_r1_aqa_and_validate():
    s = GRPOSettings().validate()
    assert (s.num_generations, s.beta, s.kl_estimator, s.max_completion_length) == (8, 0.04, "k3", 256)
    assert s.resolved_epsilon_high == 0.2 and s.needs_reference_model
    assert GRPOSettings(epsilon_high=0.28, beta=0.0).validate().resolved_epsilon_high == 0.28
    assert {m.value for m in LossAggregation} == {"grpo", "bnpo", "dapo", "dr_grpo"}


@pytest.mark.parametrize("field,value,fragment", [
    ("num_generations", 1, ">= 2"), ("epsilon", 0.0, "(0, 1)"), ("epsilon_high", -0.1, "> 0"),
    ("beta", -0.01, ">= 0"), ("kl_estimator", "k5", "'k3'"), ("loss_type", "sum", "'dr_grpo'"),
    ("num_iterations", 0, ">= 1"), ("max_completion_length", 0, ">= 1"), ("scale_rewards", "yes", "true or false"),
])
def test_settings_errors_name_field_value_and_fix(field, value, fragment):
    with pytest.raises(ValueError) as err:
        GRPOSettings(**{field: value}).validate()
    msg = str(err.value)
    assert f"grpo.{field}={value!r}" in msg and fragment in msg


def test_logic_layer_imports_without_engines():
    """grpo and curriculum must import with ray / vllm / deepspeed / mlflow / transformers unimportable."""
    code = ("import sys\nfor m in ('ray', 'vllm', 'deepspeed', 'mlflow', 'transformers'): sys.modules[m] = None\n"
            "import sari_ray.grpo, sari_ray.curriculum\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------------------- split == whole
def _split_step_gradient(loss_type, lp, old, adv, mask, ranks, micro, **kw):
    """Gradient of one optimizer step run as the learner runs it: `ranks` data-parallel ranks, each with
    `micro` micro-batches, the step's counts all-reduced into one StepNormalizer, each micro-batch loss
    scaled by world_size (DeepSpeed averages gradients over ranks), gradients accumulated then averaged."""
    normalizer = grpo.StepNormalizer.from_mask(mask)  # == the all-reduce of the per-rank counts
    local = [grpo.StepNormalizer.from_mask(m) for m in mask.chunk(ranks)]
    assert sum(n.num_tokens for n in local) == normalizer.num_tokens
    assert sum(n.num_sequences for n in local) == normalizer.num_sequences
    grads = []
    for rank_rows in torch.arange(len(lp)).chunk(ranks):
        leaf = lp.detach().clone().requires_grad_(True)
        for rows in rank_rows.chunk(micro):
            rows_kw = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            loss, _ = grpo.policy_loss(leaf[rows], old[rows], adv[rows], mask[rows], loss_type=loss_type,
                                       normalizer=normalizer, max_completion_length=7, **rows_kw)
            (loss * ranks).backward()
        grads.append(leaf.grad)
    return torch.stack(grads).mean(0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_step_gradient_is_the_same_however_the_batch_is_split(loss_type, beta):
    """2 ranks x 2 micro-batches == one process, one batch (lengths [2, 2, 10, 10]-style imbalance, a padding
    row, a truncation-masked row). Before StepNormalizer, dapo's short-completion tokens got 5x the gradient."""
    g = torch.Generator().manual_seed(3)
    B, T = 8, 10
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = lp + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    sampling = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.float64)
    for i, n in enumerate([2, 2, 10, 10, 3, 0, 7, 5]):  # row 5: a padding / truncation-masked row
        mask[i, :n] = 1
    kw = dict(beta=beta, ref_logprobs=ref if beta else None, sampling_logprobs=sampling)
    whole = lp.clone().requires_grad_(True)
    loss, _ = grpo.policy_loss(whole, old, adv, mask, loss_type=loss_type, max_completion_length=7, **kw)
    loss.backward()
    split = _split_step_gradient(loss_type, lp, old, adv, mask, ranks=2, micro=2, **kw)
    assert (split - whole.grad).abs().max().item() <= 1e-6
    if loss_type in ("bnpo", "dapo") and beta == 0:  # on-policy, every active token weighs the same
        split = _split_step_gradient(loss_type, lp, lp, adv, mask, ranks=2, micro=2)
        per_token = (split / -adv[:, None])[mask > 0]
        assert torch.allclose(per_token, per_token.new_full(per_token.shape, 1 / mask.sum().item()))


def test_truncated_importance_sampling_hand_computed():
    """On-policy (ratio 1), one token each: weight = min(exp(learner - sampler), cap) times -A."""
    lp = torch.tensor([[math.log(0.5), math.log(0.2)]], requires_grad=True)
    sampler = torch.tensor([[math.log(0.4), math.log(0.05)]])  # ratios 1.25 and 4.0 (capped at 2)
    mask = torch.ones(1, 2)
    loss, m = grpo.policy_loss(lp, None, torch.tensor([1.0]), mask, loss_type="bnpo",
                               sampling_logprobs=sampler, importance_sampling_cap=2.0)
    assert loss.item() == pytest.approx(-(1.25 + 2.0) / 2, rel=1e-6)
    loss.backward()
    assert lp.grad[0].tolist() == pytest.approx([-1.25 / 2, -2.0 / 2], rel=1e-6)  # weights are detached
    assert m["grpo/is_ratio_mean"].item() == pytest.approx((1.25 + 4.0) / 2, rel=1e-6)
    assert m["grpo/is_ratio_max"].item() == pytest.approx(4.0, rel=1e-6)
    assert m["grpo/is_capped_fraction"].item() == pytest.approx(0.5)
    plain, m0 = grpo.policy_loss(lp, None, torch.tensor([1.0]), mask, loss_type="bnpo")
    assert plain.item() == pytest.approx(-1.0) and "grpo/is_ratio_mean" not in m0


def test_k1_as_a_loss_term_is_refused():
    with pytest.raises(ValueError, match="k1.*zero expected gradient"):
        GRPOSettings(beta=0.04, kl_estimator="k1").validate()
    GRPOSettings(beta=0.0, kl_estimator="k1").validate()  # no KL term: nothing to refuse
    GRPOSettings(beta=0.04, kl_estimator="k2").validate()
