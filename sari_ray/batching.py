"""Splitting a batch across the actors of a group (pure; no Ray), so every layer can use it."""
from __future__ import annotations


def split_evenly(items: list, parts: int) -> list[list]:
    """Contiguous shards whose sizes differ by at most one (order kept, so results concatenate back)."""
    size, extra = divmod(len(items), parts)
    shards, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        shards.append(items[start:end])
        start = end
    return shards


def split_padded(rows: list[dict], parts: int, weight_key: str) -> list[list[dict]]:
    """Equal-size shards, so every learner rank runs the same number of micro-batches (a collective waits for
    all): padding rows repeat real ones with `weight_key` = 0 (no loss, no gradient)."""
    pad = (-len(rows)) % parts
    rows = rows + [{**rows[i % len(rows)], weight_key: 0.0} for i in range(pad)]
    return split_evenly(rows, parts)
