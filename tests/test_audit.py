"""icm-ray audit: P, I, U of a label set and the accuracy-matched random-flip control."""

import json

import pytest

from icm_ray.audit import flip_control
from tests.conftest import write_native
from tests.runs import cli, demo_rows


def test_flip_control_matches_accuracy_and_keeps_ids():
    gold = {f"x{i}": i % 2 == 0 for i in range(20)}
    labels = {i: (not g if n < 5 else g) for n, (i, g) in enumerate(gold.items())}
    labels["no-gold"] = True
    controls = [flip_control(labels, gold, seed) for seed in range(4)]
    for control in controls:
        assert set(control) == set(labels) and control["no-gold"] is True
        assert sum(control[i] != gold[i] for i in gold) == 5
    assert len({tuple(sorted(c.items())) for c in controls}) > 1  # errors placed differently
    assert flip_control(labels, gold, 1) == flip_control(labels, gold, 1)


def write_labels(path, rows, flip_first=2):
    lines = ["id,label"] + [f"{r['id']},{'true' if r['gold'] != (n < flip_first) else 'false'}"
                            for n, r in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_audit_reports_coherence_and_control_on_the_real_model(tmp_path):
    rows = demo_rows(per_persona=14)
    data = write_native(tmp_path / "data.jsonl", rows)
    labels = write_labels(tmp_path / "labels.csv", rows[:8])
    out = tmp_path / "audit.json"
    assert cli("audit", labels, "--data", data, "--shots", 4, "--seeds", 2, "--out", out) == 0
    row = json.loads(out.read_text())["personas"][0]
    assert row["labelled"] == 8 and row["I"] == 0 and row["P"] < 0
    assert row["U"] == pytest.approx(50 * row["P"])
    assert row["accuracy_vs_gold"] == pytest.approx(6 / 8)
    assert row["shots"] == 4 and row["test_examples"] == 10  # every other gold-labelled example
    assert 0 <= row["fewshot_accuracy"] <= 1
    control = row["control"]
    assert len(control["seeds"]) == 2 and isinstance(row["generalises_better"], bool)
    assert all(c["labelled"] == 8 for c in control["seeds"])


@pytest.mark.parametrize("content, args, message", [
    ("id,label\nnobody,true\n", [], "field 'id': 'nobody' is not in the data"),
    ("id,label\nID,maybe\n", [], "field 'label': expected true/false"),
    ("id,label\nID,\n", [], "no labels filled in"),
    ("id,verdict\nID,true\n", [], "header must name the columns 'id' and 'label'"),
    ("id,label\nID,true\n", ["--persona", "nobody"], "unknown persona 'nobody'"),
    ("id,label\nID,true\n", ["--shots", "0"], "--shots and --seeds must be at least 1"),
    (None, [], "no such label file"),
    ('id,label\nID,"true\n', [], "labels.csv:2: not valid CSV"),
    ("id,label\nID,true\n", ["--out", "OUTDIR"], "is a directory; give a file name"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, content, args, message):
    rows = demo_rows(per_persona=4)
    data = write_native(tmp_path / "data.jsonl", rows)
    labels = tmp_path / "labels.csv"
    if content is not None:
        labels.write_text(content.replace("ID", rows[0]["id"]))
    out = tmp_path / "audit.json"
    (tmp_path / "outdir.json").mkdir()
    args = [str(tmp_path / "outdir.json") if a == "OUTDIR" else a for a in args]
    assert cli("audit", labels, "--data", data, "--out", out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_one_persona_of_a_multi_persona_label_file(tmp_path):
    """`audit RUN/labels.parquet --persona p` reads only p's rows (the file has every persona's)."""
    from icm_ray.errors import UserError
    from icm_ray.labelfile import load_labels

    path = tmp_path / "labels.jsonl"
    path.write_text('{"id": "a1", "persona": "a", "label": true}\n'
                    '{"id": "b1", "persona": "b", "label": false}\n')
    assert load_labels(path, ["a1"], personas=["a"]) == ({"a1": True}, [])
    with pytest.raises(UserError, match="'b1' is not in the data"):
        load_labels(path, ["a1"])
