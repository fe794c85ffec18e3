"""The steering API over real HTTP on 127.0.0.1: Serve app with the real built-in model."""

import concurrent.futures
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icm_ray.config import RunConfig
from icm_ray.data import load_datasets, resolve_persona
from icm_ray.engine import plan_jobs, run_in_process, save_inputs
from icm_ray.results import write_run
from icm_ray.store import RunStore
from tests.conftest import demo_subset

SMALL = {"replica_cpus": 0.5}  # two apps' replicas fit on the 2-CPU test cluster


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real (short) run on the built-in model, done in process."""
    from icm_ray.backends.hf import TransformersScorer

    tmp = tmp_path_factory.mktemp("api")
    dataset = load_datasets([demo_subset(tmp, personas=2, per_persona=8)])
    personas = {n: resolve_persona(n, {}) for n in dataset.personas()}
    config = RunConfig.model_validate({"search": {"iterations": 2, "seed_labels": 6, "permutations": 50}})
    store = RunStore(tmp / "run")
    save_inputs(store, config, dataset, personas)
    scorer = TransformersScorer("smollm2-135m")
    finished = run_in_process(plan_jobs(dataset, personas), config, scorer, store)
    write_run(store, finished, dataset.gold, config.model_dump(mode="json"), scorer.identity(),
              config.prompts)
    return store.uri, dataset.personas()


def _proxy_port() -> int:
    from ray.serve.context import _get_global_client

    return _get_global_client().http_config.port


@pytest.fixture(scope="module")
def api(ray_cluster, finished_run, tmp_path_factory):
    from ray import serve

    from icm_ray_serve.app import build_app

    uri, personas = finished_run
    searches = tmp_path_factory.mktemp("searches")
    app = build_app([uri], ray=SMALL, searches_dir=str(searches), api_key="")
    serve.run(app, name="icm-api", route_prefix="/")
    base = f"http://127.0.0.1:{_proxy_port()}"
    client = httpx.Client(base_url=base, timeout=120)
    client.searches_dir = searches  # where the API's searches write their runs
    for _ in range(60):
        if client.get("/healthz").status_code == 200:
            break
        time.sleep(0.5)
    yield client, personas
    client.close()
    serve.delete("icm-api")


def test_personas_and_examples(api):
    client, personas = api
    assert client.get("/healthz").json()["status"] == "ok"
    listed = client.get("/v1/personas").json()["personas"]
    assert [p["persona"] for p in listed] == personas
    assert all(p["labelled"] > 0 and p["run"] for p in listed)
    body = client.get(f"/v1/personas/{personas[0]}/examples", params={"k": 4, "balance": True}).json()
    assert len(body["examples"]) == 4 and sum(e["label"] for e in body["examples"]) == 2
    assert body["prompt"].count("Label:") == 4
    confidences = [e["confidence"] for e in client.get(
        f"/v1/personas/{personas[0]}/examples", params={"k": 3}).json()["examples"]]
    assert confidences == sorted(confidences, reverse=True)
    ranked = client.get(f"/v1/personas/{personas[0]}/examples",
                        params={"k": 1, "query": body["examples"][-1]["text"]}).json()
    assert ranked["examples"][0]["text"] == body["examples"][-1]["text"]


@pytest.mark.parametrize("method, path, payload, status, field", [
    ("get", "/v1/personas/nobody/examples", None, 404, None),
    ("get", "/v1/personas/{p}/examples?k=0", None, 422, "k"),
    ("get", "/v1/personas/{p}/examples?k=100000", None, 422, "k"),
    ("get", "/v1/personas/{p}/examples?k=abc", None, 422, "k"),
    ("post", "/v1/personas/nobody/classify", {"statements": ["x"]}, 404, None),
    ("post", "/v1/personas/{p}/classify", {"statements": []}, 422, "statements"),
    ("post", "/v1/personas/{p}/classify", {"statements": ["x"] * 65}, 422, "statements"),
    ("post", "/v1/personas/{p}/classify", {"statements": [1, 2]}, 422, "statements"),
    ("post", "/v1/personas/{p}/classify", {"statements": ["  "]}, 422, "statements"),
    ("post", "/v1/personas/{p}/classify", {"statements": ["x"], "extra": 1}, 422, "extra"),
    ("post", "/v1/personas/{p}/classify", "not json", 422, None),
    ("post", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
    ("post", "/v1/completions", {"prompt": "hi", "stream": True}, 422, "stream"),
    ("post", "/v1/completions", {"prompt": "hi", "persona": "nobody"}, 404, None),
    ("post", "/v1/completions", {"max_tokens": 3}, 422, "prompt"),
    ("post", "/v1/completions", '{"prompt": "hi", "temperature": NaN}', 422, "temperature"),
    ("post", "/v1/completions", '{"prompt": "hi", "max_tokens": 1e400}', 422, "max_tokens"),
    ("post", "/v1/completions", {"prompt": "hi", "seed": 10**23}, 422, "seed"),
    ("post", "/v1/completions", {"prompt": "hi", "stop": ["a"] * 5}, 422, "stop"),
    ("post", "/v1/completions", {"prompt": "hi", "stop": "x" * 201}, 422, "stop"),
    ("post", "/v1/personas/{p}/classify", '{"statements": ["x"], "k": 1e400}', 422, "k"),
    ("post", "/v1/searches", {"persona": "p", "seed": -1, "examples": [{"id": "a", "claim": "x"}]}, 422,
     "seed"),
    ("post", "/v1/searches", {"persona": "p"}, 422, None),
    ("post", "/v1/searches", {"persona": "p", "examples": [{"id": "a", "claim": "x"}] * 2}, 422, None),
    ("post", "/v1/searches", {"persona": "p", "data_path": "/no/such.jsonl"}, 422, "data_path"),
    ("post", "/v1/searches", {"persona": "p", "examples": [{"id": "a", "prompt": "q", "response_a": "x"}]},
     422, "response_b"),
    ("post", "/v1/searches", {"persona": "p", "examples": [{"id": "a", "claim": "x", "gold": True}]},
     422, "gold"),
    ("post", "/v1/searches", {"persona": "p", "examples": [{"id": "a", "claim": "x", "group": [1]}]},
     422, "group"),
    ("post", "/v1/personas/{p}/classify", {"statements": ["x"], "examples": [{"claim": "y"}]}, 422,
     "exactly one"),
    ("post", "/v1/personas/{p}/classify", {"k": 2}, 422, "exactly one"),
    ("post", "/v1/personas/{p}/classify", {"examples": [{"question": "q"}]}, 422, "claim"),
    ("post", "/v1/personas/{p}/classify", {"examples": [{"prompt": "q", "response_b": "x"}]}, 422,
     "response_a"),
    ("get", "/v1/searches/none", None, 404, None),
    ("post", "/v1/personas/{p}/classify", {"statements": ["x"], "k": True}, 422, "k"),
    ("post", "/v1/personas/{p}/classify", {"statements": ["x"], "k": "8"}, 422, "k"),
    ("post", "/v1/completions", {"prompt": "hi", "max_tokens": "3"}, 422, "max_tokens"),
    ("post", "/v1/searches", {"persona": "{p}", "examples": [{"id": "a", "claim": "x"}]}, 409,
     "already served"),
    ("post", "/v1/searches", {"persona": "../../x", "examples": [{"id": "a", "claim": "x"}]}, 422,
     "persona"),
])
def test_error_paths_are_4xx_with_a_json_body(api, method, path, payload, status, field):
    client, personas = api
    path = path.replace("{p}", personas[0])
    if isinstance(payload, dict) and payload.get("persona") == "{p}":
        payload = {**payload, "persona": personas[0]}
    if isinstance(payload, str):
        response = client.post(path, content=payload, headers={"content-type": "application/json"})
    else:
        response = getattr(client, method)(path, **({"json": payload} if payload is not None else {}))
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    if field:
        assert field in json.dumps(detail)


def test_body_too_large(api):
    client, personas = api
    big = {"statements": ["x" * 1000] * 1100}
    assert client.post(f"/v1/personas/{personas[0]}/classify", json=big).status_code == 413
    body = json.dumps(big).encode()
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))  # no Content-Length: chunked
    response = client.post("/v1/completions", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "larger than" in response.json()["detail"]
    small = json.dumps({"statements": ["I like trees."], "k": 1}).encode()
    response = client.post(f"/v1/personas/{personas[0]}/classify", content=iter([small[:10], small[10:]]),
                           headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text  # a chunked body within the limit still arrives


def test_a_prompt_longer_than_the_context_is_a_422_and_spares_its_batch(api):
    """The model replica batches calls from every client: one over-long input fails alone."""
    client, personas = api
    base = str(client.base_url)
    too_long = {"statements": ["\U0001F600" * 3990], "k": 1}  # ~3 tokens a character: > 8192
    fine = {"statements": ["I like trees."], "k": 1}

    def call(body):
        with httpx.Client(base_url=base, timeout=300) as c:
            return c.post(f"/v1/personas/{personas[0]}/classify", json=body)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(call, [too_long, fine] * 4))
    for body, response in zip([too_long, fine] * 4, responses):
        if body is too_long:
            assert response.status_code == 422 and "context" in response.json()["detail"]
        else:
            assert response.status_code == 200, response.text


def test_classify_with_steering_examples(api):
    client, personas = api
    body = client.post(f"/v1/personas/{personas[0]}/classify",
                       json={"statements": ["I love being outdoors.", "I hate everything."], "k": 4}).json()
    assert body["demonstrations"] == 4 and len(body["results"]) == 2
    for row in body["results"]:
        assert 0 <= row["probability"] <= 1 and row["label"] == (row["probability"] >= 0.5)


def test_classify_comparisons_and_responses_in_the_data_fields(api):
    client, personas = api
    items = [{"prompt": "Which is kinder?", "response_a": "Help them.", "response_b": "Ignore them."},
             {"prompt": "Say something nice.", "response": "You did well today."},
             {"claim": "I love being outdoors.", "question": "Do you like nature?"}]
    body = client.post(f"/v1/personas/{personas[0]}/classify", json={"examples": items, "k": 2})
    assert body.status_code == 200, body.text
    rows = body.json()["results"]
    assert [r["example"] for r in rows] == items
    assert all(0 <= r["probability"] <= 1 and r["label"] == (r["probability"] >= 0.5) for r in rows)


def test_openai_client_calls_completions(api):
    import openai

    client, personas = api
    oa = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="unused", max_retries=0)
    plain = oa.completions.create(model="smollm2-135m", prompt="The capital of France is",
                                  max_tokens=4, temperature=0, logprobs=2)
    assert plain.choices[0].text and plain.usage.completion_tokens == 4
    assert len(plain.choices[0].logprobs.tokens) >= 1
    steered = oa.completions.create(model=f"persona:{personas[0]}", prompt="Statement: I recycle.\nLabel:",
                                    max_tokens=2, temperature=0)
    assert steered.usage.prompt_tokens > plain.usage.prompt_tokens  # steering examples prepended
    stopped = oa.completions.create(model="smollm2-135m", prompt="Count: 1, 2, 3,", max_tokens=8,
                                    temperature=0, stop=" 4, 5")  # a stop string longer than 4 characters
    assert " 4, 5" not in stopped.choices[0].text


def test_fifty_concurrent_requests(api):
    client, personas = api
    base = str(client.base_url)

    def call(i):
        with httpx.Client(base_url=base, timeout=300) as c:
            if i % 2:
                return c.get(f"/v1/personas/{personas[i % 2]}/examples", params={"k": 3}).status_code
            return c.post(f"/v1/personas/{personas[0]}/classify",
                          json={"statements": [f"statement {i}"], "k": 2}).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        codes = list(pool.map(call, range(50)))
    assert codes == [200] * 50


def started_search(client, request: dict) -> str:
    """Start a search, waiting while earlier searches hold both slots (429); its id."""
    for _ in range(120):
        started = client.post("/v1/searches", json=request)
        if started.status_code != 429:
            break
        time.sleep(1)
    assert started.status_code == 202, started.text
    return started.json()["id"]


def stopped_search(client, search_id: str) -> dict:
    """The search's state once it stops running (up to 4 minutes)."""
    for _ in range(240):
        state = client.get(f"/v1/searches/{search_id}").json()
        if state["status"] != "running":
            break
        time.sleep(1)
    return state


