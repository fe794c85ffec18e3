"""How the run scales with personas: 1, 2, 4, 8 personas in parallel through ONE model replica,
against the same personas run one after another. Prints wall-time ratios and peak memory.

    .venv/bin/python bench/personas_scaling.py [--examples 12] [--iterations 4] [--data DIR]

Data: the Anthropic persona files in ../shared/data/anthropic-persona (CC BY 4.0), the first
`--examples` statements of each of 8 personas (gold is not used). Model: the built-in
SmolLM2-135M on CPU. Everything runs in one local Ray cluster with one Serve replica.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil

from icm_ray.config import RunConfig
from icm_ray.data import load_datasets, resolve_persona
from icm_ray.engine import deploy_model, ensure_ray, plan_jobs, run_on_ray
from icm_ray.store import RunStore

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "anthropic-persona"


class PeakMemory:
    """Samples the summed RSS of this process tree and all Ray worker processes."""

    def __init__(self):
        self.peak = 0
        self.replicas = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            total = 0
            for proc in psutil.process_iter(["name", "cmdline", "memory_info"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if proc.info["memory_info"] and ("ray::" in cmd or "raylet" in cmd
                                                 or "gcs_server" in cmd or proc.pid == psutil.Process().pid):
                    total += proc.info["memory_info"].rss
            self.peak = max(self.peak, total)
            self.replicas = max(self.replicas, model_replicas())
            time.sleep(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def model_replicas() -> int:
    import ray

    return sum("ModelReplica" in a["name"] for a in ray.util.list_named_actors(all_namespaces=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--examples", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--counts", default="1,2,4,8")
    args = parser.parse_args()

    files = sorted(args.data.glob("*.jsonl"))[:8]
    dataset = load_datasets(files)
    keep = {}
    for e in dataset.examples:
        keep.setdefault(e.persona, [])
        if len(keep[e.persona]) < args.examples:
            keep[e.persona].append(e)
    dataset.examples = [e for part in keep.values() for e in part]
    all_jobs = plan_jobs(dataset, {n: resolve_persona(n, {}) for n in dataset.personas()})
    config = RunConfig.model_validate({"search": {"iterations": args.iterations, "permutations": 200},
                                       "ray": {"max_batch_size": 8}})
    ensure_ray()
    handle = deploy_model(config)  # one replica for every run below; not part of any timing
    workdir = Path(tempfile.mkdtemp(prefix="bench-scaling-"))

    def timed(jobs, tag):
        with PeakMemory() as memory:
            start = time.perf_counter()
            run_on_ray(jobs, config, RunStore(workdir / tag), handle=handle)
            elapsed = time.perf_counter() - start
        return elapsed, memory.peak, memory.replicas

    run_on_ray(all_jobs[:1], config, RunStore(workdir / "warmup"), handle=handle)  # warm-up
    single = {}
    for job in all_jobs:  # one after another: each persona alone
        single[job.persona.name], _, _ = timed([job], f"alone-{job.persona.name}")
    counts = [int(c) for c in args.counts.split(",")]
    print(f"\nbench/personas_scaling.py: {args.examples} statements/persona, {args.iterations} "
          f"iterations, model smollm2-135m (CPU), 1 Serve replica, {psutil.cpu_count()} CPUs")
    print("(one replica deployed once before timing; each run includes starting its actors)")
    print(f"{'personas':>8} {'parallel s':>11} {'ratio to 1':>11} {'one-by-one s':>13} "
          f"{'ratio to 1':>11} {'parallel/one-by-one':>20} {'peak RSS GB':>12} {'replicas':>9}")
    base = None
    for count in counts:
        elapsed, peak, replicas = timed(all_jobs[:count], f"parallel-{count}")
        base = base or elapsed
        sequential = sum(single[j.persona.name] for j in all_jobs[:count])
        print(f"{count:>8} {elapsed:>11.1f} {elapsed / base:>11.2f} {sequential:>13.1f} "
              f"{sequential / base:>11.2f} {elapsed / sequential:>20.2f} {peak / 1e9:>12.2f} {replicas:>9}")


if __name__ == "__main__":
    main()
