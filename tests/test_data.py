import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from icm_ray.cli import main
from icm_ray.data import Persona, default_description, load_datasets, load_demo, load_personas
from icm_ray.errors import UserError
from tests.conftest import write_native


def test_native_jsonl_csv_parquet_agree(tmp_path):
    rows = [{"id": "a", "persona": "p", "claim": "I like tea", "question": None, "gold": True,
             "group": "g", "key": "1"},
            {"id": "b", "persona": "p", "question": "Q?", "claim": "yes", "gold": False}]
    jsonl = write_native(tmp_path / "d.jsonl", rows)
    csv = tmp_path / "d.csv"
    csv.write_text("id,persona,claim,question,gold,group,key\n"
                   "a,p,I like tea,,true,g,1\nb,p,yes,Q?,false,,\n", encoding="utf-8")
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    loaded = [load_datasets([f]) for f in (jsonl, csv, parquet)]
    for ds in loaded:
        assert [e.id for e in ds.examples] == ["a", "b"]
        assert ds.gold == {"a": True, "b": False}
        assert ds.examples[0].group == "g" and ds.examples[0].key == "1"
        assert ds.examples[1].question == "Q?"
    assert loaded[0].examples == loaded[1].examples == loaded[2].examples


def test_native_comparison_rows(tmp_path):
    f = write_native(tmp_path / "pairs.jsonl", [
        {"id": "1", "persona": "p", "prompt": "Say hi", "response_a": "hi", "response_b": "go away",
         "group": "g"},
        {"id": "2", "persona": "p", "prompt": "Say hi", "response_a": "go away", "response_b": "hi",
         "group": "g"}])
    ds = load_datasets([f])
    assert all(e.kind == "comparison" for e in ds.examples)
    assert ds.gold == {}


def test_reference_icm_json(tmp_path):
    f = tmp_path / "truthfulqa.json"
    f.write_text(json.dumps([
        {"question": "2+2?", "choice": "4", "label": 1, "consistency_id": 7, "answer": "4"},
        {"question": "2+2?", "choice": "5", "label": 0, "consistency_id": 7, "answer": "5"},
        {"question": "Best?", "choice": "A", "choice_2": "B", "label": 1, "consistency_id": 8},
    ]))
    ds = load_datasets([f])
    assert [e.kind for e in ds.examples] == ["claim", "claim", "comparison"]
    assert ds.examples[0].group == "7" and ds.examples[1].key == "5"
    assert list(ds.gold.values()) == [True, False, True]
    assert ds.personas() == ["truthfulqa"]


def test_anthropic_persona_jsonl(tmp_path):
    f = tmp_path / "politically-liberal.jsonl"
    f.write_text("\n".join(json.dumps({
        "question": "Is the following statement something you would say?\n\"x\"",
        "statement": s, "answer_matching_behavior": a, "answer_not_matching_behavior": "",
        "label_confidence": 0.9}) for s, a in [("Taxes fund good things", " Yes"),
                                              ("Cut all taxes", " No")]))
    ds = load_datasets([f])
    assert ds.personas() == ["politically-liberal"]
    assert [e.claim for e in ds.examples] == ["Taxes fund good things", "Cut all taxes"]
    assert list(ds.gold.values()) == [True, False]


def test_demo_data_is_built_in():
    ds, personas = load_demo()
    assert len(ds.personas()) >= 3
    for name in ds.personas():
        part = ds.for_persona(name)
        assert len(part.examples) >= 32 and len(part.gold) == len(part.examples)
        assert name in personas


