"""Load on the steering API over loopback: requests/s and p50/p99 latency for /examples and
/classify, bounded in count and time.

    .venv/bin/python bench/api_load.py --results RUN [--requests 200] [--concurrency 16]

It starts a private Ray cluster, deploys the API (one model replica, the built-in
SmolLM2-135M on CPU) on 127.0.0.1, fires the requests from a thread pool, and stops everything.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import socket
import statistics
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(base: str, label: str, call, count: int, concurrency: int, budget_s: float) -> None:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + budget_s

    def one(i: int):
        if time.monotonic() > deadline:
            return None
        with httpx.Client(base_url=base, timeout=120) as client:
            start = time.perf_counter()
            response = call(client, i)
            return time.perf_counter() - start, response.status_code

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for result in pool.map(one, range(count)):
            if result is None:
                continue
            latencies.append(result[0])
            errors += result[1] != 200
    wall = time.perf_counter() - start
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"{label:<10} {len(latencies):>5} requests  {len(latencies) / wall:>7.1f} req/s  "
          f"p50 {statistics.median(latencies) * 1000:>7.1f} ms  p99 {p99 * 1000:>7.1f} ms  errors {errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds per endpoint at most")
    args = parser.parse_args()

    from ray import serve

    from icm_ray.engine import ensure_ray
    from icm_ray.steering import load_run
    from icm_ray_serve.app import build_app

    persona = next(iter(load_run(args.results)))
    ensure_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app([args.results]), name="icm-api", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    print(f"bench/api_load.py: {args.results} persona {persona}, {args.requests} requests per endpoint, "
          f"concurrency {args.concurrency}, 1 model replica (smollm2-135m, CPU), loopback HTTP")
    measure(base, "examples", lambda c, i: c.get(f"/v1/personas/{persona}/examples",
                                                 params={"k": 8, "query": f"statement {i}"}),
            args.requests, args.concurrency, args.budget)
    measure(base, "classify", lambda c, i: c.post(f"/v1/personas/{persona}/classify",
                                                  json={"statements": [f"Idea {i} is good."], "k": 8}),
            args.requests, args.concurrency, args.budget)
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
