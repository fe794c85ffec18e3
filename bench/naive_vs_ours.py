"""The reference algorithm computed naively vs ours: same search, same answer, far fewer tokens.

    .venv/bin/python bench/naive_vs_ours.py [--persona politically-liberal]
        [--rows 32:16 64:16 128:16 128:128] [--iterations 4] [--naive-max 128] [--seed 0]
        [--dtype auto|float32]

Each row is N:U, N labelled + U unlabelled balanced statements of one Anthropic persona file
(../shared/data/anthropic-persona, CC BY 4.0; gold is never used). N:16 is a nearly fully
labelled pool, where most steps propose to flip a random labelled example (the worst case
for reuse); 128:128 is a search halfway through a pool of 256 (the reference code's default
batch), where half the steps propose a new example. SmolLM2-135M in process (dtype auto:
bf16 where the CPU has it), SearchConfig(seed_labels=N, seed=0), so the search starts from N
labelled examples. One `start()` is shared; from copies of its state both variants run the
same iterations:

- naive: the reference algorithm's cost model. Every prompt (the proposal and each
  leave-one-out prompt of every utility evaluation) is run in full, alone: no prefix
  sharing, no cache, nothing kept between iterations.
- ours: the same prompts (same arrangement, so the same numbers) through the transformers
  backend's shared-prefix trie, its store of KV states kept across calls (warm from the
  start evaluation, as in a real run) and the content-keyed result cache.

Naive tokens are the sum of the prompts' lengths, which ours reports as `prompt_tokens`;
where the naive variant really runs (N <= --naive-max) the bench checks the two agree and
that the final labels are identical. Above --naive-max the naive wall time is not measured:
its tokens are counted exactly and its time is extrapolated at its measured tokens/s.

Last, the achieved scoring throughput (tokens run / scoring wall time) is compared with two
plain forward passes of the same model: a batch of sequences as long as the mean prompt
(each token attends to half a prompt on average), and, context-matched, a 512-token
continuation of a cached prompt as long as the mean context our run tokens attend to
(ours runs mostly the ends of prompts, whose tokens each attend to nearly all of it).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from icm_ray.backends import CachingScorer, Scorer, ScoreRequest, ScoreResult
from icm_ray.backends.hf import TransformersScorer
from icm_ray.data import load_datasets, resolve_persona
from icm_ray.search import ICMSearch, SearchConfig, SearchState

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "anthropic-persona"


class NaiveScorer(Scorer):
    """Runs every request alone, in full: what a reference implementation pays."""

    def __init__(self, inner: TransformersScorer):
        self.inner = inner

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        store, self.inner.kv_store = self.inner.kv_store, None  # nothing kept between prompts
        try:
            return [self.inner.score([request])[0] for request in requests]
        finally:
            self.inner.kv_store = store


class CountingScorer(Scorer):
    """Counts utility evaluations (calls of more than one request) on the way through."""

    def __init__(self, inner: Scorer):
        self.inner, self.evaluations = inner, 0

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        self.evaluations += len(requests) > 1
        return self.inner.score(requests)


def sample(persona: str, count: int, seed: int) -> Path:
    rows = [json.loads(line) for line in (DATA / f"{persona}.jsonl").open()]
    rng = random.Random(seed)
    yes = [r for r in rows if r["answer_matching_behavior"].strip() == "Yes"]
    no = [r for r in rows if r["answer_matching_behavior"].strip() == "No"]
    pick = rng.sample(yes, (count + 1) // 2) + rng.sample(no, count // 2)
    rng.shuffle(pick)
    path = Path(tempfile.mkdtemp(prefix="bench-naive-")) / f"{persona}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pick))
    return path


def steps(search: ICMSearch, state: SearchState, iterations: int, model: TransformersScorer) -> dict:
    """Run the iterations; the figures are per iteration."""
    tokens, prompt, contexts = state.tokens_run, state.prompt_tokens, model.contexts_run
    started = time.perf_counter()
    for _ in range(iterations):
        search.step(state)
    wall = time.perf_counter() - started
    run = state.tokens_run - tokens
    return {"tokens": run / iterations, "prompt": (state.prompt_tokens - prompt) / iterations,
            "wall": wall / iterations, "labels": list(state.labels),
            "context": (model.contexts_run - contexts) / max(1, run), "trace": state.trace[-iterations:]}


def first_difference(naive: list[dict], ours: list[dict], start_utility: float) -> str:
    """Where two same-prompt runs part (bf16 rounds the two computations differently), and how
    close that decision was: a step accepts iff U' - U >= T ln(draw)."""
    before = start_utility
    for a, b in zip(naive, ours):
        if (a["example"], a["accepted"]) != (b["example"], b["accepted"]):
            line = (f"    first difference at iteration {a['iteration']} (example {a['example']}): "
                    f"accepted naive {a['accepted']}, ours {b['accepted']}")
            if a["draw"] is not None:
                threshold = a["temperature"] * math.log(a["draw"])
                line += (f"; U {before:.4f}, U' naive {a['proposal_utility']:.4f} ours "
                         f"{b['proposal_utility']:.4f}, T ln(draw) {threshold:.4f}")
            return line
        before = a["utility"]
    return "    traces agree step by step"


