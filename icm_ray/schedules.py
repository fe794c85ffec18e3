"""Temperature schedule of the search (the paper's logarithmic cooling)."""

from __future__ import annotations

import math


def temperature(iteration: int, initial: float = 10.0, final: float = 0.01,
                rate: float = 0.99) -> float:
    """T_n = max(T_min, T0 / (1 + beta * log n)) for n = 1, 2, ...  (Wen et al. 2025)."""
    if iteration < 1:
        raise ValueError("iterations count from 1")
    return max(final, initial / (1.0 + rate * math.log(iteration)))
