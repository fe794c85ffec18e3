"""Schedules of the search: temperature, and the weights of U = alpha(n) * P - w(n) * I.

Shared by the search (icm_ray.search) and the tuning experiment (icm_ray_tune). Every
temperature schedule starts at T0 for n = 1, cools faster for a larger `rate`, and never
goes below T_min:

    log          T_n = T0 / (1 + rate * ln n)        the paper's (Wen et al. 2025)
    exponential  T_n = T0 * exp(-rate * (n - 1))
    linear       T_n = T0 * (1 - rate * (n - 1))     falls by rate * T0 per step

The penalty weights (alpha, and the weight w of inconsistencies) are either constant or
annealed linearly from a start value at n = 0 (the seed labels) to an end value at the
last iteration of the budget.
"""

from __future__ import annotations

import math
from typing import Literal

TemperatureSchedule = Literal["log", "exponential", "linear"]
TEMPERATURE_SCHEDULES: tuple[str, ...] = ("log", "exponential", "linear")


def temperature(iteration: int, initial: float = 10.0, final: float = 0.01,
                rate: float = 0.99, schedule: TemperatureSchedule = "log") -> float:
    """T_n for n = 1, 2, ... (see the module docstring); floored at `final` (T_min)."""
    if iteration < 1:
        raise ValueError("iterations count from 1")
    if schedule == "log":
        value = initial / (1.0 + rate * math.log(iteration))
    elif schedule == "exponential":
        value = initial * math.exp(-rate * (iteration - 1))
    elif schedule == "linear":
        value = initial * (1.0 - rate * (iteration - 1))
    else:
        raise ValueError(f"unknown temperature schedule '{schedule}' "
                         f"(use {', '.join(TEMPERATURE_SCHEDULES)})")
    return max(final, value)


def anneal(start: float, end: float | None, iteration: int, iterations: int) -> float:
    """`start` at n = 0, moving linearly to `end` at n = iterations (constant if end is None)."""
    if end is None or iterations <= 0:
        return start
    progress = min(max(iteration / iterations, 0.0), 1.0)
    return start + (end - start) * progress
