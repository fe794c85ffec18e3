import math

import pytest

from icm_ray.data import Example, Persona
from icm_ray.predictability import evaluate, leave_one_out_requests
from icm_ray.prompts import PromptConfig, header_text
from icm_ray.schedules import temperature
from tests.fakes import TableScorer


def test_temperature_schedule_hand_checked():
    assert temperature(1) == pytest.approx(10.0)  # log 1 = 0
    assert temperature(10) == pytest.approx(10 / (1 + 0.99 * math.log(10)))  # 3.0492
    assert temperature(10) == pytest.approx(3.0492, abs=1e-4)
    assert temperature(10**9, initial=1.0, final=0.5) == 0.5  # floor at T_min
    with pytest.raises(ValueError):
        temperature(0)


def examples(n):
    return [Example(str(i), "p", "claim", claim=f"s{i}") for i in range(n)]


def test_utility_hand_computed():
    prompts = PromptConfig()
    table = {"Statement: s0\nLabel:": (math.log(0.8), math.log(0.2)),
             "Statement: s1\nLabel:": (math.log(0.3), math.log(0.7)),
             "Statement: s2\nLabel:": (math.log(0.6), math.log(0.4))}
    labels = {0: True, 1: False, 2: False}
    ev = evaluate(TableScorer(table), "H\n\n", examples(3), labels, prompts, alpha=50, inconsistency=2)
    expected_p = (math.log(0.8) + math.log(0.7) + math.log(0.4)) / 3
    assert ev.predictability == pytest.approx(expected_p)
    assert ev.utility == pytest.approx(50 * expected_p - 2)


def test_leave_one_out_prompt_contains_exactly_the_others():
    prompts = PromptConfig()
    ex = examples(7)
    labels = {p: p % 2 == 0 for p in range(7)}
    header = header_text(prompts, Persona("p", "likes tests"))
    requests = leave_one_out_requests(header, ex, labels, list(labels), prompts)
    assert set(requests) == set(range(7))
    for p, request in requests.items():
        prefix = "".join(request.segments)
        assert prefix.startswith(header)
        for q in range(7):
            shown = f"Statement: s{q}\nLabel: {'True' if labels[q] else 'False'}\n\n"
            assert (shown in prefix) == (q != p), (p, q)
        assert request.query == f"Statement: s{p}\nLabel:"
    # divide and conquer: prompts of one half share the other half as a leading segment
    assert requests[0].segments[1] == requests[1].segments[1] == requests[2].segments[1]


def test_calibrated_utility_removes_a_shared_bias():
    from icm_ray.predictability import calibrated_logprob

    prompts = PromptConfig()
    # the model leans True on everything: raw P rewards labelling all True, calibrated P does not
    table = {f"Statement: s{i}\nLabel:": (math.log(0.9), math.log(0.1)) for i in range(4)}
    all_true = {p: True for p in range(4)}
    raw = evaluate(TableScorer(table), "H", examples(4), all_true, prompts, alpha=1, inconsistency=0)
    cal = evaluate(TableScorer(table), "H", examples(4), all_true, prompts, alpha=1, inconsistency=0,
                   calibrate=True)
    assert raw.predictability == pytest.approx(math.log(0.9))
    assert cal.predictability == pytest.approx(math.log(0.5))
    assert calibrated_logprob(2.0, 2.0, True) == pytest.approx(math.log(0.5))
    assert calibrated_logprob(3.0, 1.0, False) == pytest.approx(math.log(1 / (1 + math.exp(2))))
