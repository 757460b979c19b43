"""Curriculum scheduler: promotion rule, modes, replay, exact resume, per-tier epochs, tiering."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from sari_ray.curriculum import ALL_TIERS, CurriculumScheduler, Promotion, tiers_from_pass_rates

pytestmark = pytest.mark.unit


def _tiers(per_tier=(10, 12, 8)) -> dict[str, int]:
    return {f"t{t}-{i:02d}": t for t, n in enumerate(per_tier) for i in range(n)}


def _feed(s: CurriculumScheduler, acc: float):
    b = s.next_batch()
    return b, s.update(b.step_index, {i: acc for i in b.ids})


def test_promotes_only_after_min_steps_and_threshold_and_logs_accuracies():
    s = CurriculumScheduler(_tiers(), batch_size=4, window=8, promote_threshold=0.7, min_steps_at_tier=3)
    assert s.current_tier == 0
    assert _feed(s, 1.0)[1] is None and _feed(s, 1.0)[1] is None  # threshold met, min steps not yet
    b, promo = _feed(s, 1.0)
    assert isinstance(promo, Promotion)
    assert (promo.step, promo.from_tier, promo.to_tier, promo.reason) == (b.step_index, 0, 1, "threshold")
    assert promo.accuracies == {0: 1.0} and promo.steps_at_tier == 3
    assert s.history == [promo] and s.current_tier == 1
    assert s.next_batch().tier == 1
    m = s.metrics()
    assert m["curriculum/tier"] == 1 and m["curriculum/acc_tier0"] == 1.0 and m["curriculum/promotions"] == 1


def test_no_promotion_below_threshold_and_last_tier_never_promotes():
    s = CurriculumScheduler(_tiers(), batch_size=4, window=8, promote_threshold=0.7, min_steps_at_tier=1)
    for _ in range(20):
        assert _feed(s, 0.6)[1] is None
    assert s.current_tier == 0 and s.history == []
    # running accuracy is over the window (8): four 1.0 after four 0.6 make 0.8 >= 0.7
    promo = _feed(s, 1.0)[1]
    assert promo is not None and promo.from_tier == 0 and promo.accuracies == {0: pytest.approx(0.8)}
    assert _feed(s, 1.0)[1].to_tier == 2
    for _ in range(5):
        assert _feed(s, 1.0)[1] is None
    assert s.current_tier == 2 and len(s.history) == 2


def test_max_steps_forces_promotion_and_late_feedback_goes_to_its_own_tier():
    s = CurriculumScheduler(_tiers(), batch_size=4, promote_threshold=0.9, min_steps_at_tier=1, max_steps_at_tier=2)
    _feed(s, 0.0)
    promo = _feed(s, 0.0)[1]
    assert promo.reason == "max_steps" and promo.to_tier == 1
    s.update(99, {"t0-00": 1.0})  # late feedback for a tier-0 sample: no step counted at tier 1
    assert s.metrics()["curriculum/steps_at_tier"] == 0
    with pytest.raises(KeyError, match="never had"):
        s.update(100, {"nope": 1.0})


def test_shuffled_mode_mixes_tiers_and_never_promotes():
    s = CurriculumScheduler(_tiers(), mode="shuffled", batch_size=6, min_steps_at_tier=0, promote_threshold=0.0)
    seen = Counter()
    for _ in range(5):
        b, promo = _feed(s, 1.0)
        assert b.tier == ALL_TIERS and promo is None
        seen.update(b.sample_tiers)
    assert set(seen) == {0, 1, 2}
    assert {"curriculum/acc_tier0", "curriculum/acc_tier1", "curriculum/acc_tier2"} <= set(s.metrics())


def test_hard_first_serves_tiers_in_reverse_order():
    s = CurriculumScheduler(_tiers(), mode="hard_first", batch_size=4, promote_threshold=0.5, min_steps_at_tier=1)
    assert s.tier_order == [2, 1, 0]
    order = []
    for _ in range(3):
        b, _ = _feed(s, 1.0)
        assert set(b.sample_tiers) == {b.tier}
        order.append(b.tier)
    assert order == [2, 1, 0]


def test_replay_fraction_honoured():
    s = CurriculumScheduler(_tiers((10, 12, 8)), batch_size=8, promote_threshold=0.5, min_steps_at_tier=1,
                            replay_fraction=0.25)
    b, _ = _feed(s, 1.0)
    assert b.sample_tiers == [0] * 8  # nothing passed yet: no replay
    b, _ = _feed(s, 1.0)  # now at tier 2
    for _ in range(10):
        b = s.next_batch()
        assert b.tier == 2 and Counter(b.sample_tiers)[2] == 6
        assert set(b.sample_tiers) - {2} <= {0, 1} and len(b.ids) == 8


def test_every_id_once_per_epoch_within_a_tier():
    tiers = _tiers((7, 5))
    s = CurriculumScheduler(tiers, batch_size=3, promote_threshold=1.0, min_steps_at_tier=10**6)
    tier0 = sorted(k for k, t in tiers.items() if t == 0)
    served = [i for _ in range(7) for i in s.next_batch().ids]  # 21 ids = 3 epochs of 7
    epochs = [served[i:i + 7] for i in range(0, 21, 7)]
    assert all(sorted(e) == tier0 for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert s.metrics()["curriculum/epoch"] == 2


def test_state_dict_json_round_trip_serves_identical_future_batches():
    kw = dict(batch_size=5, window=6, promote_threshold=0.6, min_steps_at_tier=2, replay_fraction=0.4, seed=7)
    ref = CurriculumScheduler(_tiers(), **kw)
    run = CurriculumScheduler(_tiers(), **kw)

    def step(s, k):
        b = s.next_batch()
        s.update(b.step_index, {i: float((k + int(i[-2:])) % 2) for i in b.ids})
        return b

    accs = [(k % 4) / 3 for k in range(40)]
    for k in range(9):
        b_ref, b_run = step(ref, k), step(run, k)
        assert b_ref == b_run
    saved = json.loads(json.dumps(run.state_dict()))
    restored = CurriculumScheduler(_tiers(), **kw)
    restored.load_state_dict(saved)
    for k in range(9, 40):
        b_ref = ref.next_batch()
        b_new = restored.next_batch()
        assert b_ref == b_new
        fb = {i: accs[k] for i in b_ref.ids}
        assert ref.update(k, fb) == restored.update(k, fb)
    assert ref.history == restored.history and len(ref.history) >= 1
    assert ref.metrics() == restored.metrics()
    assert json.loads(json.dumps(restored.state_dict())) == json.loads(json.dumps(ref.state_dict()))


def test_load_state_dict_refuses_other_data_or_serving_knobs():
    s = CurriculumScheduler(_tiers(), batch_size=4)
    state = s.state_dict()
    with pytest.raises(ValueError, match="different sample->tier map"):
        CurriculumScheduler(_tiers((10, 12, 9)), batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"curriculum.batch_size=8 differs .* set curriculum.batch_size=4"):
        CurriculumScheduler(_tiers(), batch_size=8).load_state_dict(state)
    CurriculumScheduler(_tiers(), batch_size=4, promote_threshold=0.9).load_state_dict(state)  # allowed


@pytest.mark.parametrize("kw,fragment", [
    ({"mode": "random"}, "'curriculum', 'shuffled', 'hard_first'"), ({"batch_size": 0}, "curriculum.batch_size=0"),
    ({"replay_fraction": 1.0}, "curriculum.replay_fraction=1.0"), ({"promote_threshold": 1.5}, "[0, 1]"),
    ({"max_steps_at_tier": 1, "min_steps_at_tier": 5}, "curriculum.max_steps_at_tier=1"),
])
def test_constructor_errors_name_the_knob(kw, fragment):
    with pytest.raises(ValueError) as err:
        CurriculumScheduler(_tiers(), **kw)
    assert fragment in str(err.value)


def test_tiers_from_pass_rates_orders_easy_to_hard_and_drops_unsolved():
    rates = {"a": 1.0, "b": 0.875, "c": 0.75, "d": 0.5, "e": 0.25, "f": 0.125, "z": 0.0}
    tiers = tiers_from_pass_rates(rates, 3)
    assert "z" not in tiers
    assert tiers == {"a": 0, "b": 0, "c": 1, "d": 1, "e": 2, "f": 2}
    assert tiers_from_pass_rates(rates, 3, drop_unsolved=False)["z"] == 2


def test_tiers_from_pass_rates_keeps_ties_together_deterministically():
    rates = {f"x{i}": 1.0 for i in range(2)} | {f"y{i}": 0.5 for i in range(6)}
    tiers = tiers_from_pass_rates(rates, 3)
    assert {tiers[f"y{i}"] for i in range(6)} == {1}   # a tie never splits; empty bins closed up
    assert {tiers["x0"], tiers["x1"]} == {0}
    shuffled = dict(reversed(list(rates.items())))
    assert tiers_from_pass_rates(shuffled, 3) == tiers
    many = {f"s{i:03d}": (i % 9) / 8 for i in range(900)}
    counts = Counter(tiers_from_pass_rates(many, 4).values())
    assert sorted(counts) == [0, 1, 2, 3] and counts[0] == 200  # pass rate 1.0 and 0.875 (100 each)
    assert tiers_from_pass_rates({"u": 0.0}, 2) == {}
