"""Reward scorer: the format and accuracy rewards of `sari_ray.rewards`, batched, every component returned."""
from __future__ import annotations

from sari_ray.data.schema import AudioMCQ
from sari_ray.prompts import PromptStyle
from sari_ray.rewards import RewardWeights, score_batch


class RewardScorer:
    def __init__(self, style: str, accuracy_weight: float, format_weight: float):
        self.style = PromptStyle(style)
        self.weights = RewardWeights(accuracy=accuracy_weight, format=format_weight)

    def score(self, texts: list[str], samples: list[dict]) -> list[dict]:
        return score_batch(texts, [AudioMCQ.from_dict(s) for s in samples], self.style, self.weights)
