"""Targeted feedback: `feedback suggest` (least certain questions) and `run --clamp` (real model)."""

import csv
import json
import shutil

import pyarrow.parquet as pq
import pytest

from icm_ray.data import load_demo
from tests.runs import cli, demo_rows, real_run

PERSONA = "cautious-investor"


@pytest.fixture(scope="module")
def run(tmp_path_factory):  # 12 statements, 8 seed labels: 4 stay unlabelled and need the model
    return real_run(tmp_path_factory.mktemp("feedback"), demo_rows(per_persona=12), 1)


def test_suggest_lists_least_certain_unclamped_questions(run, tmp_path):
    out = tmp_path / "ask.csv"
    assert cli("feedback", "suggest", run, "--persona", PERSONA, "-n", 5, "--out", out) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 and all(r["label"] == "" for r in rows)
    margins = [float(r["margin"]) for r in rows]
    assert margins == sorted(margins)
    stored = {r["id"]: r for r in pq.read_table(run / "labels.parquet").to_pylist()}
    for row in rows:  # a labelled example's margin is its stored leave-one-out log-odds
        if stored[row["id"]]["log_odds"] is not None:
            assert float(row["margin"]) == pytest.approx(abs(stored[row["id"]]["log_odds"]), abs=1e-3)
    all_rows = tmp_path / "all.jsonl"
    assert cli("feedback", "suggest", run, "-p", PERSONA, "-n", 12, "-o", all_rows) == 0
    assert len(all_rows.read_text().splitlines()) == 12  # labelled and unlabelled alike


def test_clamped_human_labels_are_never_flipped_and_not_asked_again(run, tmp_path):
    ask = tmp_path / "ask.jsonl"
    assert cli("feedback", "suggest", run, "-p", PERSONA, "-n", 4, "-o", ask) == 0
    rows = [json.loads(line) for line in ask.read_text().splitlines()]
    dataset, _ = load_demo()
    answers = {}
    for row in rows[:3]:  # people answer three, leave one blank; one answer contradicts gold
        row["label"] = dataset.gold[row["id"]] if row is not rows[0] else not dataset.gold[row["id"]]
        answers[row["id"]] = row["label"]
    ask.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = run.parent / "data.jsonl"
    out = tmp_path / "clamped"
    assert cli("run", "--no-ray", "--data", data, "--iterations", 4, "--clamp", ask, "--out", out) == 0
    labels = {r["id"]: r for r in pq.read_table(out / "labels.parquet").to_pylist()}
    for example_id, answer in answers.items():
        assert labels[example_id]["clamped"] and labels[example_id]["label"] is answer
    assert sum(r["clamped"] for r in labels.values()) == 3
    summary = json.loads((out / "summary.json").read_text())["personas"][0]
    assert summary["orientation"]["decision"] == "anchored by human labels"
    assert json.loads((out / "inputs.json").read_text())["clamp"] == answers  # --resume keeps them
    again = tmp_path / "again.csv"
    assert cli("feedback", "suggest", out, "-p", PERSONA, "-n", 9, "-o", again) == 0
    assert not {r["id"] for r in csv.DictReader(again.open())} & set(answers)
    assert cli("feedback", "suggest", out, "-p", PERSONA, "-n", 10, "-o", again) == 2  # 9 left


@pytest.mark.parametrize("args, message", [
    (["feedback", "suggest", "MISSING", "-p", PERSONA], "not a finished run"),
    (["feedback", "suggest", "RUN", "-p", "nobody"], "unknown persona 'nobody'"),
    (["feedback", "suggest", "RUN", "-p", PERSONA, "-n", "13"], "-n 13 is larger than the pool"),
    (["feedback", "suggest", "RUN", "-p", PERSONA, "-n", "0"], "-n must be at least 1"),
    (["feedback", "suggest", "RUN", "-p", PERSONA, "-o", "TMP/ask.txt"], "use a .csv or .jsonl"),
    (["run", "--no-ray", "--data", "DATA", "--clamp", "TMP/clamp.csv", "--out", "TMP/out"],
     "field 'id': 'ghost' is not in the data"),
    (["run", "--no-ray", "--data", "DATA", "--clamp", "TMP/none.csv", "--out", "TMP/out"],
     "no such label file"),
    (["run", "--resume", "RUN", "--clamp", "TMP/clamp.csv"], "--resume continues a run"),
    (["feedback", "suggest", "RUN", "-p", PERSONA, "-o", "TMP/adir.csv"], "is a directory"),
    (["feedback", "suggest", "CORRUPT", "-p", PERSONA], "not a readable Parquet file"),
    (["feedback", "suggest", "RUN", "-p", PERSONA, "-o", "TMP/mine.csv"], "already exists"),
    (["run", "--no-ray", "--data", "DATA", "--clamp", "TMP/quote.csv", "--out", "TMP/out"],
     "quote.csv:2: not valid CSV"),
])
def test_bad_input_is_one_line_and_exit_code_2(run, tmp_path, capsys, args, message):
    (tmp_path / "clamp.csv").write_text("id,label\nghost,true\n")
    (tmp_path / "quote.csv").write_text('id,label\na,"true\n')
    (tmp_path / "adir.csv").mkdir()
    (tmp_path / "mine.csv").write_text("the user's own file")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run, corrupt)
    (corrupt / "labels.parquet").write_text("not parquet")
    subs = {"MISSING": str(tmp_path / "nope"), "CORRUPT": str(corrupt), "RUN": str(run),
            "DATA": str(run.parent / "data.jsonl"), "TMP": str(tmp_path)}
    for key, value in subs.items():
        args = [a.replace(key, value) for a in args]
    assert cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("feedback-*"))
    assert (tmp_path / "mine.csv").read_text() == "the user's own file"


def test_a_budget_larger_than_the_pool_fails_before_any_model_is_loaded(run):
    from icm_ray.errors import UserError
    from icm_ray.feedback import suggest

    def no_model(_config):
        raise AssertionError("the model was loaded before -n was checked")

    with pytest.raises(UserError, match="-n 13 is larger than the pool"):
        suggest(str(run), PERSONA, 13, scorer_for=no_model)


def test_serve_refuses_two_runs_with_the_same_persona(run, tmp_path, capsys):
    """(in this file for its finished run) a persona from two runs would be served from one of
    them without a word: refused in one line, before anything starts."""
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    assert cli("serve", "--results", run, "--results", twin, "--port", 1) == 2
    err = capsys.readouterr().err.strip()
    assert f"persona '{PERSONA}' is in both" in err and "\n" not in err
