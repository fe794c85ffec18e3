"""Logical consistency: which labelled pairs break a rule, and how a broken pair can be mended.

Rules (each a pair constraint between two examples of one consistency group):
- asymmetry:   "A better than B" and "B better than A" must have opposite labels;
- one_of:      claims with different keys (answers) to one question cannot both be True;
- same_answer: claims with the same key must share a label;
- custom group rules from config: "equal" (all share a label) or "exclusive" (at most one True).
Nothing here reads gold labels: groups and keys come from the data's own fields.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from icm_ray.data import Example

Rule = Literal["asymmetry", "one_of", "same_answer", "equal", "exclusive"]

# For each rule, the (label_i, label_j) pairs that satisfy it.
ALLOWED: dict[str, tuple[tuple[bool, bool], ...]] = {
    "asymmetry": ((True, False), (False, True)),
    "one_of": ((True, False), (False, True), (False, False)),
    "exclusive": ((True, False), (False, True), (False, False)),
    "same_answer": ((True, True), (False, False)),
    "equal": ((True, True), (False, False)),
}


@dataclass(frozen=True)
class Constraint:
    i: int  # positions in the search's example list
    j: int
    rule: str

    def satisfied(self, label_i: bool, label_j: bool) -> bool:
        return (label_i, label_j) in ALLOWED[self.rule]


def _pair_rule(a: Example, b: Example, group_rule: str | None) -> str | None:
    if a.kind == "comparison" and b.kind == "comparison":
        if (a.question, a.response_a, a.response_b) == (b.question, b.response_b, b.response_a):
            return "asymmetry"
        return group_rule
    if a.kind == "claim" and b.kind == "claim" and a.key is not None and b.key is not None:
        return "same_answer" if a.key == b.key else "one_of"
    return group_rule


def build_constraints(examples: Sequence[Example], group_rule: str | None = None) -> list[Constraint]:
    """All pair constraints among examples that share a consistency group."""
    if group_rule not in (None, "equal", "exclusive"):
        raise ValueError(f"unknown group rule {group_rule!r} (use 'equal' or 'exclusive')")
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        if example.group is not None:
            groups.setdefault(example.group, []).append(index)
    constraints = []
    for members in groups.values():
        for i, j in itertools.combinations(members, 2):
            rule = _pair_rule(examples[i], examples[j], group_rule)
            if rule is not None:
                constraints.append(Constraint(i, j, rule))
    return constraints


def violations(constraints: Sequence[Constraint], labels: Sequence[bool | None]) -> list[Constraint]:
    """Constraints broken by the labelled examples (unlabelled ones break nothing)."""
    return [c for c in constraints
            if labels[c.i] is not None and labels[c.j] is not None
            and not c.satisfied(labels[c.i], labels[c.j])]


def count_inconsistencies(constraints: Sequence[Constraint], labels: Sequence[bool | None]) -> int:
    return len(violations(constraints, labels))


def consistent_labellings(constraint: Constraint) -> tuple[tuple[bool, bool], ...]:
    """The labellings (label_i, label_j) that would mend a violated pair."""
    return ALLOWED[constraint.rule]