def finished_search(client, search_id: str) -> dict:
    state = stopped_search(client, search_id)
    assert state["status"] == "finished", state
    return state


def test_search_endpoint_runs_icm_and_publishes_the_persona(api):
    client, _ = api
    examples = [{"id": f"s{i}", "claim": text} for i, text in enumerate(
        ["I recycle everything", "Plastic bags are fine", "I bike to work", "Cars are the best",
         "I compost", "Climate change is a hoax"])]
    started = client.post("/v1/searches", json={"persona": "green", "description": "cares about nature",
                                                "examples": examples, "iterations": 2})
    assert started.status_code == 202
    search_id = started.json()["id"]
    twin = client.post("/v1/searches", json={"persona": "green", "examples": examples[:3]})
    assert twin.status_code == 409  # its result would silently replace the first one's
    second = client.post("/v1/searches", json={"persona": "green2", "examples": examples[:3],
                                               "iterations": 1})
    assert second.status_code == 202
    third = client.post("/v1/searches", json={"persona": "green3", "examples": examples[:3],
                                              "iterations": 1})
    assert third.status_code == 429 and "already running" in third.json()["detail"]
    state = finished_search(client, search_id)
    assert state["summary"]["labelled"] >= 4
    assert "green" in [p["persona"] for p in client.get("/v1/personas").json()["personas"]]