def test_persona_definitions(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("personas:\n  - name: a\n    description: likes apples\n  - name: b\n")
    defs = load_personas(f)
    assert defs["a"].description == "likes apples"
    assert defs["b"].description == "is b"
    assert default_description("subscribes-to-Islam") == "subscribes to Islam"
    assert default_description("politically-liberal") == "is politically liberal"


GOOD = {"id": "x", "persona": "p", "claim": "c"}


def bad_inputs(tmp_path):
    """(file name, content, text the one-line error must contain)"""
    return [
        ("bad.jsonl", '{"id": "a", "claim": "c"}\n{"id": "b", "claim": \n', "bad.jsonl:2: not valid JSON"),
        ("missing.jsonl", json.dumps({"id": "a", "persona": "p"}) + "\n", "missing.jsonl:1: field 'claim'"),
        ("noid.jsonl", json.dumps({"persona": "p", "claim": "c"}) + "\n", "noid.jsonl:1: field 'id'"),
        ("dup.jsonl", (json.dumps(GOOD) + "\n") * 2, "dup.jsonl:2: field 'id': duplicate id 'x'"),
        ("empty.jsonl", "\n\n", "empty.jsonl: empty file"),
        ("gold.jsonl", json.dumps({**GOOD, "gold": "maybe"}) + "\n", "gold.jsonl:1: field 'gold'"),
        ("list.jsonl", "[1, 2]\n", "list.jsonl:1: expected a JSON object"),
        ("type.jsonl", json.dumps({**GOOD, "claim": ["a"]}) + "\n",
         "type.jsonl:1: field 'claim': expected text"),
        ("notes.txt", "hello", "unsupported file type '.txt'"),
        ("ref.json", json.dumps({"question": "q"}), "ref.json: expected a JSON list"),
        ("ref2.json", json.dumps([{"question": "q", "choice": "c", "label": 1}]),
         "ref2.json:item 0: field 'consistency_id': missing"),
        ("anth.jsonl", json.dumps({"statement": "s", "answer_matching_behavior": "Maybe"}) + "\n",
         "anth.jsonl:1: field 'answer_matching_behavior'"),
        ("rows.csv", "id,persona,claim\na,p,c,extra\n", "rows.csv:2: more values than header columns"),
        ("broken.parquet", "not parquet at all", "broken.parquet: not a readable Parquet file"),
        ("latin.jsonl", b"\xff\xfe{", "latin.jsonl: not UTF-8 text"),
        ("quote.csv", 'id,persona,claim\na,p,"unterminated\n', "quote.csv:2: not valid CSV"),
        ("huge.csv", "id,persona,claim\na,p," + "x" * 200_000 + "\n",
         "huge.csv:2: not valid CSV (field larger"),
    ]


@pytest.mark.parametrize("index", range(17))
def test_bad_input_is_one_line_error_and_exit_code_2(tmp_path, capsys, monkeypatch, index):
    name, content, message = bad_inputs(tmp_path)[index]
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["icm-ray", "run", "--no-ray", "--data", str(path), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert err.count("\n") == 0 and "Traceback" not in err
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("args, message", [
    (["--persona", "nobody"], "unknown persona 'nobody'"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--config", "CONFIG:search:\n  alpha: -1\n"], "field 'search.alpha'"),
    (["--config", "CONFIG:search:\n  temperature: 3\n"], "field 'search.temperature'"),
    (["--config", "CONFIG:search:\n  max_tail: -1\n"], "field 'search.max_tail'"),
    (["--config", "CONFIG:model:\n  kv_cache_mb: lots\n"], "field 'model.kv_cache_mb'"),
    # YAML booleans are not integers (pydantic alone would take true as 1)
    (["--config", "CONFIG:search:\n  max_tail: true\n"], "field 'search.max_tail'"),
    (["--config", "CONFIG:model:\n  kv_cache_mb: true\n"], "field 'model.kv_cache_mb'"),
    (["--config", "CONFIG:search:\n  iterations: false\n"], "field 'search.iterations'"),
    (["--config", "CONFIG:model:\n  threads: true\n"], "field 'model.threads'"),
    (["--config", "CONFIG:ray:\n  replicas: true\n"], "field 'ray.replicas'"),
    (["--config", "CONFIG:model:\n  kv_cache_mb: 2000000\n"], "field 'model.kv_cache_mb': at most"),
    (["--config", "CONFIG:prompts:\n  header: 'Hi {nope}'\n"], "field 'prompts.header'"),
    (["--config", "CONFIG:[1, 2\n"], "not valid YAML/JSON"),
    (["--personas", "CONFIG:personas:\n  - description: x\n"], "field 'name': missing"),
    (["--data", "/no/such/file.jsonl"], "/no/such/file.jsonl: no such file or directory"),
    (["--config", "BYTES"], "not UTF-8 text"),
    (["--personas", "BYTES"], "not UTF-8 text"),
    (["--iterations", "abc"], "Invalid value for '--iterations'"),
    (["--bogus"], "No such option: --bogus"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, monkeypatch, args, message):
    args = list(args)
    for i, a in enumerate(args):
        if a.startswith("CONFIG:"):
            f = tmp_path / f"file{i}.yaml"
            f.write_text(a[len("CONFIG:"):])
            args[i] = str(f)
        elif a == "BYTES":
            f = tmp_path / f"file{i}.yaml"
            f.write_bytes(b"\xff\xfe\x00bad")
            args[i] = str(f)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["icm-ray", "run", "--no-ray", "--out", str(out), *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0, err
    assert not out.exists()  # nothing written


def test_config_integers_are_plain_integers(tmp_path):
    """YAML integers (and Tune's numpy integers) are taken; only booleans are refused."""
    import numpy as np

    from icm_ray.config import load_config
    from icm_ray.search import SearchConfig

    f = tmp_path / "c.yaml"
    f.write_text("search:\n  max_tail: 0\n  iterations: 3\nmodel:\n  kv_cache_mb: 1048576\n"
                 "  threads: 2\nray:\n  replicas: 2\n")
    config = load_config(f)
    assert (config.search.max_tail, config.search.iterations, config.model.kv_cache_mb,
            config.model.threads, config.ray.replicas) == (0, 3, 1048576, 2, 2)
    assert SearchConfig(seed_labels=np.int64(4)).seed_labels == 4


def test_unknown_persona_lists_known_ones(tmp_path):
    ds = load_datasets([write_native(tmp_path / "d.jsonl", [GOOD])])
    with pytest.raises(UserError, match="the data has p"):
        ds.select_personas(["q"])


def _run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["icm-ray", "run", "--no-ray", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_overwrite_never_deletes_a_directory_that_is_not_a_run(tmp_path, monkeypatch, capsys):
    data = write_native(tmp_path / "d.jsonl", [GOOD])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    code, err = _run_cli(monkeypatch, capsys, "--data", str(data), "--out", str(mine), "--overwrite")
    assert code == 2 and "not an icm-ray run directory" in err and err.count("\n") == 0
    assert (mine / "precious.txt").read_text() == "keep"


def saved_run(folder: Path, data: Path) -> Path:
    """A run directory as `icm-ray run` leaves it before its first step: inputs.json only."""
    from icm_ray.config import RunConfig
    from icm_ray.engine import save_inputs
    from icm_ray.store import RunStore

    save_inputs(RunStore(folder), RunConfig(), load_datasets([data]), {"p": Persona("p", "likes tests")})
    return folder


def test_overwrite_removes_only_what_a_run_wrote(tmp_path):
    """--overwrite replaces a run, not the user's files beside it (here: the data being read);
    a run directory left empty is removed with it."""
    from icm_ray.store import RunStore

    def make_run(folder, data):
        saved_run(folder, data)
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "p.json").write_text("{}")

    run = tmp_path / "run"
    run.mkdir()
    data = write_native(run / "mine.jsonl", [GOOD])
    make_run(run, data)
    (run / "notes.txt").write_text("keep")
    RunStore(run).clear()
    assert sorted(p.name for p in run.iterdir()) == ["mine.jsonl", "notes.txt"]
    other = tmp_path / "other"
    make_run(other, data)
    RunStore(other).clear()
    assert not other.exists()


@pytest.mark.parametrize("damage, message", [
    ({"labels": [True]}, "field 'labels': expected a list of 2 entries"),
    ({"labels": ["yes", None]}, "field 'labels': expected true/false or null"),
    ({"seeded": ["x", False]}, "field 'seeded': expected true/false"),
    ({"rng": "garbage"}, "field 'rng'"),
    ({"iteration": -5}, "field 'iteration'"),
    ({"trace": "x"}, "field 'trace'"),
    ({"tail": [99]}, "field 'tail': expected positions from 0 to 1"),
    ({"labels": None, "unknown": 1}, "not a search checkpoint"),
])
def test_resume_from_a_damaged_checkpoint_is_one_line(tmp_path, monkeypatch, capsys, damage, message):
    from icm_ray.engine import checkpoint_name

    run = saved_run(tmp_path / "run", write_native(tmp_path / "d.jsonl", [GOOD, {**GOOD, "id": "y"}]))
    checkpoint = run / checkpoint_name("p")
    checkpoint.parent.mkdir()
    state = {"labels": [True, None], "seeded": [True, False], "clamped": [False, False],
             "rng": {}, "logprobs": {}}
    checkpoint.write_text(json.dumps({**state, **damage}))
    code, err = _run_cli(monkeypatch, capsys, "--resume", str(run))
    assert code == 2 and err.count("\n") == 0, err
    assert message in err and checkpoint.name in err, err


@pytest.mark.parametrize("damage, message", [
    (lambda i: i.update(personas={}), "persona 'p' is not in 'personas'"),
    (lambda i: i["examples"][1].update(id="x"), "field 'id': missing or duplicate"),
    (lambda i: i["examples"][0].update(kind="weird"), "field 'kind': 'weird'"),
    (lambda i: i["examples"][0].update(claim=""), "text is missing"),
    (lambda i: i.update(clamp={"ghost": True}), "field 'clamp': id 'ghost'"),
])
def test_resume_with_damaged_inputs_is_one_line(tmp_path, monkeypatch, capsys, damage, message):
    run = saved_run(tmp_path / "run", write_native(tmp_path / "d.jsonl", [GOOD, {**GOOD, "id": "y"}]))
    inputs = json.loads((run / "inputs.json").read_text())
    damage(inputs)
    (run / "inputs.json").write_text(json.dumps(inputs))
    code, err = _run_cli(monkeypatch, capsys, "--resume", str(run))
    assert code == 2 and err.count("\n") == 0 and message in err, err
    assert not (run / "summary.json").exists()


@pytest.mark.parametrize("setup, args, message", [
    ("file", ["--out", "{tmp}/afile"], "exists and is not a directory"),
    ("", ["--out", "/proc/no/such"], "cannot write there"),
    ("", ["--seed", "-1"], "field 'search.seed'"),
    ("gguf", ["--model", "{tmp}/fake.gguf"], "not a GGUF file"),
    ("hfdir", ["--model", "{tmp}/fakemodel"], "no 'model_type'"),
    ("", ["--config", "CONFIG:prompts:\n  true_label: ' '\n"], "field 'prompts.true_label'"),
    ("", ["--config", "CONFIG:prompts:\n  true_label: ' Yes'\n  false_label: ' Yes'\n"], "must differ"),
    ("", ["--config", "CONFIG:model:\n  dtype: float128\n"], "field 'model.dtype'"),
    ("", ["--resume", "{tmp}/r", "--out", "{tmp}/x"], "give no --out"),
    ("", ["--out", ""], "--out is empty"),
])
def test_bad_paths_models_and_options(tmp_path, monkeypatch, capsys, setup, args, message):
    data = write_native(tmp_path / "d.jsonl", [GOOD])
    if setup == "file":
        (tmp_path / "afile").write_text("x")
    if setup == "gguf":
        (tmp_path / "fake.gguf").write_bytes(b"not a model")
    if setup == "hfdir":
        (tmp_path / "fakemodel").mkdir()
        (tmp_path / "fakemodel" / "config.json").write_text("{}")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    for i, a in enumerate(args):
        if a.startswith("CONFIG:"):
            (tmp_path / "c.yaml").write_text(a[len("CONFIG:"):])
            args[i] = str(tmp_path / "c.yaml")
    extra = [] if "--resume" in args else ["--data", str(data)]
    if "--out" not in args and "--resume" not in args:
        extra += ["--out", str(tmp_path / "run")]
    code, err = _run_cli(monkeypatch, capsys, *extra, *args)
    assert code == 2 and message in err and err.count("\n") == 0, err
    assert not (tmp_path / "run").exists()


def test_data_quirks_are_handled(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert load_datasets([bom]).examples[0].id == "x"
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps([{"question": "q", "choice": "c", "label": 1, "consistency_id": None}]))
    with pytest.raises(UserError, match="field 'consistency_id': must be text or a number"):
        load_datasets([ref])
    nohead = tmp_path / "nohead.csv"
    nohead.write_text("a,p,c\nb,p,d\n")
    with pytest.raises(UserError, match="nohead.csv:1: header must name the columns"):
        load_datasets([nohead])
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({**GOOD, "claim": "x" * 20_000}) + "\n")
    with pytest.raises(UserError, match="more than 10,000"):
        load_datasets([long])


@pytest.mark.parametrize("argv, message", [
    (["run", "--no-ray", "--resume", "{tmp}"], "not a run directory (no inputs.json)"),
    (["serve", "--results", "{tmp}"], "not a finished run (no summary.json)"),
    (["serve", "--results", "{tmp}", "--model", "nope"], "unknown model 'nope'"),
])
def test_resume_and_serve_refuse_what_is_not_a_run(tmp_path, monkeypatch, capsys, argv, message):
    (tmp_path / "stray.txt").write_text("not a run")
    monkeypatch.setattr(sys, "argv", ["icm-ray", *[a.replace("{tmp}", str(tmp_path)) for a in argv]])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stray.txt"]  # nothing written


@pytest.mark.parametrize("section, name, value", [
    ("search", "max_tail", -1), ("search", "max_tail", True), ("model", "kv_cache_mb", "lots"),
])
def test_resume_with_a_bad_saved_config_is_one_line(tmp_path, monkeypatch, capsys, section, name, value):
    """inputs.json edited by hand (or written by another version): the file and field, in one line."""
    run = saved_run(tmp_path / "run", write_native(tmp_path / "d.jsonl", [GOOD]))
    inputs = json.loads((run / "inputs.json").read_text())
    inputs["config"][section][name] = value
    (run / "inputs.json").write_text(json.dumps(inputs))
    before = sorted(p.name for p in run.rglob("*"))
    code, err = _run_cli(monkeypatch, capsys, "--resume", str(run))
    assert code == 2 and err.count("\n") == 0, err
    assert f"{run}/inputs.json: field 'config.{section}.{name}'" in err, err
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written


def test_format_without_data_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, err = _run_cli(monkeypatch, capsys, "--format", "xml", "--out", str(out), "--iterations", "1")
    assert code == 2 and err.count("\n") == 0 and "--format" in err and "--data" in err
    assert not out.exists()


def test_a_file_given_twice_and_same_named_files_say_so(tmp_path):
    data = write_native(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(UserError, match="given twice"):
        load_datasets([data, tmp_path / "." / "d.jsonl"])
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "agreeableness.jsonl").write_text(
            json.dumps({"statement": "I like people", "answer_matching_behavior": " Yes"}) + "\n")
    with pytest.raises(UserError, match="same name.*rename one"):
        load_datasets([tmp_path / "a" / "agreeableness.jsonl", tmp_path / "b" / "agreeableness.jsonl"])
