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
