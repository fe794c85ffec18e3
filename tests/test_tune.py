"""icm-ray tune: the search space, the objectives, bad input, and a real small Tune run on
local Ray with the built-in model on Serve (ASHA stops a trial; best_config.yaml runs)."""

import json
import math
import sys

import pytest
import yaml

from icm_ray.cli import main
from icm_ray.data import Persona, load_datasets
from icm_ray.errors import UserError
from icm_ray.search import ICMSearch, SearchConfig
from icm_ray_tune.inputs import load_gold
from icm_ray_tune.objectives import PersonaTask, measure, split_heldout
from icm_ray_tune.space import DEFAULT_SPACE, load_space, to_tune
from tests.conftest import demo_subset, typed_rows, write_native
from tests.fakes import TypeMajorityScorer, type_of


def cli(monkeypatch, *args) -> int:
    monkeypatch.setattr(sys, "argv", ["icm-ray", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


# ---------------------------------------------------------------- space


def test_default_space_is_valid_and_converts():
    space = load_space(None, SearchConfig())
    assert space == DEFAULT_SPACE
    tune_space = to_tune(space)
    assert set(tune_space) == set(DEFAULT_SPACE)


def test_space_file_with_every_distribution(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("search:\n  alpha: {loguniform: [1, 50]}\n  seed_labels: {randint: [2, 6]}\n"
                    "  temperature_schedule: {choice: [log, linear]}\n  final_alpha: {grid: [5, 50]}\n"
                    "  cooling_rate: {uniform: [0.1, 0.9]}\n  inconsistency_weight: 2.0\n")
    space = load_space(path, SearchConfig())
    assert space["inconsistency_weight"] == 2.0
    domain = to_tune(space)["seed_labels"]
    assert {domain.sample() for _ in range(200)} == {2, 3, 4, 5, 6}  # both ends included


@pytest.mark.parametrize("text, message", [
    ("alpha: {loguniform: [0, 50]}", "field 'alpha': loguniform needs low > 0"),
    ("alpha: {uniform: [-1, 5]}", "field 'alpha': value -1"),
    ("temperature_schedule: {choice: [log, cubic]}", "field 'temperature_schedule': value 'cubic'"),
    ("iterations: {choice: [4, 8]}", "field 'iterations': not tunable"),
    ("alpah: 3", "field 'alpah': not a search setting"),
    ("alpha: {normal: [1, 2]}", "field 'alpha': expected a value or one of"),
    ("seed_labels: {randint: [2.5, 6]}", "randint needs whole numbers"),
    ("alpha: [1, 2", "not valid YAML"),
    ("- alpha", "expected a mapping"),
])
def test_bad_space_is_a_one_line_error(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text + "\n")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_space(path, SearchConfig())


def test_searcher_choice():
    from ray.tune.search import BasicVariantGenerator

    from icm_ray_tune.experiment import make_searcher

    grid = {"alpha": {"grid": [5, 50]}}
    assert isinstance(make_searcher("auto", "heldout_p", 0, grid), BasicVariantGenerator)
    assert isinstance(make_searcher("random", "heldout_p", 0, DEFAULT_SPACE), BasicVariantGenerator)
    with pytest.raises(UserError, match="cannot run a space with 'grid'"):
        make_searcher("optuna", "heldout_p", 0, grid)
    pytest.importorskip("optuna")
    from ray.tune.search.optuna import OptunaSearch

    assert isinstance(make_searcher("auto", "heldout_p", 0, DEFAULT_SPACE), OptunaSearch)


# ---------------------------------------------------------------- objectives


def test_heldout_split_is_seeded_and_disjoint(typed_file):
    examples = load_datasets([typed_file]).examples
    pool, heldout = split_heldout(examples, 0.25, seed=3)
    assert len(heldout) == 3 and len(pool) == 9 and not {e.id for e in pool} & {e.id for e in heldout}
    assert split_heldout(examples, 0.25, seed=3) == (pool, heldout)


def test_objectives_prefer_coherent_labels_and_gold_stays_out_of_the_search(typed_file):
    dataset = load_datasets([typed_file])
    pool, heldout = split_heldout(dataset.examples, 0.25, seed=0)
    config = SearchConfig(seed_labels=0, iterations=0, permutations=50, orientation="none")
    task = PersonaTask(Persona("p", "likes tests"), pool, heldout, dict(dataset.gold))
    scorer = TypeMajorityScorer()
    search = ICMSearch(pool, task.persona, scorer, config)

    def scored(label_of):
        state = search.start()
        state.labels = [label_of(e) for e in pool]
        ev = search._evaluate(state.labelled, state)
        search._adopt(state, state.labelled, ev)
        return measure(search, state, task, "heldout_p", (50.0, 1.0))

    coherent = scored(lambda e: type_of(e.claim) == "alpha")  # the gold labelling of typed_rows
    mixed = scored(lambda e: int(e.id.split("-")[1]) % 4 < 2)  # half of each type True
    assert coherent["accuracy"] == 1.0 and coherent["labelled"] == len(pool)
    assert coherent["heldout_p"] > mixed["heldout_p"]
    assert coherent["u_per_label"] == pytest.approx(50.0 * coherent["P"])  # no inconsistencies
    assert mixed["accuracy"] < 1.0
    assert not any("gold" in text for text in scorer.seen_text)


def test_u_per_label_uses_the_reference_weights(typed_file):
    examples = load_datasets([typed_file]).examples
    config = SearchConfig(seed_labels=4, iterations=0, alpha=2.0, permutations=10)
    search = ICMSearch(examples, Persona("p", "x"), TypeMajorityScorer(), config)
    state = search.start()
    row = measure(search, state, PersonaTask(search.persona, examples), "u_per_label", (50.0, 1.0))
    assert row["U"] == pytest.approx(2.0 * state.predictability - state.inconsistency)
    assert row["u_per_label"] == pytest.approx(50.0 * state.predictability - state.inconsistency / 4)
    assert "accuracy" not in row and "heldout_p" not in row


# ---------------------------------------------------------------- bad input


def test_gold_file_formats_and_errors(tmp_path, typed_file):
    dataset = load_datasets([typed_file])
    good = write_native(tmp_path / "g.jsonl", [{"id": "p-0", "gold": True}, {"id": "p-1", "gold": "false"}])
    assert load_gold(good, dataset) == {"p-0": True, "p-1": False}
    mapping = tmp_path / "g.yaml"
    mapping.write_text("p-2: yes\np-3: no\n")
    assert load_gold(mapping, dataset) == {"p-2": True, "p-3": False}
    assert load_gold(typed_file, dataset) == dataset.gold  # a native data file works as it is
    missing = write_native(tmp_path / "m.jsonl", [{"id": "p-0", "gold": True}, {"id": "nope", "gold": True}])
    with pytest.raises(UserError, match=r"m.jsonl:2: field 'id': 'nope' is not in the tuned data"):
        load_gold(missing, dataset)
    no_label = write_native(tmp_path / "n.jsonl", [{"id": "p-0"}])
    with pytest.raises(UserError, match=r"n.jsonl:1: field 'gold': missing"):
        load_gold(no_label, dataset)
    table = tmp_path / "g.csv"
    table.write_text("id,gold\np-0,true\np-1,no\n")
    assert load_gold(table, dataset) == {"p-0": True, "p-1": False}
    table.write_text("id,label\np-0,true\n")
    with pytest.raises(UserError, match=r"g.csv:1: header must name the columns 'id' and 'gold'"):
        load_gold(table, dataset)
    scalars = tmp_path / "s.yaml"
    scalars.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match=r"s.yaml: expected a list of \{id, gold\} rows"):
        load_gold(scalars, dataset)
    broken = tmp_path / "b.yaml"
    broken.write_text("p-0: [true\n")
    with pytest.raises(UserError, match=r"b.yaml:\d+: not valid YAML/JSON"):
        load_gold(broken, dataset)


@pytest.mark.parametrize("extra, message", [
    (["--metric", "vibes"], "error: unknown metric 'vibes'"),
    (["--metric", "accuracy"], "error: --metric accuracy needs --gold-file"),
    (["--persona", "nobody"], "error: unknown persona 'nobody'"),
    (["--space", "SPACE"], "field 'alpha': loguniform needs low > 0"),
    (["--gold-file", "GOLD"], "field 'id': 'ghost' is not in the tuned data"),
    (["--searcher", "bayes"], "error: unknown searcher 'bayes'"),
    (["--samples", "0"], "error: --samples must be at least 1"),
    (["--iterations", "1"], "error: --grace-period 2 is more than the 1 iterations"),
    (["--storage", "FILE/tune"], "cannot write there"),
])
def test_bad_input_exits_2_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, extra, message):
    data = write_native(tmp_path / "p.jsonl", typed_rows())
    space = tmp_path / "space.yaml"
    space.write_text("alpha: {loguniform: [0, 5]}\n")
    gold = write_native(tmp_path / "gold.jsonl", [{"id": "ghost", "gold": True}])
    extra = [{"SPACE": space, "GOLD": gold}.get(x, str(x).replace("FILE", str(data))) for x in extra]
    out = tmp_path / "out"
    assert cli(monkeypatch, "tune", "--data", data, "--out", out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


# ---------------------------------------------------------------- a real Tune run


def test_real_tune_run_asha_stops_a_trial_and_best_config_runs(ray_cluster, s3_env, tmp_path, monkeypatch,
                                                                 capsys):
    """4 trials through one Serve deployment of the real model; Tune's storage on (moto) S3.

    ASHA is made to stop a trial deterministically: trials run one at a time in grid order
    X, Y, X, Y (two different seed-label counts, so x != y at iteration 1); with
    grace_period 1 and reduction_factor 100, a trial is stopped when it falls below almost
    the best value recorded so far, so either trial 2 (if y < x) or trial 3 (if x < y) stops.
    """
    import boto3

    data = demo_subset(tmp_path, personas=1, per_persona=6)
    space = tmp_path / "space.yaml"
    space.write_text("seed_labels: {grid: [2, 4, 2, 4]}\ntemperature_schedule: exponential\n"
                     "cooling_rate: 0.5\nalpha: 20\n")
    out = tmp_path / "tuned"
    code = cli(monkeypatch, "tune", "--data", data, "--samples", 1, "--iterations", 2,
               "--metric", "u_per_label", "--space", space, "--searcher", "random",
               "--max-concurrent", 1, "--report-every", 1,
               "--grace-period", 1, "--reduction-factor", 100, "--seed", 2, "--out", out,
               "--storage", f"s3://{s3_env}/tune")
    assert code == 0
    printed = capsys.readouterr().out
    assert "Tuning trials" in printed and "best trial" in printed
    assert printed.count(" started: ") == 4 and "stopped early (ASHA) at 1/2" in printed  # progress
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and not any(r["error"] for r in rows)
    assert [r["params"]["seed_labels"] for r in rows] == [2, 4, 2, 4]
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and all(r["iteration"] == 1 for r in stopped)
    assert any(r["status"] == "completed" and r["iteration"] == 2 for r in rows)
    assert all(math.isfinite(r["u_per_label"]) and r["labelled"] >= 2 for r in rows)
    assert (out / "tuning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_env).get("Contents", [])]
    assert any(k.startswith("tune/icm-tune-") and k.endswith("result.json") for k in keys)

    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert set(best) == {"search", "prompts", "model", "ray"}
    assert best["search"]["temperature_schedule"] == "exponential" and best["search"]["alpha"] == 20
    assert best["search"]["seed_labels"] in (2, 4) and best["search"]["iterations"] == 2

    run_dir = tmp_path / "run"
    best_file = out / "best_config.yaml"
    assert cli(monkeypatch, "run", "--config", best_file, "--data", data, "--out", run_dir) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["personas"][0]["iterations"] == 2
    used = json.loads((run_dir / "config.json").read_text())["config"]["search"]
    assert used["temperature_schedule"] == "exponential"
    assert used["seed_labels"] == best["search"]["seed_labels"]
