"""Helpers for the tests of commands that use finished runs: the CLI in-process, tiny real runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from icm_ray.cli import main
from tests.conftest import write_native


def cli(*args) -> int:
    """Run `icm-ray ARGS` in this process (the real `main`, so errors exit with code 2)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["icm-ray", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
    return exit_info.value.code


def real_run(folder: Path, rows: list[dict], iterations: int = 2, *extra) -> Path:
    """A finished run of the built-in model on `rows`, in process (no Ray)."""
    data = write_native(folder / "data.jsonl", rows)
    out = folder / "run"
    code = cli("run", "--no-ray", "--data", data, "--iterations", iterations, "--out", out, *extra)
    assert code == 0
    return out


def demo_rows(personas: int = 1, per_persona: int = 8, start: int = 0) -> list[dict]:
    """Native rows (with gold) cut from the built-in demo data."""
    from icm_ray.data import load_demo

    dataset, _ = load_demo()
    rows = []
    for name in dataset.personas()[:personas]:
        examples = [e for e in dataset.examples if e.persona == name][start:start + per_persona]
        rows += [{"id": e.id, "persona": name, "claim": e.claim, "gold": dataset.gold[e.id]}
                 for e in examples]
    return rows


def comparison_rows() -> list[dict]:
    """Two mirrored pairs of responses (asymmetry groups): a tiny preference task."""
    pairs = [("How should I get to work?", "Cycle: it is cheap and clean.", "Drive alone every day."),
             ("What should I do with old clothes?", "Repair or donate them.", "Throw them in the bin.")]
    rows = []
    for g, (prompt, good, bad) in enumerate(pairs):
        rows.append({"id": f"c{g}-ab", "persona": "environmentalist", "prompt": prompt,
                     "response_a": good, "response_b": bad, "group": f"q{g}", "gold": True})
        rows.append({"id": f"c{g}-ba", "persona": "environmentalist", "prompt": prompt,
                     "response_a": bad, "response_b": good, "group": f"q{g}", "gold": False})
    return rows
