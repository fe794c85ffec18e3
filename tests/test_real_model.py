"""The transformers scorer and the search on the real built-in model (SmolLM2-135M)."""

import math
from dataclasses import replace

import pytest

from icm_ray.backends.base import CachingScorer, ScoreRequest
from icm_ray.data import load_demo
from icm_ray.errors import UserError
from icm_ray.predictability import leave_one_out_requests
from icm_ray.prompts import PromptConfig, header_text
from icm_ray.search import ICMSearch, SearchConfig

OPTIONS = (" True", " False")


@pytest.fixture(scope="module")
def scorer():
    from icm_ray.backends.hf import TransformersScorer

    return TransformersScorer("smollm2-135m", dtype="float32")


@pytest.fixture(scope="module")
def demo():
    dataset, personas = load_demo()
    name = dataset.personas()[0]
    return [e for e in dataset.examples if e.persona == name], personas[name]


def test_scores_match_a_plain_forward_pass_and_know_a_fact(scorer):
    import torch

    header = "Label each statement True if it is correct and False otherwise.\n\n"
    queries = ["The capital of France is Paris. True or False? Answer:",
               "The capital of France is Berlin. True or False? Answer:"]
    results = scorer.score([ScoreRequest((header,), q, OPTIONS) for q in queries])
    for query, result in zip(queries, results):
        assert math.isclose(math.exp(result.logprobs[0]) + math.exp(result.logprobs[1]), 1, rel_tol=1e-5)
        ids = scorer.tokenize(header) + scorer.tokenize(query)
        with torch.inference_mode():
            logits = scorer.model(torch.tensor([ids])).logits[0, -1]
        reference = torch.log_softmax(logits[scorer.option_ids(OPTIONS)], -1).tolist()
        assert result.logprobs == pytest.approx(reference, abs=1e-4)
        assert result.prompt_tokens == len(ids)
    paris, berlin = (r.logprobs[0] - r.logprobs[1] for r in results)
    assert paris > berlin


def test_prefix_sharing_changes_nothing_but_cost(scorer, demo):
    """Packed tree attention, KV reuse and one-request-at-a-time scoring agree (fp32)."""
    examples, persona = demo
    prompts = PromptConfig()
    labels = {p: p % 3 != 0 for p in range(10)}
    requests = list(leave_one_out_requests(header_text(prompts, persona), examples, labels,
                                           list(labels), prompts).values())
    scorer.kv_store.clear()
    before = scorer.tokens_run
    shared = scorer.score(requests)
    run_shared = scorer.tokens_run - before
    assert sum(r.tokens_run for r in shared) == run_shared
    assert run_shared < 0.5 * sum(r.prompt_tokens for r in shared)
    alone = []
    for request in requests[:4]:
        scorer.kv_store.clear()  # nothing kept from earlier calls: the whole prompt runs
        alone.append(scorer.score([request])[0])
    for a, b in zip(alone, shared):
        assert a.prompt_tokens == b.prompt_tokens and a.tokens_run == a.prompt_tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)
    saved = scorer.pack_tokens
    scorer.pack_tokens = 0  # no packing: one forward per segment and per query
    try:
        unpacked = scorer.score(requests)
    finally:
        scorer.pack_tokens = saved
    for a, b in zip(unpacked, shared):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)


def test_kv_states_kept_across_calls_change_nothing_but_cost(scorer, demo):
    """A later call reuses the KV states of segments an earlier call ran: the next tail member
    of a set costs about one demonstration and one query per prompt, with the same numbers
    as a scorer that keeps nothing (fp32)."""
    from icm_ray.backends.hf import TransformersScorer

    examples, persona = demo
    prompts = PromptConfig()
    header = header_text(prompts, persona)
    labels = {p: p % 3 != 0 for p in range(12)}
    scorer.kv_store.clear()
    first = leave_one_out_requests(header, examples, labels, list(labels), prompts, tail=[10, 11])
    scorer.score(list(first.values()))
    grown = {**labels, 12: True}
    requests = list(leave_one_out_requests(header, examples, grown, list(grown), prompts,
                                           tail=[10, 11, 12]).values())
    reused = scorer.score(requests)
    fresh = TransformersScorer("smollm2-135m", dtype="float32", kv_cache_mb=0).score(requests)
    demo_and_query = [len(scorer.tokenize(r.segments[-1])) + len(scorer.tokenize(r.query))
                      for r in requests[:-1]]  # base members and tail members before the newcomer
    assert sum(r.tokens_run for r in reused[:-1]) <= sum(demo_and_query)
    assert sum(r.tokens_run for r in fresh) > 3 * sum(r.tokens_run for r in reused)
    assert [r.prompt_tokens for r in reused] == [r.prompt_tokens for r in fresh]
    for a, b in zip(reused, fresh):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert scorer.kv_store.hits > 0 and 0 < scorer.kv_store.bytes <= scorer.kv_store.max_bytes


