"""Temperature and penalty schedules on hand-checked points, and their wiring into the search."""

import math

import pytest

from icm_ray.data import Example, Persona
from icm_ray.predictability import utility
from icm_ray.schedules import anneal, temperature
from icm_ray.search import ICMSearch, SearchConfig
from tests.fakes import TypeMajorityScorer


def test_log_schedule_is_the_papers():
    assert temperature(1, schedule="log") == pytest.approx(10.0)
    assert temperature(10, schedule="log") == pytest.approx(3.0492, abs=1e-4)  # 10 / (1 + 0.99 ln 10)
    assert temperature(10) == temperature(10, schedule="log")  # the default


def test_exponential_schedule():
    assert temperature(1, 10.0, 0.01, 0.5, "exponential") == pytest.approx(10.0)
    assert temperature(3, 10.0, 0.01, 0.5, "exponential") == pytest.approx(10 / math.e)  # 3.6788
    assert temperature(3, 10.0, 0.01, 0.5, "exponential") == pytest.approx(3.6788, abs=1e-4)
    assert temperature(100, 10.0, 0.01, 0.5, "exponential") == 0.01  # floored at T_min
    assert temperature(7, 4.0, 0.01, 0.0, "exponential") == 4.0  # rate 0: constant


def test_linear_schedule():
    assert temperature(1, 10.0, 0.01, 0.1, "linear") == pytest.approx(10.0)
    assert temperature(6, 10.0, 0.01, 0.1, "linear") == pytest.approx(5.0)  # 10 * (1 - 0.1 * 5)
    assert temperature(10, 10.0, 0.01, 0.1, "linear") == pytest.approx(1.0)
    assert temperature(11, 10.0, 0.01, 0.1, "linear") == 0.01  # would be 0: floored
    assert temperature(50, 10.0, 0.01, 0.1, "linear") == 0.01


def test_bad_schedule_arguments():
    with pytest.raises(ValueError):
        temperature(0)
    with pytest.raises(ValueError):
        temperature(3, schedule="cubic")


def test_penalty_anneal():
    assert anneal(50.0, None, 7, 16) == 50.0  # constant
    assert anneal(50.0, 10.0, 0, 16) == 50.0
    assert anneal(50.0, 10.0, 4, 16) == pytest.approx(40.0)
    assert anneal(50.0, 10.0, 16, 16) == pytest.approx(10.0)
    assert anneal(50.0, 10.0, 40, 16) == pytest.approx(10.0)  # past the budget: the end value
    assert anneal(0.0, 2.0, 8, 16) == pytest.approx(1.0)  # inconsistency weight ramped up
    assert utility(-0.5, 2, 10.0, 1.5) == pytest.approx(-8.0)  # 10 * -0.5 - 1.5 * 2


def typed(n=12):
    return [Example(str(i), "p", "claim", claim=f"s{i} {'alpha' if i % 2 == 0 else 'beta'}",
                    group=f"g{i // 2}", key=str(i % 2)) for i in range(n)]


def test_search_uses_the_schedules_and_restates_current_u():
    config = SearchConfig(seed=1, iterations=8, seed_labels=4, permutations=20, alpha=40.0,
                          final_alpha=8.0, inconsistency_weight=0.0, final_inconsistency_weight=2.0,
                          temperature_schedule="linear", cooling_rate=0.1)
    search = ICMSearch(typed(), Persona("p", "x"), TypeMajorityScorer(), config)
    state = search.start()
    assert state.utility == pytest.approx(40.0 * state.predictability)  # w(0) = 0
    for n in range(1, 9):
        search.step(state)
        row = state.trace[-1]
        assert row["alpha"] == pytest.approx(40.0 - 32.0 * n / 8)
        assert row["inconsistency_weight"] == pytest.approx(2.0 * n / 8)
        assert row["temperature"] == pytest.approx(max(0.01, 10.0 * (1 - 0.1 * (n - 1))))
        # whether or not the step was accepted, U is stated at this step's weights
        assert row["utility"] == pytest.approx(
            row["alpha"] * row["predictability"] - row["inconsistency_weight"] * row["inconsistency"])


def test_default_schedules_reproduce_the_constant_utility():
    search = ICMSearch(typed(), Persona("p", "x"), TypeMajorityScorer(),
                       SearchConfig(seed=2, iterations=6, seed_labels=4, permutations=20))
    state = search.run()
    for row in state.trace:
        assert row["alpha"] == 50.0 and row["inconsistency_weight"] == 1.0
        assert row["utility"] == 50.0 * row["predictability"] - row["inconsistency"]