def test_search_endpoint_takes_comparisons_with_their_consistency_groups(api):
    client, _ = api
    pairs = [("Should I tip?", "Yes, always.", "Never."), ("Is lying fine?", "No.", "Sure, often.")]
    examples = []
    for g, (prompt, a, b) in enumerate(pairs):  # each pair and its mirror: asymmetry in one group
        examples += [{"id": f"c{g}ab", "prompt": prompt, "response_a": a, "response_b": b, "group": g},
                     {"id": f"c{g}ba", "prompt": prompt, "response_a": b, "response_b": a, "group": g}]
    request = {"persona": "polite", "description": "values good manners", "examples": examples,
               "iterations": 2, "seed": 1}
    state = finished_search(client, started_search(client, request))
    assert state["summary"]["inconsistencies"] == 0
    shown = client.get("/v1/personas/polite/examples", params={"k": 4}).json()["examples"]
    by_id = {e["id"]: e["label"] for e in shown}
    for g in range(len(pairs)):
        if f"c{g}ab" in by_id and f"c{g}ba" in by_id:
            assert by_id[f"c{g}ab"] != by_id[f"c{g}ba"]


def test_a_search_over_the_context_fails_and_leaves_no_run_behind(api):
    client, _ = api
    examples = [{"id": f"e{i}", "claim": "\U0001F600" * 3990} for i in range(4)]
    search_id = started_search(client, {"persona": "emoji", "examples": examples, "iterations": 1})
    state = stopped_search(client, search_id)
    assert state["status"] == "failed" and "context" in state["error"], state
    assert not (client.searches_dir / search_id).exists()


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                         lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.sampled_from(["statements", "k", "prompt", "persona",
                                                            "max_tokens", "logprobs", "examples", "x"]),
                                           inner, max_size=4), max_leaves=8),
       path=st.sampled_from(["/v1/personas/{p}/classify", "/v1/completions", "/v1/searches"]))