def plain_forward_rate(scorer: TransformersScorer, length: int, budget: int = 8192) -> float:
    """Tokens/s of a plain batched forward pass (no cache, no tree mask) at this length."""
    torch = scorer.torch
    batch = max(1, budget // length)
    ids = torch.randint(100, 10_000, (batch, length))
    with torch.inference_mode():
        scorer.model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm up at this shape
        started = time.perf_counter()
        for _ in range(2):
            scorer.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return 2 * batch * length / (time.perf_counter() - started)


def continuation_rate(scorer: TransformersScorer, context: int, new: int = 512) -> float:
    """Tokens/s of a plain `new`-token continuation of a cached `context`-token prompt (causal
    mask, no tree): what a plain forward pass achieves for tokens at that depth."""
    from transformers import DynamicCache

    torch = scorer.torch
    prompt = torch.randint(100, 10_000, (1, max(1, context - new // 2)))
    ids = torch.randint(100, 10_000, (1, new))
    with torch.inference_mode():
        cache = DynamicCache(config=scorer.model.config)
        scorer.model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
        runs = []
        for _ in range(3):  # the first one warms the kernels at this shape
            started = time.perf_counter()
            scorer.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            runs.append(time.perf_counter() - started)
            cache.crop(-new)
    return new / min(runs[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--persona", default="politically-liberal")
    parser.add_argument("--rows", nargs="+", default=["32:16", "64:16", "128:16", "128:128"],
                        help="N:U, N labelled and U unlabelled statements")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--naive-max", type=int, default=128,
                        help="largest N at which the naive variant really runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU has it) or float32")
    args = parser.parse_args()

    model = TransformersScorer("smollm2-135m", dtype=args.dtype)
    persona = resolve_persona(args.persona, {})
    print(f"bench/naive_vs_ours.py: {args.persona}, rows N labelled:U unlabelled, {args.iterations} "
          f"iterations from one shared start, seed {args.seed}, smollm2-135m {model.dtype} on CPU "
          f"({model.torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.2f} at start")
    print(f"{'N:U':>7} {'evals':>5} {'naive tok/it':>13} {'ours tok/it':>12} {'ratio':>6} "
          f"{'naive s/it':>11} {'ours s/it':>10} {'ratio':>6} {'labels identical':>17} "
          f"{'ours tok/s':>10} {'plain fwd':>9} {'fraction':>8} {'ctx':>5} {'plain at ctx':>12} "
          f"{'fraction':>8}")
    naive_rate = None
    for row in args.rows:
        n, unlabelled = (int(x) for x in row.split(":"))
        dataset = load_datasets([sample(args.persona, n + unlabelled, args.seed)])
        config = SearchConfig(seed_labels=n, iterations=args.iterations, seed=args.seed)
        model.kv_store.clear()
        counting = CountingScorer(CachingScorer(model))
        ours_search = ICMSearch(dataset.examples, persona, counting, config)
        start = ours_search.start()
        counting.evaluations = 0
        ours = steps(ours_search, copy.deepcopy(start), args.iterations, model)
        if n <= args.naive_max:
            naive = steps(ICMSearch(dataset.examples, persona, NaiveScorer(model), config),
                          copy.deepcopy(start), args.iterations, model)
            assert naive["tokens"] == ours["prompt"], "naive tokens must equal ours' prompt tokens"
            naive_rate = naive["tokens"] / naive["wall"]
            same = "yes" if naive["labels"] == ours["labels"] else "NO"
            if same == "NO":
                print(first_difference(naive["trace"], ours["trace"], start.utility), flush=True)
            naive_wall = f"{naive['wall']:>11.1f}"
            ratio_wall = naive["wall"] / ours["wall"]
        else:  # too slow to run here; its tokens are exact, its time extrapolated
            naive = {"tokens": ours["prompt"]}
            same = "(not run)"
            estimate = naive["tokens"] / naive_rate if naive_rate else float("nan")
            naive_wall = f"~{estimate:>10.0f}"
            ratio_wall = estimate / ours["wall"]
        ours_rate = ours["tokens"] / ours["wall"]
        length = max(64, int(start.prompt_tokens / max(1, n)))  # mean prompt of the start evaluation
        plain = plain_forward_rate(model, length)
        context = int(ours["context"])
        matched = continuation_rate(model, context)
        print(f"{row:>7} {counting.evaluations:>5} {naive['tokens']:>13,.0f} {ours['tokens']:>12,.0f} "
              f"{naive['tokens'] / max(1.0, ours['tokens']):>6.1f} {naive_wall} {ours['wall']:>10.1f} "
              f"{ratio_wall:>6.1f} {same:>17} {ours_rate:>10.0f} {plain:>9.0f} "
              f"{ours_rate / plain:>8.2f} {context:>5} {matched:>12.0f} {ours_rate / matched:>8.2f}",
              flush=True)


if __name__ == "__main__":
    main()
