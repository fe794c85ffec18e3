import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def write_native(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def typed_rows(persona: str = "p", n: int = 12) -> list[dict]:
    """Claims of two hidden types; gold says alpha statements are True."""
    rows = []
    for i in range(n):
        kind = "alpha" if i % 2 == 0 else "beta"
        rows.append({"id": f"{persona}-{i}", "persona": persona,
                     "claim": f"statement {i} of kind {kind}", "gold": kind == "alpha"})
    return rows


@pytest.fixture
def typed_file(tmp_path):
    return write_native(tmp_path / "typed.jsonl", typed_rows())
