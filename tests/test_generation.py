"""The open-ended generation kind: a prompt with candidate responses, labelled endorsed or not,
end to end through run, export, eval and the completions endpoint (real model)."""

import json

import pytest

from icm_ray.data import load_datasets
from icm_ray.prompts import PromptConfig, query_text
from icm_ray.steering import generation_block, load_run
from tests.conftest import write_native
from tests.runs import cli, real_run

CANDIDATES = {
    "How do you get to work?": [("I cycle or take the train.", True), ("I drive my big SUV alone.", False),
                                ("I walk when I can.", True)],
    "What do you do with old clothes?": [("I repair or donate them.", True),
                                         ("I throw them in the bin.", False),
                                         ("I burn them in the garden.", False)],
}


def response_rows() -> list[dict]:
    return [{"id": f"r{g}-{n}", "persona": "environmentalist", "prompt": prompt, "response": text,
             "group": f"q{g}", "gold": endorsed}
            for g, (prompt, answers) in enumerate(CANDIDATES.items())
            for n, (text, endorsed) in enumerate(answers)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return real_run(tmp_path_factory.mktemp("generation"), response_rows(), 1)


def test_loader_and_prompt(tmp_path):
    dataset = load_datasets([write_native(tmp_path / "r.jsonl", response_rows())])
    example = dataset.examples[0]
    assert example.kind == "response" and example.response == "I cycle or take the train."
    assert query_text(PromptConfig(), example) == ("Prompt: How do you get to work?\n"
                                                   "Response: I cycle or take the train.\nLabel:")
    assert dataset.gold[example.id] is True


def test_run_steering_and_generation_block(run):
    entry = load_run(str(run))["environmentalist"]
    assert entry.generates and all(e.kind == "response" and e.generation for e in entry.examples)
    block = generation_block(entry, 8, "How do you get to work?")
    assert block.startswith("The following are answers that a person who")
    endorsed = [e for e in entry.examples if e.label]
    assert block.count("Response: ") == len(endorsed)  # only responses the persona would endorse


def test_export_sft_endorsed_and_dpo_pairs_per_prompt(run, tmp_path):
    labels = {e.id: e.label for e in load_run(str(run))["environmentalist"].examples}
    sft, dpo = tmp_path / "sft.jsonl", tmp_path / "dpo.jsonl"
    assert cli("export", run, "-f", "sft", "-o", sft) == 0
    rows = [json.loads(line) for line in sft.read_text().splitlines()]
    assert {r["id"] for r in rows} == {i for i, y in labels.items() if y}
    assert all(r["prompt"].endswith("Response:") and r["completion"].startswith(" ") for r in rows)
    mixed = [g for g in ("r0", "r1") if len({y for i, y in labels.items() if i.startswith(g)}) == 2]
    if not mixed:  # no prompt with both an endorsed and a rejected response: nothing to pair
        assert cli("export", run, "-f", "dpo", "-o", dpo) == 2
    else:
        assert cli("export", run, "-f", "dpo", "-o", dpo) == 0
        for pair in (json.loads(line) for line in dpo.read_text().splitlines()):
            good, bad = pair["id"].split(">")
            assert labels[good] and not labels[bad] and good[:2] == bad[:2]  # same prompt


def test_eval_runs_on_responses(tmp_path):
    data = write_native(tmp_path / "r.jsonl", response_rows())
    out = tmp_path / "eval"
    assert cli("eval", "--no-ray", "--data", data, "--iterations", 1, "--shots", 2, "--draws", 1,
               "--out", out) == 0
    cell = json.loads((out / "eval.json").read_text())["personas"][0]["by_shots"][0]
    assert cell["demos"] == 2 and 0 <= cell["icm"] <= 1


@pytest.mark.slow
def test_completions_endpoint_steers_generation_with_endorsed_responses(ray_cluster, run, tmp_path):
    import time

    import httpx
    from ray import serve
    from ray.serve.context import _get_global_client

    from icm_ray_serve.app import build_app

    serve.run(build_app([str(run)], ray={"replica_cpus": 0.5}, searches_dir=str(tmp_path), api_key=""),
              name="icm-gen-api", route_prefix="/gen")
    client = httpx.Client(base_url=f"http://127.0.0.1:{_get_global_client().http_config.port}/gen",
                          timeout=120)
    try:
        for _ in range(60):
            if client.get("/healthz").status_code == 200:
                break
            time.sleep(0.5)
        ask = {"prompt": "Prompt: How do you heat your home?\nResponse:", "max_tokens": 8}
        plain = client.post("/v1/completions", json=ask).json()
        steered = client.post("/v1/completions", json={**ask, "persona": "environmentalist"}).json()
        assert steered["choices"][0]["text"]
        assert steered["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 20
        examples = client.get("/v1/personas/environmentalist/examples?k=4").json()
        assert examples["generation_prompt"].startswith("The following are answers")
    finally:
        client.close()
        serve.delete("icm-gen-api")


def test_dpo_pairs_every_endorsed_with_every_rejected_response_of_a_prompt():
    from icm_ray.export import dpo_records

    def row(i, prompt, label):
        return {"id": i, "persona": "p", "kind": "response", "label": label, "dpo_prompt": prompt,
                "chosen": f" {i}", "rejected": None}

    rows = [row("a", "P1", True), row("b", "P1", False), row("c", "P1", False), row("d", "P2", True)]
    pairs = dpo_records(rows)
    assert [(p["chosen"], p["rejected"], p["prompt"]) for p in pairs] == [(" a", " b", "P1"),
                                                                          (" a", " c", "P1")]
