"""Parsing the text inputs of the nodes (lists of numbers typed into a STRING widget)."""

from __future__ import annotations

import math

__all__ = ["parse_numbers"]


def parse_numbers(text: str, what: str) -> list[float]:
    """Parse ``"999, 749 499;249"`` into floats, with an error that names ``what`` and the bad item."""
    items = [s for s in text.replace(";", ",").replace("\n", ",").replace(" ", ",").split(",") if s.strip()]
    if not items:
        raise ValueError(f"{what}: expected a comma-separated list of numbers, got {text!r}")
    out = []
    for s in items:
        try:
            v = float(s)
        except ValueError:
            raise ValueError(f"{what}: {s.strip()!r} is not a number (in {text!r})") from None
        if not math.isfinite(v):
            raise ValueError(f"{what}: {s.strip()!r} is not finite")
        out.append(v)
    return out
