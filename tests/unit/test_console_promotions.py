"""The run summary's promotions table: one row per promotion with step, from, to, and the accuracy per tier."""
from __future__ import annotations

import pytest
from rich.console import Console

from sari_ray.console import promotions_table

pytestmark = pytest.mark.unit


def test_promotions_table_rows():
    promotions = [
        {"step": 12, "from_tier": 0, "to_tier": 1, "accuracies": {"0": 0.84}, "steps_at_tier": 12,
         "reason": "threshold"},
        {"step": 30, "from_tier": 1, "to_tier": 2, "accuracies": {"1": 0.81, "0": 0.97}, "steps_at_tier": 18,
         "reason": "threshold"},
    ]
    console = Console(record=True, width=200)
    console.print(promotions_table(promotions))
    lines = [line for line in console.export_text().splitlines() if line.strip()]
    rows = [line for line in lines if "threshold" in line]
    assert len(rows) == 2
    assert [cell.strip() for cell in rows[1].split("│")[1:6]] == ["30", "1", "2", "18", "threshold"]
    assert "tier 0: 0.97, tier 1: 0.81" in rows[1]  # tiers in order, whatever the dict order
