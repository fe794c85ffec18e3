"""icm-ray eval: ICM vs gold vs random vs zero-shot demonstrations on held-out statements."""

import json

import pyarrow.parquet as pq
import pytest

from icm_ray.data import Dataset, Example, Persona
from icm_ray.evalreport import markdown
from icm_ray.evaluate import plan
from tests.conftest import write_native
from tests.runs import cli, demo_rows, real_run


def test_plan_splits_seeded_and_disjoint():
    examples = [Example(f"e{i}", "p", "claim", claim=f"c{i}") for i in range(10)]
    dataset = Dataset(examples, {e.id: True for e in examples})
    first = plan(dataset, {"p": Persona("p", "d")}, 0.3, [2], 1, seed=5)
    again = plan(dataset, {"p": Persona("p", "d")}, 0.3, [2], 1, seed=5)
    assert [e.id for e in first.tests["p"]] == [e.id for e in again.tests["p"]]
    assert len(first.tests["p"]) == 3 and len(first.pool["p"]) == 7
    assert not {e.id for e in first.tests["p"]} & {e.id for e in first.pool["p"]}
    assert first.pool_dataset().gold == {}  # the searches get no gold


def test_eval_end_to_end_with_feedback_on_the_real_model(tmp_path):
    data = write_native(tmp_path / "data.jsonl", demo_rows(per_persona=10))
    out = tmp_path / "eval"
    assert cli("eval", "--no-ray", "--data", data, "--iterations", 1, "--shots", 2, "--shots", 4,
               "--draws", 1, "--feedback-budget", 1, "--out", out) == 0
    report = json.loads((out / "eval.json").read_text())
    row = report["personas"][0]
    assert row["pool"] == 5 and row["test"] == 5 and 0 <= row["zero_shot"] <= 1
    assert [c["shots"] for c in row["by_shots"]] == [2, 4]
    for cell in row["by_shots"]:
        assert cell["demos"] == cell["shots"]
        for key in ("icm", "gold", "random"):
            assert 0 <= cell[key] <= 1
        assert cell["icm_pct_of_gold"] == pytest.approx(100 * cell["icm"] / cell["gold"])
    assert report["mean"]["by_shots"][0]["icm"] == row["by_shots"][0]["icm"]
    plan_ids = json.loads((out / "eval-plan.json").read_text())
    inputs = json.loads((out / "icm" / "inputs.json").read_text())
    assert {e["id"] for e in inputs["examples"]} == set(plan_ids["pool"]["cautious-investor"])
    assert inputs["gold"] == {} and inputs["clamp"] == {}  # gold never enters the first search
    feedback = row["feedback"]
    for tag in ("targeted", "random"):
        clamp = json.loads((out / f"icm-feedback-{tag}" / "inputs.json").read_text())["clamp"]
        assert list(clamp) == feedback["questions"][tag] and len(clamp) == 1
        assert set(clamp) <= set(plan_ids["pool"]["cautious-investor"])
    assert set(feedback["by_shots"]) == {"2", "4"}
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert "| **mean** | 2 |" in (out / "eval.md").read_text()
    assert "targeted questions" in markdown(report)


def test_eval_of_an_existing_run_uses_only_its_pool_as_demonstrations(tmp_path):
    run = real_run(tmp_path, demo_rows(per_persona=8), 1)
    out = tmp_path / "eval"
    assert cli("eval", "--no-ray", "--run", run, "--shots", 8, "--draws", 1, "--out", out) == 0
    report = json.loads((out / "eval.json").read_text())
    cell = report["personas"][0]["by_shots"][0]
    assert report["options"]["run"] == str(run)
    assert cell["demos"] == 4  # the run labelled all 8, but half are test statements


@pytest.mark.parametrize("args, message", [
    (["--feedback-budget", "6"], "--feedback-budget 6 is larger than the pool"),
    (["--persona", "nobody"], "unknown persona 'nobody'"),
    (["--shots", "0"], "--shots must be positive"),
    (["--test-fraction", "1"], "--test-fraction must be between 0 and 1"),
    (["--data", "NOGOLD"], "examples without gold"),
    (["--run", "TMP/missing"], "not a finished run"),
    (["--run", "TMP/missing", "--iterations", "3"], "give no --data"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, args, message):
    rows = demo_rows(per_persona=10)
    data = write_native(tmp_path / "data.jsonl", rows)
    write_native(tmp_path / "nogold.jsonl", [{k: v for k, v in r.items() if k != "gold"} for r in rows])
    args = [a.replace("NOGOLD", str(tmp_path / "nogold.jsonl")).replace("TMP", str(tmp_path)) for a in args]
    if "--data" not in args and "--run" not in args:
        args += ["--data", str(data)]
    out = tmp_path / "eval"
    assert cli("eval", "--no-ray", "--out", out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_eval_through_ray_with_clamped_feedback_searches(ray_cluster, tmp_path):
    """The product path: persona actors and measurements share one Serve model deployment."""
    data = write_native(tmp_path / "data.jsonl", demo_rows(personas=2, per_persona=8))
    out = tmp_path / "eval"
    assert cli("eval", "--data", data, "--iterations", 2, "--shots", 2, "--draws", 1,
               "--feedback-budget", 2, "--out", out) == 0
    report = json.loads((out / "eval.json").read_text())
    assert len(report["personas"]) == 2 and report["mean"]["feedback"]
    labels = pq.read_table(out / "icm-feedback-targeted" / "labels.parquet").to_pylist()
    clamp = json.loads((out / "icm-feedback-targeted" / "inputs.json").read_text())["clamp"]
    assert len(clamp) == 4 and {r["id"]: r["label"] for r in labels if r["clamped"]} == clamp
    from ray import serve

    assert "icm-model" not in serve.status().applications  # the model app is removed afterwards


def test_summary_of_a_persona_whose_gold_condition_scores_zero():
    """% of gold is undefined at a gold accuracy of 0: left out of the mean, not a crash."""
    from icm_ray.evaluate import summarise

    def cell(gold):
        return {"shots": 4, "demos": 4, "icm": 0.5, "gold": gold, "random": 0.25}

    rows = [{"zero_shot": 0.5, "by_shots": [cell(0.0)]}, {"zero_shot": 0.5, "by_shots": [cell(0.5)]}]
    mean = summarise(rows, [4])["by_shots"][0]
    assert mean["icm_pct_of_gold"] == 100.0 and mean["gold"] == 0.25
    assert rows[0]["by_shots"][0]["icm_pct_of_gold"] is None
