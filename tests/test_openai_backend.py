"""The OpenAI-compatible backend over real HTTP on 127.0.0.1.

Retries, timeouts, errors and concurrency against a tiny loopback server that misbehaves on
purpose; label log-probs and a search against our own Serve `/v1/completions` with the real
built-in model, compared with the in-process transformers backend.
"""

import json
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from icm_ray.backends.base import CachingScorer, Scorer, ScoreRequest
from icm_ray.backends.openai_compat import OpenAICompatScorer
from icm_ray.errors import UserError
from tests.conftest import _free_port

OPTIONS = (" True", " False")
TOP = {" True": -0.4, " False": -1.3, " Maybe": -3.0}


class FakeServer:
    """Real HTTP on 127.0.0.1; answers /v1/completions from a script of misbehaviours."""

    def __init__(self):
        self.fail = []  # per request, in order: a status code, "sleep:<s>" or "close"; then success
        self.bodies, self.headers = [], []
        self.top = dict(TOP)
        self.logprobs = True
        self.in_flight = self.max_in_flight = 0
        self.delay = 0.0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with server.lock:
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                    action = server.fail.pop(0) if server.fail else None
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                self.counted = True
                try:
                    self._answer(body, action)
                finally:
                    self._done()

            def _done(self):
                """No longer in flight: before the response leaves, since the client may send its
                next request as soon as it has read this one (counting after raced under load)."""
                if self.counted:
                    self.counted = False
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, body, action):
                if isinstance(action, str) and action.startswith("sleep:"):
                    time.sleep(float(action[6:]))
                elif action == "close":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                elif action is not None:
                    status, detail = action if isinstance(action, tuple) else (action, "nope")
                    self._send(status, {"error": {"message": detail}}, {"Retry-After": "0"})
                    return
                time.sleep(server.delay)
                self._send(200, server.completion(body))

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self._done()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def completion(self, body):
        prompt = body["prompt"]
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": 1,
                 "prompt_tokens_details": {"cached_tokens": 2}}
        if body.get("echo"):  # prompt logprobs: the whole prompt as one token, then the option
            option = next(o for o in (" Never", " Maybe") if prompt.endswith(o))
            start = len(prompt) - len(option)
            logprobs = {"tokens": [prompt[:start], option, "x"], "token_logprobs": [None, -6.0, -1.0],
                        "top_logprobs": [None, {option: -6.0}, {"x": -1.0}],
                        "text_offset": [0, start, len(prompt)]}
        else:
            logprobs = {"tokens": [" True"], "token_logprobs": [self.top.get(" True", -9)],
                        "top_logprobs": [self.top], "text_offset": [len(prompt)]}
        return {"id": "x", "object": "text_completion", "model": body["model"], "usage": usage,
                "choices": [{"index": 0, "text": " True", "finish_reason": "length",
                             "logprobs": logprobs if self.logprobs else None}]}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.close()


def scorer_for(fake, **kwargs):
    kwargs = {"backoff_s": 0.01, **kwargs}
    return OpenAICompatScorer(fake.url, "tiny", **kwargs)


def request(query="Statement: x\nLabel:", options=OPTIONS):
    return ScoreRequest(("Header.\n\n",), query, options)


def test_label_logprobs_are_renormalised_over_the_options(fake):
    scorer = scorer_for(fake)
    (result,) = scorer.score([request()])
    expected = [TOP[" True"], TOP[" False"]]
    norm = math.log(sum(math.exp(v) for v in expected))
    assert result.logprobs == pytest.approx([v - norm for v in expected])
    sent = fake.bodies[-1]
    assert sent["prompt"] == "Header.\n\nStatement: x\nLabel:" and sent["max_tokens"] == 1
    assert sent["temperature"] == 0 and sent["logprobs"] == 5 and sent["model"] == "tiny"
    assert result.prompt_tokens == 4 and result.tokens_run == 2  # cached_tokens reported by the server


def test_retries_with_backoff_on_5xx_429_and_dropped_connections(fake):
    scorer = scorer_for(fake, max_retries=4)
    fake.fail = [503, 429, "close", 502]
    before = len(fake.bodies)
    (result,) = scorer.score([request()])
    assert len(fake.bodies) - before == 5 and result.logprobs[0] > result.logprobs[1]


