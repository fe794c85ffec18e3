"""The prompt arrangement: exact leave-one-out whatever the tail, stable under one change,
and the tail policy the search follows."""

import pytest

from icm_ray.backends.kvstore import PrefixKVStore
from icm_ray.data import Example, Persona
from icm_ray.predictability import leave_one_out_requests, log_odds_given, next_tail
from icm_ray.prompts import PromptConfig, header_text
from icm_ray.search import ICMSearch, SearchConfig
from tests.fakes import TableScorer, TypeMajorityScorer

PROMPTS = PromptConfig()
HEADER = header_text(PROMPTS, Persona("p", "likes tests"))


def examples(n: int) -> list[Example]:
    return [Example(id=f"e{i}", persona="p", kind="claim", claim=f"s{i}") for i in range(n)]


def shown(label: bool, q: int) -> str:
    return f"Statement: s{q}\nLabel: {'True' if label else 'False'}\n\n"


@pytest.mark.parametrize("tail", [[], [3], [9, 2, 5], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
def test_every_prompt_holds_exactly_the_others_once(tail):
    ex = examples(16)
    labels = {p: p % 3 == 0 for p in range(11)}
    requests = leave_one_out_requests(HEADER, ex, labels, list(labels) + [13], PROMPTS, tail)
    for p, request in requests.items():
        prefix = "".join(request.segments)
        assert request.segments[0] == HEADER and request.query == f"Statement: s{p}\nLabel:"
        for q in labels:
            assert prefix.count(shown(labels[q], q)) == (q != p), (p, q)
        # the tail closes every prompt, in its order, one segment per member
        own_tail = [q for q in tail if q != p]
        assert list(request.segments[len(request.segments) - len(own_tail):]) == [
            shown(labels[q], q) for q in own_tail]


def test_a_newcomer_proposal_is_its_later_leave_one_out_prompt():
    ex = examples(12)
    labels = {p: p % 2 == 0 for p in range(8)}
    proposal = leave_one_out_requests(HEADER, ex, labels, [10], PROMPTS, [6])[10]
    grown = {**labels, 10: True}
    later = leave_one_out_requests(HEADER, ex, grown, list(grown), PROMPTS,
                                   next_tail([6], labels, [10], 32))
    assert later[10] == proposal
    # and every base member's prompt only gained the newcomer's demonstration at its end
    before = leave_one_out_requests(HEADER, ex, labels, list(labels), PROMPTS, [6])
    for p in labels:
        assert later[p].segments == before[p].segments + (shown(True, 10),)


def test_one_relabelled_example_changes_each_prompt_only_at_its_demonstration():
    """The tree is fixed by pool positions and every demonstration is its own segment, so each
    prompt keeps its segments before the change (the prefix a backend can keep) and after it."""
    ex = examples(32)
    labels = {p: p % 2 == 0 for p in range(0, 32, 1) if p % 5 != 4}
    flipped = {**labels, 7: not labels[7]}
    before = leave_one_out_requests(HEADER, ex, labels, list(labels), PROMPTS)
    after = leave_one_out_requests(HEADER, ex, flipped, list(flipped), PROMPTS)
    assert after[7] == before[7]  # its own prompt does not contain it
    for p in labels:
        if p == 7:
            continue
        old, new = before[p].segments, after[p].segments
        at = old.index(shown(labels[7], 7))
        assert old[:at] == new[:at] and new[at] == shown(not labels[7], 7)
        assert old[at + 1:] == new[at + 1:]


def test_tail_policy():
    labels = {p: True for p in range(64)}  # 0..63 labelled; 60..63 the tail
    tail = [60, 61, 62, 63]
    assert next_tail(tail, labels, [70], 32) == [60, 61, 62, 63, 70]  # newcomer: appended
    assert next_tail(tail, labels, [62], 32) == [60, 61, 63, 62]  # recent member: to the end
    assert next_tail(tail, labels, [5], 32) == []  # a base member changed: rebuild
    assert next_tail(tail, labels, [70], 4) == []  # tail over its limit: rebuild
    assert next_tail(tail, labels, [70], 0) == []
    long_tail = list(range(40, 64))
    assert next_tail(long_tail, labels, [41], 32) == []  # deep in a long tail: cheaper to rebuild
    assert next_tail(long_tail, labels, [60], 32)[-1] == 60


def test_search_keeps_the_tail_in_its_state_and_resumes_identically(typed_file):
    from icm_ray.data import load_datasets
    from icm_ray.search import SearchState

    pool = load_datasets([typed_file]).examples
    config = SearchConfig(seed=1, iterations=10, seed_labels=4, permutations=50)
    straight = ICMSearch(pool, Persona("p", "x"), TypeMajorityScorer(), config).run()
    search = ICMSearch(pool, Persona("p", "x"), TypeMajorityScorer(), config)
    state = search.start()
    tails = []
    for _ in range(5):
        search.step(state)
        tails.append(list(state.tail))
        assert set(state.tail) <= set(state.labelled)
    assert any(tails)  # newcomers went to the tail
    resumed = SearchState.from_dict(state.to_dict())
    assert resumed.tail == state.tail
    assert search.run(resumed).labels == straight.labels
    untailed = ICMSearch(pool, Persona("p", "x"), TypeMajorityScorer(),
                         config.model_copy(update={"max_tail": 0})).run()
    assert untailed.tail == [] and len(untailed.labelled) > 4


def test_old_checkpoints_without_a_tail_still_load():
    from icm_ray.search import SearchState

    state = ICMSearch(examples(6), Persona("p", "x"), TypeMajorityScorer(),
                      SearchConfig(seed_labels=2, iterations=1)).start()
    data = state.to_dict()
    del data["tail"]
    assert SearchState.from_dict(data).tail == []


def test_targets_outside_the_pool_share_one_context():
    ex = examples(6)
    labels = {0: True, 1: False, 2: True}
    targets = [Example(id=f"t{i}", persona="p", kind="claim", claim=f"t{i}") for i in range(3)]
    table = {f"Statement: t{i}\nLabel:": (-0.1, -2.4) for i in range(3)}
    scorer = TableScorer(table)
    odds, _, _ = log_odds_given(scorer, HEADER, ex, labels, targets, PROMPTS)
    assert odds == pytest.approx([2.3] * 3)
    contexts = {r.segments for r in scorer.requests}
    assert len(contexts) == 1
    text = "".join(contexts.pop())
    assert all(text.count(shown(labels[q], q)) == 1 for q in labels)


def test_kv_store_is_an_lru_within_its_budget():
    import torch

    store = PrefixKVStore(max_bytes=3 * 400)
    states = {k: torch.zeros(100) for k in (b"a", b"b", b"c", b"d")}  # 400 bytes each
    for key in (b"a", b"b", b"c"):
        store.put(key, states[key])
    assert store.get(b"a") is states[b"a"]  # a is now the most recent
    store.put(b"d", states[b"d"])  # evicts b, the least recent
    assert store.get(b"b") is None and store.get(b"c") is not None and len(store) == 3
    assert store.bytes == 1200
    store.put(b"huge", torch.zeros(1000))  # larger than the whole budget: not kept
    assert store.get(b"huge") is None and store.bytes == 1200
    store.clear()
    assert len(store) == 0 and store.bytes == 0
