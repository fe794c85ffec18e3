import json
import math

import pyarrow.parquet as pq
import pytest

from icm_ray.data import Persona, load_datasets
from icm_ray.prompts import PromptConfig
from icm_ray.results import TRACE_SCHEMA, write_run
from icm_ray.search import ICMSearch, SearchConfig, SearchState, accept
from icm_ray.store import RunStore
from tests.conftest import typed_rows, write_native
from tests.fakes import TypeMajorityScorer, type_of

PERSONA = Persona("p", "likes tests")


def run(examples, seed=0, iterations=30, scorer=None, **kw):
    config = SearchConfig(seed=seed, iterations=iterations, seed_labels=4, permutations=200, **kw)
    return ICMSearch(examples, PERSONA, scorer or TypeMajorityScorer(), config).run()


def test_acceptance_rule():
    assert accept(0.5, 1.0, 0.999)
    assert accept(0.0, 1.0, 0.999)
    assert accept(-1.0, 2.0, math.exp(-0.5) - 1e-9)
    assert not accept(-1.0, 2.0, math.exp(-0.5) + 1e-9)
    assert not accept(-100.0, 0.01, 0.0 + 1e-12)


def test_search_finds_a_coherent_labelling(typed_file):
    examples = load_datasets([typed_file]).examples
    state = run(examples, iterations=40)
    labels = state.labelled
    assert len(labels) == len(examples)  # the budget reaches every example
    by_type = {}
    for p, y in labels.items():
        by_type.setdefault(type_of(examples[p].claim), set()).add(y)
    assert by_type in ({"alpha": {True}, "beta": {False}}, {"alpha": {False}, "beta": {True}})
    assert state.inconsistency == 0
    assert len(state.trace) == 40
    row = state.trace[-1]
    assert set(row) >= {"iteration", "temperature", "utility", "predictability", "inconsistency",
                        "accepted", "labelled", "tokens_run"}


def test_same_seed_same_labels_and_seed_matters(typed_file):
    examples = load_datasets([typed_file]).examples
    a = run(examples, seed=3, iterations=12)
    b = run(examples, seed=3, iterations=12)
    assert a.labels == b.labels and a.trace == [dict(r, wall_seconds=r["wall_seconds"]) for r in a.trace]
    assert [r["utility"] for r in a.trace] == [r["utility"] for r in b.trace]
    others = {tuple(run(examples, seed=s, iterations=3).labels) for s in range(6)}
    assert len(others) > 1


def test_checkpoint_round_trip_resumes_to_identical_labels(typed_file):
    examples = load_datasets([typed_file]).examples
    config = SearchConfig(seed=5, iterations=20, seed_labels=4, permutations=100)
    straight = ICMSearch(examples, PERSONA, TypeMajorityScorer(), config).run()
    search = ICMSearch(examples, PERSONA, TypeMajorityScorer(), config)
    state = search.start()
    for _ in range(7):
        search.step(state)
    saved = json.loads(json.dumps(state.to_dict()))  # what a checkpoint stores
    fresh = ICMSearch(examples, PERSONA, TypeMajorityScorer(), config)
    resumed = fresh.run(SearchState.from_dict(saved))
    assert resumed.labels == straight.labels
    assert resumed.utility == pytest.approx(straight.utility)


def test_gold_labels_never_reach_the_search(tmp_path):
    rows = typed_rows(n=12)
    original = write_native(tmp_path / "a.jsonl", rows)
    permuted_rows = [dict(r, gold=not r["gold"]) if i % 3 else dict(r, gold=None)
                     for i, r in enumerate(rows)]
    permuted = write_native(tmp_path / "b.jsonl", permuted_rows)
    a, b = load_datasets([original]), load_datasets([permuted])
    assert a.gold != b.gold
    assert a.examples == b.examples  # the search's input is identical
    scorer = TypeMajorityScorer()
    state_a = run(a.examples, seed=1, iterations=15, scorer=scorer)
    state_b = run(b.examples, seed=1, iterations=15)
    assert state_a.labels == state_b.labels
    assert not any("gold" in text or "'True'" in text for text in scorer.seen_text[:1])


def test_orientation_follows_zero_shot_prior(typed_file):
    """The fake model's zero-shot prior says alpha is True: the final labels must agree."""

    class PriorScorer(TypeMajorityScorer):
        def score(self, requests):
            out = super().score(requests)
            fixed = []
            for request, result in zip(requests, out):
                if len(request.segments) == 1:  # zero-shot: header only
                    p = 0.7 if type_of(request.query) == "alpha" else 0.3
                    result = type(result)((math.log(p), math.log(1 - p)), 1, 1)
                fixed.append(result)
            return fixed

    examples = load_datasets([typed_file]).examples
    for seed in range(4):
        state = run(examples, seed=seed, iterations=30, scorer=PriorScorer())
        assert state.orientation["decision"] in ("kept", "flipped")
        for p, y in state.labelled.items():
            assert y == (type_of(examples[p].claim) == "alpha")
        assert state.orientation["p_value"] < 0.05


def test_clamped_labels_are_never_flipped(typed_file):
    examples = load_datasets([typed_file]).examples
    clamp = {examples[0].id: False, examples[1].id: True}  # against the fake's prior type order
    config = SearchConfig(seed=2, iterations=25, seed_labels=2, permutations=50)
    state = ICMSearch(examples, PERSONA, TypeMajorityScorer(), config, clamp=clamp).run()
    assert state.labels[0] is False and state.labels[1] is True
    assert state.orientation["decision"] == "anchored by human labels"


def _write_trace(tmp_path, name, examples, state):
    store = RunStore(tmp_path / name)
    write_run(store, {"p": (examples, state)}, {}, {"search": {"seed": 0}}, {}, PromptConfig())
    return pq.read_table(tmp_path / name / "trace.parquet")


def test_trace_parquet_has_one_fixed_schema(typed_file, tmp_path):
    """Same columns and types whatever the rows: no steps, steps, or an old checkpoint's rows."""
    examples = load_datasets([typed_file]).examples
    normal = run(examples, iterations=5)
    assert set(normal.trace[-1]) | {"persona"} == set(TRACE_SCHEMA.names)  # no field left out
    table = _write_trace(tmp_path, "normal", examples, normal)
    assert table.schema == TRACE_SCHEMA and table.num_rows == 5
    empty = _write_trace(tmp_path, "none", examples, run(examples, iterations=0))
    assert empty.schema == TRACE_SCHEMA and empty.num_rows == 0
    old = run(examples, iterations=3)  # an unfinished old checkpoint: rows written before `draw`
    for row in old.trace:
        row.pop("draw")
    table = _write_trace(tmp_path, "old", examples, old)
    assert table.schema == TRACE_SCHEMA and table.column("draw").to_pylist() == [None] * 3
