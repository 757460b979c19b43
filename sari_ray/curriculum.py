"""Curriculum scheduler (SARI: easy -> hard tiers by base-model pass rate), as a plain class.

The Ray actor that serves batches wraps this class and holds no logic. The scheduler owns the data cursor:
every random choice derives from (seed, stream, counter) so its whole state is a few ints, and a scheduler
restored from `state_dict()` serves exactly the batches the original would have (no replays, no skips).
SARI does not publish its tier thresholds or promotion rule, so every knob is configurable and every
promotion is recorded in `history` with the per-tier accuracies that triggered it.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import numpy as np

__all__ = ["CurriculumMode", "Batch", "Promotion", "CurriculumScheduler", "tiers_from_pass_rates", "ALL_TIERS"]

ALL_TIERS = -1          # Batch.tier in shuffled mode: every tier is served at once
STATE_VERSION = 1
_STREAM_PERMUTATION = 1  # independent RNG streams, so adding one never shifts another
_STREAM_BATCH = 2
_SHUFFLED_POOL = 0       # pool key of the single mixed pool in shuffled mode


class CurriculumMode(str, Enum):
    CURRICULUM = "curriculum"  # easy -> hard, promote on running accuracy (SARI)
    SHUFFLED = "shuffled"      # all tiers mixed from step 0: the no-curriculum ablation
    HARD_FIRST = "hard_first"  # hard -> easy: the anti-curriculum ablation, same promotion rule


@dataclass
class Batch:
    """Prompts for one step. `tier` is the tier being trained (ALL_TIERS in shuffled mode); `sample_tiers`
    gives each id's own tier (replayed ids come from earlier tiers)."""

    step_index: int
    ids: list[str]
    tier: int
    sample_tiers: list[int] = field(default_factory=list)


@dataclass
class Promotion:
    step: int
    from_tier: int
    to_tier: int
    accuracies: dict[int, float]   # running accuracy per tier (tiers with data) at the moment of promotion
    steps_at_tier: int
    reason: str                    # "threshold" | "max_steps"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["accuracies"] = {str(k): v for k, v in self.accuracies.items()}  # JSON keys are strings
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Promotion":
        return cls(**{**d, "accuracies": {int(k): float(v) for k, v in d["accuracies"].items()}})


class _Pool:
    """Ids served from a seeded permutation with a cursor; a new permutation each epoch. The permutation
    is a pure function of (seed, key, epoch), so (cursor, epoch) is the whole state."""

    def __init__(self, ids: list[str], key: int, seed: int):
        self.ids, self.key, self.seed = sorted(ids), key, seed
        self.cursor, self.epoch = 0, 0
        self._perm: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            rng = np.random.default_rng([self.seed, _STREAM_PERMUTATION, self.key, self.epoch])
            self._perm = rng.permutation(len(self.ids))
        return self._perm

    def take(self, n: int) -> list[str]:
        out = []
        while len(out) < n:
            if self.cursor >= len(self.ids):
                self.cursor, self.epoch, self._perm = 0, self.epoch + 1, None
            k = min(n - len(out), len(self.ids) - self.cursor)
            out += [self.ids[i] for i in self._permutation()[self.cursor:self.cursor + k]]
            self.cursor += k
        return out

    def state(self) -> dict[str, int]:
        return {"cursor": self.cursor, "epoch": self.epoch}

    def load(self, state: dict[str, int]) -> None:
        self.cursor, self.epoch, self._perm = int(state["cursor"]), int(state["epoch"]), None


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