def test_fuzzed_bodies_never_give_5xx(api, body, path):
    client, personas = api
    if path == "/v1/searches" and isinstance(body, dict):
        body = {k: v for k, v in body.items() if k != "examples"}  # no real searches here
    response = client.post(path.replace("{p}", personas[0]), json=body)
    assert response.status_code < 500, (path, body, response.text)


def test_api_key_required_when_set(ray_cluster, finished_run):
    from ray import serve

    from icm_ray_serve.app import build_app

    uri, personas = finished_run
    serve.run(build_app([uri], ray=SMALL, api_key="s3cret"), name="icm-api-key", route_prefix="/keyed")
    base = f"http://127.0.0.1:{_proxy_port()}/keyed"
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/v1/personas").status_code == 401
            assert client.get("/v1/personas", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.get("/v1/personas", headers={"Authorization": "s3cret"}).status_code == 401
            ok = client.get("/v1/personas", headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200 and ok.json()["personas"]
            lower = client.get("/v1/personas", headers={"Authorization": "bearer s3cret"})
            assert lower.status_code == 200  # the scheme is case-insensitive (RFC 7235)
    finally:
        serve.delete("icm-api-key")


def test_declarative_config_builds_the_same_app(finished_run):
    from pathlib import Path

    import yaml
    from ray.serve.handle import DeploymentHandle  # noqa: F401  (Serve's API is importable)

    from icm_ray_serve.app import build

    config = yaml.safe_load((Path(__file__).parents[1] / "serve" / "config.yaml").read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "icm_ray_serve.app:build"
    assert config["http_options"]["host"] == "127.0.0.1"
    uri, _ = finished_run
    app = build({**application["args"], "results": [uri]})
    assert type(app).__name__ == "Application"