def test_gives_up_after_max_retries_in_one_line(fake):
    scorer = scorer_for(fake, max_retries=2)
    fake.fail = [503] * 5
    with pytest.raises(UserError, match=r"server error 503 after 3 tries") as info:
        scorer.score([request()])
    assert "\n" not in str(info.value)


def test_4xx_is_not_retried(fake):
    scorer = scorer_for(fake, max_retries=4)
    fake.fail = [(400, "bad prompt")]
    before = len(fake.bodies)
    with pytest.raises(UserError, match=r"rejected the request \(400: bad prompt\)"):
        scorer.score([request()])
    assert len(fake.bodies) - before == 1


def test_timeout_is_retried(fake):
    scorer = scorer_for(fake, timeout_s=0.5, max_retries=1)
    fake.fail = ["sleep:1.5"]
    (result,) = scorer.score([request()])
    assert result.prompt_tokens == 4


def test_unreachable_server_wrong_model_and_no_logprobs_are_one_line_errors(fake):
    with pytest.raises(UserError, match=r"cannot reach OpenAI-compatible server .* after 2 tries"):
        OpenAICompatScorer(f"http://127.0.0.1:{_free_port()}/v1", "tiny", max_retries=1, backoff_s=0.01)
    fake.fail = [(404, "The model `nope` does not exist.")]
    with pytest.raises(UserError, match="model 'nope' not found on the server"):
        OpenAICompatScorer(fake.url, "nope")
    fake.logprobs = False
    with pytest.raises(UserError, match="returned no logprobs for model 'tiny'"):
        scorer_for(fake)
    with pytest.raises(UserError, match="not an http"):
        OpenAICompatScorer("127.0.0.1:8000", "tiny")


def test_api_key_comes_from_the_named_variable_and_is_not_recorded(fake, monkeypatch):
    monkeypatch.setenv("MY_SERVER_KEY", "s3cret")
    scorer = scorer_for(fake, api_key_env="MY_SERVER_KEY")
    assert fake.headers[-1]["Authorization"] == "Bearer s3cret"
    assert "s3cret" not in json.dumps(scorer.identity())
    monkeypatch.delenv("MY_SERVER_KEY")
    with pytest.raises(UserError, match="environment variable MY_SERVER_KEY is not set"):
        scorer_for(fake, api_key_env="MY_SERVER_KEY")
    fake.fail = [(401, "invalid key")]
    with pytest.raises(UserError, match="refused the API key"):
        scorer_for(fake)


def test_concurrency_is_capped(fake):
    scorer = scorer_for(fake, concurrency=3)
    fake.delay = 0.1
    results = scorer.score([request(f"Statement: {i}\nLabel:") for i in range(12)])
    assert len(results) == 12 and fake.max_in_flight == 3


def test_option_outside_the_top_k_is_read_by_echo(fake):
    scorer = scorer_for(fake)
    (result,) = scorer.score([request(options=(" True", " Never"))])
    assert fake.bodies[-1]["echo"] is True and fake.bodies[-1]["prompt"].endswith("Label: Never")
    norm = math.log(math.exp(TOP[" True"]) + math.exp(-6.0))
    assert result.logprobs == pytest.approx([TOP[" True"] - norm, -6.0 - norm])
    # a multi-token option is matched by its first token
    (multi,) = scorer.score([request(options=(" Trueish", " False"))])
    assert multi.logprobs == pytest.approx(scorer.score([request()])[0].logprobs)


