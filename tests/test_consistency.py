from icm_ray.consistency import build_constraints, consistent_labellings, count_inconsistencies, violations
from icm_ray.data import Example


def claim(i, group=None, key=None):
    return Example(id=str(i), persona="p", kind="claim", claim=f"c{i}", question="q",
                   group=group, key=key)


def test_asymmetry_pairs_mirrored_comparisons():
    a = Example("a", "p", "comparison", question="q", response_a="x", response_b="y", group="g")
    b = Example("b", "p", "comparison", question="q", response_a="y", response_b="x", group="g")
    (c,) = build_constraints([a, b])
    assert c.rule == "asymmetry"
    assert count_inconsistencies([c], [True, True]) == 1
    assert count_inconsistencies([c], [False, False]) == 1
    assert count_inconsistencies([c], [True, False]) == 0
    assert set(consistent_labellings(c)) == {(True, False), (False, True)}


def test_one_of_different_answers_cannot_both_be_true():
    (c,) = build_constraints([claim(0, "q1", "4"), claim(1, "q1", "5")])
    assert c.rule == "one_of"
    assert count_inconsistencies([c], [True, True]) == 1
    assert count_inconsistencies([c], [False, False]) == 0
    assert count_inconsistencies([c], [True, False]) == 0
    assert set(consistent_labellings(c)) == {(True, False), (False, True), (False, False)}


def test_same_answer_must_share_label():
    (c,) = build_constraints([claim(0, "q1", "4"), claim(1, "q1", "4")])
    assert c.rule == "same_answer"
    assert count_inconsistencies([c], [True, False]) == 1
    assert count_inconsistencies([c], [False, False]) == 0
    assert set(consistent_labellings(c)) == {(True, True), (False, False)}


def test_custom_group_rules_and_unlabelled_break_nothing():
    examples = [claim(0, "g"), claim(1, "g"), claim(2, "g"), claim(3, "other")]
    assert build_constraints(examples) == []  # no keys, no rule: no constraint
    exclusive = build_constraints(examples, "exclusive")
    assert len(exclusive) == 3  # pairs within group g only
    assert count_inconsistencies(exclusive, [True, True, True, True]) == 3
    assert count_inconsistencies(exclusive, [True, None, True, None]) == 1
    equal = build_constraints(examples, "equal")
    assert [(c.i, c.j) for c in violations(equal, [True, False, True, False])] == [(0, 1), (1, 2)]


def test_groups_are_separate():
    examples = [claim(0, "a", "1"), claim(1, "b", "2")]
    assert build_constraints(examples) == []