class CurriculumScheduler:
    """Serves prompt ids tier by tier and promotes on running accuracy.

    tiers: sample id -> tier (int >= 0, 0 = easiest). batch_size: prompts per step. window: recent
    per-sample accuracies kept per tier. Promotion needs running accuracy >= promote_threshold *and*
    >= min_steps_at_tier updates carrying samples of the current tier; `max_steps_at_tier` (opt-in)
    promotes regardless, for fixed schedules and the hard_first ablation. replay_fraction of each batch
    (rounded, at least one current-tier id kept) comes from already-passed tiers, weighted by their size.
    Defaults are ours, not SARI's (unpublished).
    """

    _SERVING_KEYS = ("mode", "batch_size", "replay_fraction", "seed")

    def __init__(self, tiers: dict[str, int], *, mode: str | CurriculumMode = "curriculum", batch_size: int = 16,
                 window: int = 128, promote_threshold: float = 0.75, min_steps_at_tier: int = 20,
                 max_steps_at_tier: int | None = None, replay_fraction: float = 0.0, seed: int = 0):
        try:
            self.mode = CurriculumMode(mode)
        except ValueError:
            raise ValueError(f"curriculum.mode={mode!r} is invalid: choose one of "
                             f"{', '.join(repr(m.value) for m in CurriculumMode)}") from None
        checks = [
            ("batch_size", batch_size, _is_int(batch_size) and batch_size >= 1, "use an integer >= 1"),
            ("window", window, _is_int(window) and window >= 1, "use an integer >= 1 (samples)"),
            ("promote_threshold", promote_threshold, isinstance(promote_threshold, (int, float))
             and 0 <= promote_threshold <= 1, "use an accuracy in [0, 1]"),
            ("min_steps_at_tier", min_steps_at_tier, _is_int(min_steps_at_tier) and min_steps_at_tier >= 0,
             "use an integer >= 0"),
            ("max_steps_at_tier", max_steps_at_tier, max_steps_at_tier is None or (
                _is_int(max_steps_at_tier) and max_steps_at_tier >= max(1, min_steps_at_tier)),
             "use null (no forced promotion) or an integer >= max(1, min_steps_at_tier)"),
            ("replay_fraction", replay_fraction, isinstance(replay_fraction, (int, float))
             and 0 <= replay_fraction < 1, "use a fraction in [0, 1)"),
            ("seed", seed, _is_int(seed) and seed >= 0, "use an integer >= 0"),
        ]
        for name, value, ok, fix in checks:
            if not ok:
                raise ValueError(f"curriculum.{name}={value!r} is invalid: {fix}")
        if not tiers:
            raise ValueError("curriculum got no samples (tiers is empty): check the data and tiers_from_pass_rates "
                             "(drop_unsolved may have dropped everything)")
        bad = [(k, v) for k, v in tiers.items() if not _is_int(v) or v < 0][:3]
        if bad:
            raise ValueError(f"tiers must map sample ids to integers >= 0; got e.g. {bad}")
        self.batch_size, self.window, self.seed = batch_size, window, seed
        self.promote_threshold, self.replay_fraction = float(promote_threshold), float(replay_fraction)
        self.min_steps_at_tier, self.max_steps_at_tier = min_steps_at_tier, max_steps_at_tier

        self._tier_of = {str(k): int(v) for k, v in tiers.items()}
        levels = sorted(set(self._tier_of.values()))
        self.tier_order = levels[::-1] if self.mode is CurriculumMode.HARD_FIRST else levels
        if self.mode is CurriculumMode.SHUFFLED:
            self._pools = {_SHUFFLED_POOL: _Pool(list(self._tier_of), _SHUFFLED_POOL, seed)}
        else:
            by_tier: dict[int, list[str]] = {t: [] for t in levels}
            for sid, t in self._tier_of.items():
                by_tier[t].append(sid)
            self._pools = {t: _Pool(ids, t, seed) for t, ids in by_tier.items()}
        self._windows: dict[int, deque] = {t: deque(maxlen=window) for t in levels}
        self._step_index = 0
        self._stage = 0
        self._steps_at_stage = 0
        self.history: list[Promotion] = []

    # ------------------------------------------------------------------------------------------ serving
    @property
    def current_tier(self) -> int:
        return ALL_TIERS if self.mode is CurriculumMode.SHUFFLED else self.tier_order[self._stage]

    @property
    def step_index(self) -> int:
        return self._step_index

    def next_batch(self) -> Batch:
        """The next batch_size ids; advances the data cursor."""
        step = self._step_index
        rng = np.random.default_rng([self.seed, _STREAM_BATCH, step])
        if self.mode is CurriculumMode.SHUFFLED:
            ids = self._pools[_SHUFFLED_POOL].take(self.batch_size)
        else:
            passed = self.tier_order[:self._stage]
            n_replay = min(self.batch_size - 1, _round_half_up(self.replay_fraction * self.batch_size)) if passed else 0
            ids = self._pools[self.current_tier].take(self.batch_size - n_replay)
            if n_replay:
                sizes = np.array([len(self._pools[t].ids) for t in passed], dtype=np.float64)
                counts = np.bincount(rng.choice(len(passed), size=n_replay, p=sizes / sizes.sum()),
                                     minlength=len(passed))
                for t, c in zip(passed, counts):
                    ids += self._pools[t].take(int(c))
            ids = [ids[i] for i in rng.permutation(len(ids))]  # spread replayed ids over the batch's shards
        self._step_index += 1
        return Batch(step, ids, self.current_tier, [self._tier_of[i] for i in ids])

    # ------------------------------------------------------------------------------------------ feedback
    def running_accuracy(self, tier: int) -> float | None:
        w = self._windows.get(tier)
        return float(np.mean(w)) if w else None

    def accuracies(self) -> dict[int, float]:
        return {t: a for t in self._windows if (a := self.running_accuracy(t)) is not None}

    def update(self, step: int, correctness: dict[str, float]) -> Promotion | None:
        """Record per-sample accuracy (e.g. mean over the G completions) and promote if the rule holds.

        Each sample counts toward its own tier, so late feedback from a batch served before a promotion
        is still attributed correctly. At most one promotion per call; the last tier never promotes.
        """
        unknown = [k for k in correctness if k not in self._tier_of]
        if unknown:
            raise KeyError(f"update() got ids the scheduler never had, e.g. {unknown[:3]}")
        for sid, acc in correctness.items():
            acc = float(acc)
            if not math.isfinite(acc):
                raise ValueError(f"correctness[{sid!r}]={acc} is not finite")
            self._windows[self._tier_of[sid]].append(acc)
        if self.mode is CurriculumMode.SHUFFLED:
            self._steps_at_stage += 1
            return None
        cur = self.current_tier
        if any(self._tier_of[sid] == cur for sid in correctness):
            self._steps_at_stage += 1
        if self._stage == len(self.tier_order) - 1:
            return None
        acc = self.running_accuracy(cur)
        reason = None
        if self._steps_at_stage >= self.min_steps_at_tier and acc is not None and acc >= self.promote_threshold:
            reason = "threshold"
        elif self.max_steps_at_tier is not None and self._steps_at_stage >= self.max_steps_at_tier:
            reason = "max_steps"
        if reason is None:
            return None
        promo = Promotion(int(step), cur, self.tier_order[self._stage + 1], self.accuracies(),
                          self._steps_at_stage, reason)
        self._stage += 1
        self._steps_at_stage = 0
        self.history.append(promo)
        return promo

    def metrics(self) -> dict[str, float]:
        """`curriculum/*` metrics for the driver to log."""
        pool = self._pools[_SHUFFLED_POOL if self.mode is CurriculumMode.SHUFFLED else self.current_tier]
        out = {
            "curriculum/tier": float(self.current_tier),
            "curriculum/stage": float(self._stage),
            "curriculum/steps_at_tier": float(self._steps_at_stage),
            "curriculum/promotions": float(len(self.history)),
            "curriculum/epoch": float(pool.epoch),
        }
        out.update({f"curriculum/acc_tier{t}": a for t, a in self.accuracies().items()})
        return out

    # ------------------------------------------------------------------------------------------ state
    def _fingerprint(self) -> str:
        blob = json.dumps(sorted(self._tier_of.items()), separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _config(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "batch_size": self.batch_size, "window": self.window,
                "promote_threshold": self.promote_threshold, "min_steps_at_tier": self.min_steps_at_tier,
                "max_steps_at_tier": self.max_steps_at_tier, "replay_fraction": self.replay_fraction,
                "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable (str keys; ints, floats, strings, lists). No RNG objects: every draw derives
        from (seed, stream, counter)."""
        return {
            "version": STATE_VERSION,
            "config": self._config(),
            "tiers_fingerprint": self._fingerprint(),
            "step_index": self._step_index,
            "stage": self._stage,
            "steps_at_stage": self._steps_at_stage,
            "pools": {str(k): p.state() for k, p in self._pools.items()},
            "windows": {str(t): list(w) for t, w in self._windows.items()},
            "history": [p.to_dict() for p in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore onto a scheduler built from the same samples and serving knobs (mode, batch_size,
        replay_fraction, seed). Promotion knobs (window, threshold, min/max steps) may change on resume:
        the constructor's values win; a smaller window keeps the most recent samples."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"curriculum state version {state.get('version')!r} != {STATE_VERSION}: "
                             "this checkpoint was written by another sari-ray version")
        if state["tiers_fingerprint"] != self._fingerprint():
            raise ValueError("curriculum state was saved for a different sample->tier map (fingerprint "
                             f"{state['tiers_fingerprint']} != {self._fingerprint()}): resume with the same data "
                             "and tiers, or start a fresh run")
        for key in self._SERVING_KEYS:
            saved, now = state["config"][key], self._config()[key]
            if saved != now:
                raise ValueError(f"curriculum.{key}={now!r} differs from the checkpoint's {saved!r}: exact "
                                 f"resume needs the same value; set curriculum.{key}={saved!r}")
        if set(state["pools"]) != {str(k) for k in self._pools}:
            raise ValueError(f"curriculum state pools {sorted(state['pools'])} do not match "
                             f"{sorted(str(k) for k in self._pools)}")
        for k, p in self._pools.items():
            p.load(state["pools"][str(k)])
        for t, w in self._windows.items():
            w.clear()
            w.extend(float(x) for x in state["windows"].get(str(t), []))
        self._step_index = int(state["step_index"])
        self._stage = int(state["stage"])
        self._steps_at_stage = int(state["steps_at_stage"])
        self.history = [Promotion.from_dict(d) for d in state["history"]]


def tiers_from_pass_rates(pass_rates: dict[str, float], num_tiers: int, drop_unsolved: bool = True
                          ) -> dict[str, int]:
    """SARI's difficulty tiers: rank easy -> hard by the base model's pass rate, cut into num_tiers
    quantile bins (tier 0 = easiest). Items with pass rate 0 are dropped when drop_unsolved (SARI drops
    questions the base model never solves).

    Equal pass rates (common: with G samples there are only G+1 values) always share a tier: a tie group
    goes to the bin of its middle rank, and empty bins are closed up, so fewer than num_tiers tiers come
    back when ties are large. Deterministic; independent of dict order.
    """
    if not _is_int(num_tiers) or num_tiers < 1:
        raise ValueError(f"num_tiers={num_tiers!r} is invalid: use an integer >= 1")
    bad = [(k, v) for k, v in pass_rates.items() if not (0.0 <= float(v) <= 1.0)][:3]
    if bad:
        raise ValueError(f"pass rates must lie in [0, 1]; got e.g. {bad}")
    kept = {k: float(v) for k, v in pass_rates.items() if not (drop_unsolved and float(v) <= 0.0)}
    n = len(kept)
    groups: dict[float, list[str]] = {}
    for k, v in kept.items():
        groups.setdefault(v, []).append(k)
    raw: dict[str, int] = {}
    start = 0
    for rate in sorted(groups, reverse=True):             # easiest (highest pass rate) first
        members = groups[rate]
        bin_ = min(num_tiers - 1, (num_tiers * (2 * start + len(members) - 1)) // (2 * n))  # middle rank
        raw.update({k: bin_ for k in members})
        start += len(members)
    dense = {b: i for i, b in enumerate(sorted(set(raw.values())))}
    return {k: dense[b] for k, b in sorted(raw.items())}
