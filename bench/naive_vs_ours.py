"""The reference algorithm computed naively vs ours: same search, same answer, far fewer tokens.

    .venv/bin/python bench/naive_vs_ours.py [--persona politically-liberal] [--labelled 32 64 128]
                                             [--unlabelled 16] [--iterations 4] [--naive-max 128]

What runs, per size N: N + `--unlabelled` balanced statements of one Anthropic persona file
(../shared/data/anthropic-persona, CC BY 4.0; gold is never used), SmolLM2-135M in
process (dtype auto: bf16 where the CPU has it), SearchConfig(seed_labels=N, seed=0), so the
search starts from N labelled examples.
One `start()` is shared; from copies of its state both variants run the same iterations:

- naive: the reference algorithm's cost model. Every prompt (the proposal and each
  leave-one-out prompt of every utility evaluation) is run in full, alone: no prefix
  sharing, no cache, nothing kept between iterations.
- ours: the same prompts (same divide-and-conquer arrangement, so the same numbers) through
  the transformers backend's shared-prefix trie and the content-keyed cache, which keeps
  the scores of prompts an iteration did not change (the proposal's prompt is always one
  of them: it is the new example's leave-one-out prompt in the proposed set).

Naive tokens are the sum of the prompts' lengths, which ours reports as `prompt_tokens`;
where the naive variant really runs (N <= --naive-max) the bench checks the two agree and
that the final labels are identical. Above --naive-max the naive wall time is not measured:
its tokens are counted exactly and its time is extrapolated at its measured tokens/s.

Last, the achieved scoring throughput (tokens run / scoring wall time) is compared with a
plain batched forward pass of the same model over sequences as long as the mean prompt.
"""

from __future__ import annotations

import argparse
import copy
import json
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
        return [self.inner.score([request])[0] for request in requests]


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


def steps(search: ICMSearch, state: SearchState, iterations: int) -> dict:
    """Run the iterations; the figures are per iteration."""
    tokens, prompt = state.tokens_run, state.prompt_tokens
    started = time.perf_counter()
    for _ in range(iterations):
        search.step(state)
    wall = time.perf_counter() - started
    return {"tokens": (state.tokens_run - tokens) / iterations,
            "prompt": (state.prompt_tokens - prompt) / iterations,
            "wall": wall / iterations, "labels": list(state.labels)}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--persona", default="politically-liberal")
    parser.add_argument("--labelled", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--unlabelled", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--naive-max", type=int, default=128,
                        help="largest N at which the naive variant really runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = TransformersScorer("smollm2-135m")
    persona = resolve_persona(args.persona, {})
    print(f"bench/naive_vs_ours.py: {args.persona}, N labelled + {args.unlabelled} unlabelled, "
          f"{args.iterations} iterations from one shared start, seed {args.seed}, "
          f"smollm2-135m {model.dtype} on CPU ({model.torch.get_num_threads()} threads), "
          f"load average {os.getloadavg()[0]:.2f} at start")
    header = (f"{'N':>4} {'naive tok/it':>13} {'ours tok/it':>12} {'ratio':>6} {'naive s/it':>11} "
              f"{'ours s/it':>10} {'ratio':>6} {'labels identical':>17} {'ours tok/s':>10} "
              f"{'plain fwd tok/s':>15} {'fraction':>8}")
    print(header)
    naive_rate = None
    for n in args.labelled:
        dataset = load_datasets([sample(args.persona, n + args.unlabelled, args.seed)])
        config = SearchConfig(seed_labels=n, iterations=args.iterations, seed=args.seed)
        ours_search = ICMSearch(dataset.examples, persona, CachingScorer(model), config)
        start = ours_search.start()
        ours = steps(ours_search, copy.deepcopy(start), args.iterations)
        if n <= args.naive_max:
            naive = steps(ICMSearch(dataset.examples, persona, NaiveScorer(model), config),
                          copy.deepcopy(start), args.iterations)
            assert naive["tokens"] == ours["prompt"], "naive tokens must equal ours' prompt tokens"
            naive_rate = naive["tokens"] / naive["wall"]
            same = "yes" if naive["labels"] == ours["labels"] else "NO"
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
        print(f"{n:>4} {naive['tokens']:>13,.0f} {ours['tokens']:>12,.0f} "
              f"{naive['tokens'] / max(1.0, ours['tokens']):>6.1f} {naive_wall} {ours['wall']:>10.1f} "
              f"{ratio_wall:>6.1f} {same:>17} {ours_rate:>10.0f} {plain:>15.0f} "
              f"{ours_rate / plain:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