def test_bf16_scores_are_the_same_computation_whatever_the_store_holds(demo):
    """In bf16 the plan (what the store holds, what is packed with what, a request alone, no
    packing at all) changes rounding only: oneDNN picks its GEMM kernel by row count, so a
    segment's bits can differ by plan, by about as much as bf16 differs from fp32. A wrong
    path (a segment seeing another's states) would be off by nats, not by rounding."""
    from icm_ray.backends.hf import TransformersScorer

    examples, persona = demo
    prompts = PromptConfig()
    header = header_text(prompts, persona)
    labels = {p: p % 3 != 0 for p in range(12)}

    def log_odds(results):
        return [r.logprobs[0] - r.logprobs[1] for r in results]

    def requests(labels, tail=()):
        return list(leave_one_out_requests(header, examples, labels, list(labels), prompts,
                                           tail=list(tail)).values())

    wanted = requests(labels)
    reference = log_odds(TransformersScorer("smollm2-135m", dtype="float32", kv_cache_mb=0,
                                            pack_tokens=0).score(wanted))
    scorer = TransformersScorer("smollm2-135m", dtype="bfloat16")
    plans = {"cold": log_odds(scorer.score(wanted))}
    scorer.score(requests({**labels, 3: True, 12: False}, tail=[3, 12]))
    plans["warmed by a related set"] = log_odds(scorer.score(wanted))
    scorer.kv_store.clear()
    plans["one request at a time"] = log_odds([scorer.score([r])[0] for r in wanted])
    plain = TransformersScorer("smollm2-135m", dtype="bfloat16", kv_cache_mb=0, pack_tokens=0)
    plans["no store, no packing"] = log_odds(plain.score(wanted))
    for plan, values in plans.items():
        worst = max(abs(a - b) for a, b in zip(values, reference))
        assert worst < 0.3, f"{plan}: {worst:.3f} nats from fp32"
    cached = CachingScorer(scorer)  # what the replicas and the actors put in front of it
    first = cached.score(wanted)
    assert cached.score(wanted) == [replace(r, tokens_run=0) for r in first]


def test_sliding_window_models_score_like_a_plain_forward_pass(tmp_path, demo):
    """Gemma 3's path (sliding-window layers: every state kept, the model's own masks, one
    segment chain at a time, soft-capped logits) on a tiny random Gemma 3 built here, against
    one plain forward pass per prompt, with prompts longer than the window (fp32)."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from icm_ray import models
    from icm_ray.backends.hf import TransformersScorer

    tokenizer = AutoTokenizer.from_pretrained(models.converted_dir(models.resolve("smollm2-135m")))
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=2048,
        final_logit_softcapping=5.0)
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(tmp_path / "tiny-gemma")
    tokenizer.save_pretrained(tmp_path / "tiny-gemma")
    gemma = TransformersScorer(str(tmp_path / "tiny-gemma"), dtype="float32")
    assert gemma.sliding and gemma.kv_store is None
    examples, persona = demo
    prompts = PromptConfig()
    labels = {p: p % 3 != 0 for p in range(6)}
    requests = list(leave_one_out_requests(header_text(prompts, persona), examples, labels,
                                           list(labels), prompts).values())
    for request, result in zip(requests, gemma.score(requests)):
        ids = gemma.prefix_tokens + [t for s in request.segments for t in gemma.tokenize(s)]
        ids += gemma.tokenize(request.query)
        assert result.prompt_tokens == len(ids) > 8 * config.sliding_window
        with torch.inference_mode():
            logits = gemma.model(torch.tensor([ids])).logits[0, -1]
        reference = torch.log_softmax(logits[gemma.option_ids(OPTIONS)], -1).tolist()
        assert result.logprobs == pytest.approx(reference, abs=1e-4)


def test_caching_scorer_serves_repeats_without_running(scorer):
    cached = CachingScorer(scorer)
    request = ScoreRequest(("Header.\n\n",), "Statement: cats purr.\nLabel:", OPTIONS)
    first = cached.score([request])[0]
    again, twin = cached.score([request, request])
    assert again.logprobs == first.logprobs == twin.logprobs
    assert again.tokens_run == 0 and again.tokens_cached == first.prompt_tokens


def test_options_must_start_with_different_tokens(scorer):
    with pytest.raises(UserError, match="share their first token"):
        scorer.score([ScoreRequest(("h",), "q", (" True", " True story"))])


def test_short_search_on_the_real_model(scorer, demo):
    examples, persona = demo
    config = SearchConfig(iterations=3, seed_labels=4, seed=0, permutations=100)
    search = ICMSearch(examples[:10], persona, CachingScorer(scorer), config)
    state = search.run()
    assert 4 <= len(state.labelled) <= 7
    assert state.finished and state.orientation["decision"].startswith(("kept", "flipped"))
    assert len(state.trace) == 3 and state.tokens_run > 0
    assert state.prompt_tokens > state.tokens_run  # prefix reuse served part of the prompts
    for row in state.trace:  # accounting on every trace row: run + served from cache = prompt
        assert row["tokens_run"] + row["tokens_cached"] == row["prompt_tokens"] and row["wall_seconds"] > 0
    again = ICMSearch(examples[:10], persona, CachingScorer(scorer), config).run()
    assert again.labels == state.labels  # determinism on the real model


def test_a_run_that_meets_a_too_long_prompt_leaves_nothing_behind(tmp_path, capsys):
    """The context limit is only met once the search scores; no checkpoint yet, so no run dir."""
    from tests.conftest import write_native
    from tests.runs import cli

    rows = [{"id": f"l{i}", "persona": "p", "claim": "word " * 1900} for i in range(6)]
    data = write_native(tmp_path / "long.jsonl", rows)
    out = tmp_path / "run"
    assert cli("run", "--no-ray", "--data", data, "--out", out, "--iterations", 1) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert last.startswith("error: ") and "exceeds the model's context" in last
    assert not out.exists()
