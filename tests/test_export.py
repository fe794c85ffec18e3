"""icm-ray export: SFT JSONL, DPO pairs and a HF dataset from a finished run (real model)."""

import json
import shutil

import pytest

from tests.runs import cli, comparison_rows, demo_rows, real_run


@pytest.fixture(scope="module")
def claims_run(tmp_path_factory):
    return real_run(tmp_path_factory.mktemp("claims"), demo_rows(per_persona=6))


@pytest.fixture(scope="module")
def comparisons_run(tmp_path_factory):
    return real_run(tmp_path_factory.mktemp("pairs"), comparison_rows(), 1)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sft_rows_are_prompt_and_label(claims_run, tmp_path):
    out = tmp_path / "sft.jsonl"
    assert cli("export", claims_run, "--format", "sft", "--out", out) == 0
    rows = read_jsonl(out)
    steering = read_jsonl(claims_run / "steering_examples" / "cautious-investor.jsonl")
    assert [r["id"] for r in rows] == [s["id"] for s in steering]
    for row, example in zip(rows, steering):
        assert row["prompt"].startswith("The following are statements.")
        assert row["prompt"].endswith(example["text"])
        assert row["completion"] == (" True" if example["label"] else " False")


def test_dpo_pairs_for_claims_and_comparisons(claims_run, comparisons_run, tmp_path):
    out = tmp_path / "dpo.jsonl"
    assert cli("export", claims_run, "-f", "dpo", "-o", out) == 0
    for row in read_jsonl(out):
        assert {row["chosen"], row["rejected"]} == {" True", " False"}
    assert cli("export", comparisons_run, "-f", "dpo", "-o", out) == 2  # never over a file
    out.unlink()
    assert cli("export", comparisons_run, "-f", "dpo", "-o", out) == 0
    labels = {r["id"]: r["label"] for r in read_jsonl(comparisons_run / "steering_examples" /
                                                          "environmentalist.jsonl")}
    source = {r["id"]: r for r in comparison_rows()}
    for row in read_jsonl(out):  # the preferred response is chosen, under the comparison's prompt
        pair = source[row["id"]]
        preferred = pair["response_a"] if labels[row["id"]] else pair["response_b"]
        assert row["prompt"] == pair["prompt"] and row["chosen"] == preferred
        assert row["rejected"] in (pair["response_a"], pair["response_b"]) != row["chosen"]


def test_hf_dataset_on_disk(claims_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "hf"
    assert cli("export", claims_run, "--format", "hf", "--out", out) == 0
    loaded = datasets.load_from_disk(str(out))
    assert {"prompt", "completion", "chosen", "rejected", "label", "persona"} <= set(loaded.column_names)
    assert len(loaded) == len(read_jsonl(claims_run / "steering_examples" / "cautious-investor.jsonl"))
    assert cli("export", claims_run, "--format", "hf", "--out", out) == 2  # never over a dataset


@pytest.mark.parametrize("args, message", [
    (["RUN_MISSING", "--out", "OUT/x.jsonl"], "not a finished run"),
    (["RUN", "--format", "csv", "--out", "OUT/x.jsonl"], "unknown export format 'csv'"),
    (["RUN", "--persona", "nobody", "--out", "OUT/x.jsonl"], "unknown persona 'nobody'"),
    (["RUN", "--out", "OUT"], "give a file name"),
    (["RUN"], "--out is empty"),
    (["CORRUPT_SUMMARY", "--out", "OUT/x.jsonl"], "not a readable icm-ray run"),
    (["CORRUPT_EXAMPLES", "--out", "OUT/x.jsonl"], ".jsonl:1: corrupt JSON"),
])
def test_bad_input_is_one_line_and_exit_code_2(claims_run, tmp_path, capsys, args, message):
    for name, damage in (("CORRUPT_SUMMARY", lambda d: (d / "summary.json").write_text("{}")),
                         ("CORRUPT_EXAMPLES", lambda d: [f.write_text("garbage\n")
                                                         for f in (d / "steering_examples").iterdir()])):
        shutil.copytree(claims_run, tmp_path / name)
        damage(tmp_path / name)
    args = [str(a).replace("RUN_MISSING", str(tmp_path / "nope"))
            .replace("CORRUPT_", str(tmp_path / "CORRUPT_")).replace("RUN", str(claims_run))
            .replace("OUT", str(tmp_path)) for a in args]
    assert cli("export", *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "x.jsonl").exists()
