from icm_ray.steering import SteeringExample, prompt_block, relevance, select


def ex(i, text, label, confidence):
    return SteeringExample(str(i), text, label, confidence, f"Statement: {text}\nLabel: {label}\n\n")


POOL = [ex(0, "I recycle every bottle", True, 0.9), ex(1, "Coal plants should grow", False, 0.95),
        ex(2, "I bike to work to cut emissions", True, 0.6), ex(3, "Recycling wastes time", False, 0.7),
        ex(4, "I plant trees every spring", True, 0.8)]


def test_most_confident_first_without_query():
    assert [e.id for e in select(POOL, 3)] == ["1", "0", "4"]


def test_query_ranks_by_relevance():
    chosen = select(POOL, 2, query="recycling and bottle recycle")
    assert {e.id for e in chosen} == {"0", "3"}
    scores = relevance("bike work", [e.text for e in POOL])
    assert scores.index(max(scores)) == 2 and min(scores) == 0.0


def test_balance_true_and_false():
    chosen = select(POOL, 4, balance=True)
    assert sum(e.label for e in chosen) == 2 and len(chosen) == 4
    only_true = [e for e in POOL if e.label]
    assert len(select(only_true, 2, balance=True)) == 2  # one label missing: fill from the other


def test_limits_and_prompt_block():
    assert select(POOL, 0) == [] and select([], 3) == []
    assert len(select(POOL, 99)) == len(POOL)
    block = prompt_block("Header.\n\n", select(POOL, 2))
    assert block.startswith("Header.\n\n") and block.count("Label:") == 2
