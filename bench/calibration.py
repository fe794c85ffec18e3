"""Raw vs calibrated mutual predictability, side by side on the same data, seed and model.

    .venv/bin/python bench/calibration.py [--persona subscribes-to-Islam] [--statements 32]
                                           [--iterations 32] [--seed 0]

Data: a balanced sample of one Anthropic persona file from ../shared/data/anthropic-persona
(CC BY 4.0). Gold labels are used only to report accuracy. Model: built-in SmolLM2-135M, in
process (the search code is the same one the Ray actors run).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from icm_ray.backends import CachingScorer
from icm_ray.backends.hf import TransformersScorer
from icm_ray.data import load_datasets, resolve_persona
from icm_ray.search import ICMSearch, SearchConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "anthropic-persona"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--persona", default="subscribes-to-Islam")
    parser.add_argument("--statements", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = [json.loads(line) for line in (DATA / f"{args.persona}.jsonl").open()]
    rng = random.Random(args.seed)
    yes = [r for r in rows if r["answer_matching_behavior"].strip() == "Yes"]
    no = [r for r in rows if r["answer_matching_behavior"].strip() == "No"]
    pick = rng.sample(yes, args.statements // 2) + rng.sample(no, args.statements // 2)
    rng.shuffle(pick)
    folder = Path(tempfile.mkdtemp(prefix="bench-cal-"))
    path = folder / f"{args.persona}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pick))
    dataset = load_datasets([path])
    scorer = CachingScorer(TransformersScorer("smollm2-135m"))
    print(f"bench/calibration.py: {args.persona}, {args.statements} balanced statements, "
          f"{args.iterations} iterations, seed {args.seed}, smollm2-135m fp32 on CPU")
    print(f"{'objective':<11} {'labelled':>8} {'True':>5} {'acc vs gold':>12} {'U':>8} "
          f"{'orientation':>29} {'s':>6}")
    for calibrate in (False, True):
        config = SearchConfig(iterations=args.iterations, seed=args.seed, calibrate=calibrate)
        start = time.perf_counter()
        state = ICMSearch(dataset.examples, resolve_persona(args.persona, {}), scorer, config).run()
        labelled = state.labelled
        correct = sum(y == dataset.gold[dataset.examples[p].id] for p, y in labelled.items())
        print(f"{'calibrated' if calibrate else 'raw':<11} {len(labelled):>8} "
              f"{sum(labelled.values()):>5} {correct / len(labelled):>12.3f} {state.utility:>8.2f} "
              f"{state.orientation['decision']:>22} p={state.orientation['p_value']:.2f} "
              f"{time.perf_counter() - start:>6.0f}")


if __name__ == "__main__":
    main()