def test_cli_run_against_an_unreachable_server_exits_2_in_one_line(tmp_path, monkeypatch, capsys):
    from icm_ray.cli import main
    from tests.conftest import write_native

    data = write_native(tmp_path / "d.jsonl", [{"id": "a", "persona": "p", "claim": "c"}])
    config = tmp_path / "c.yaml"
    for body, message in [
        (f"model:\n  backend: openai\n  base_url: http://127.0.0.1:{_free_port()}/v1\n  max_retries: 0\n",
         "cannot reach OpenAI-compatible server"),
        ("model:\n  backend: openai\n", "needs model.base_url"),
        ("model:\n  backend: nope\n", "unknown backend 'nope'"),
    ]:
        config.write_text(body)
        out = tmp_path / "run"
        monkeypatch.setattr(sys, "argv", ["icm-ray", "run", "--no-ray", "--data", str(data),
                                          "--config", str(config), "--out", str(out)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 0, err
        assert not out.exists()


# ------------------------------------------------------------ our own Serve /v1/completions


@pytest.fixture(scope="module")
def own_server(ray_cluster):
    """Our steering API (its /v1/completions) with the real built-in model in fp32."""
    import httpx
    from ray import serve
    from ray.serve.context import _get_global_client

    from icm_ray_serve.app import build_app

    serve.run(build_app([], model={"dtype": "float32"}, ray={"replica_cpus": 0.5}, api_key=""),
              name="icm-openai-target", route_prefix="/oa")
    base = f"http://127.0.0.1:{_get_global_client().http_config.port}/oa"
    for _ in range(120):
        try:
            if httpx.get(base + "/healthz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    yield base + "/v1"
    serve.delete("icm-openai-target")


@pytest.fixture(scope="module")
def local():
    from icm_ray.backends.hf import TransformersScorer

    return TransformersScorer("smollm2-135m", dtype="float32")


@pytest.fixture(scope="module")
def demo():
    from icm_ray.data import load_demo

    dataset, personas = load_demo()
    name = dataset.personas()[0]
    return [e for e in dataset.examples if e.persona == name][:8], personas[name]


class WholePrompt(Scorer):
    """The in-process scorer fed each prompt as one text, as a text-only server tokenises it
    (the contract tokenises segments one by one, which differs at segment boundaries)."""

    def __init__(self, inner):
        self.inner = inner

    def score(self, requests):
        return self.inner.score([ScoreRequest((), "".join(r.segments) + r.query, r.options)
                                 for r in requests])


def test_own_serve_completions_agree_with_in_process_transformers(own_server, local, demo):
    from icm_ray.predictability import leave_one_out_requests, zero_shot_requests
    from icm_ray.prompts import PromptConfig, header_text

    examples, persona = demo
    prompts = PromptConfig()
    header = header_text(prompts, persona)
    labels = {p: p % 3 != 0 for p in range(len(examples))}
    requests = list(leave_one_out_requests(header, examples, labels, list(labels), prompts).values())
    requests += list(zero_shot_requests(header, examples, prompts))[:4]
    remote = OpenAICompatScorer(own_server, "smollm2-135m", top_logprobs=20, concurrency=2)
    started = time.perf_counter()
    theirs = remote.score(requests)
    seconds = time.perf_counter() - started
    ours = WholePrompt(local).score(requests)
    segmentwise = local.score(requests)

    def gap(a, b):
        return max(abs(x - y) for r, s in zip(a, b) for x, y in zip(r.logprobs, s.logprobs))

    print(f"\nopenai backend vs transformers: max |diff| {gap(theirs, ours):.2e} (whole prompt), "
          f"{gap(theirs, segmentwise):.2e} (segment-wise tokens) over {len(requests)} requests, "
          f"{sum(r.prompt_tokens for r in theirs) / seconds:.0f} prompt tokens/s")
    assert gap(theirs, ours) < 1e-4
    assert [r.prompt_tokens for r in theirs] == [r.prompt_tokens for r in ours]
    assert all(r.tokens_run == r.prompt_tokens for r in theirs)  # no cache visible to the client


def test_search_runs_through_own_serve_completions(own_server, local, demo):
    from icm_ray.backends import load_scorer
    from icm_ray.config import ModelConfig
    from icm_ray.search import ICMSearch, SearchConfig

    examples, persona = demo
    model = ModelConfig(backend="openai", base_url=own_server, name="smollm2-135m", top_logprobs=20)
    remote = load_scorer(model.model_dump())
    assert remote.identity() == {"backend": "openai", "base_url": own_server, "model": "smollm2-135m"}
    config = SearchConfig(iterations=2, seed_labels=4, seed=0, permutations=50)
    state = ICMSearch(examples, persona, CachingScorer(remote), config).run()
    assert state.finished and len(state.trace) == 2 and 4 <= len(state.labelled) <= 6
    assert 0 < state.tokens_run <= state.prompt_tokens  # repeats come from the CachingScorer
    same = ICMSearch(examples, persona, CachingScorer(WholePrompt(local)), config).run()
    assert state.labels == same.labels
