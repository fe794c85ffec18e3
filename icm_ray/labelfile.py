"""Label files written by people (or by another run): rows of `id` and `label` (or `gold`).

Read by `icm-ray audit LABELS` (the label set to audit), `icm-ray run --clamp FILE` (human
labels fixed during a search) and `icm-ray tune --gold-file` (column `gold`). CSV, JSONL,
Parquet, or JSON/YAML (a list of rows or a mapping id -> label); a steering-examples JSONL, a
`feedback suggest` file or a native data file with `gold` works as it is (other columns are
ignored). Labels are true/false, yes/no or 1/0. Ids must belong to the data they are used with.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from icm_ray.data import _json_lines, _parquet_rows, _parse_bool, _scalar, read_csv, read_yaml
from icm_ray.errors import UserError


def _rows(path: Path, column: str):
    suffix = path.suffix.lower()
    if suffix == ".csv":
        def check(header: list[str]) -> None:
            if "id" not in header or column not in header:
                raise UserError(f"{path}:1: header must name the columns 'id' and '{column}' "
                                f"(found {', '.join(header)[:200]})")

        return read_csv(path, check)
    if suffix in (".jsonl", ".ndjson"):
        return _json_lines(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    if suffix in (".json", ".yaml", ".yml"):
        return _mapping_or_rows(path, column)
    raise UserError(f"{path}: unsupported {column} file type '{path.suffix}' "
                    "(use .csv, .jsonl, .parquet, .json or .yaml)")


def _mapping_or_rows(path: Path, column: str):
    raw = read_yaml(path)
    if raw is None:
        return iter(())
    if isinstance(raw, dict):  # {id: true/false}
        return ((index, {"id": k, column: v}) for index, (k, v) in enumerate(raw.items(), start=1))
    if isinstance(raw, list) and all(isinstance(r, dict) for r in raw):
        return enumerate(raw, start=1)
    raise UserError(f"{path}: expected a list of {{id, {column}}} rows or a mapping id -> true/false")


def load_labels(path: str | Path, known: Iterable[str], what: str = "the data",
                allow_blank: bool = False, column: str = "label",
                personas: Iterable[str] | None = None) -> tuple[dict[str, bool], list[str]]:
    """(labels by id, ids whose label was left blank). Blank labels are an error unless
    `allow_blank` (a feedback file where some questions were not answered). With `personas`,
    rows whose `persona` column names another persona are skipped (one persona of a run)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such {column} file")
    known = set(known)
    selected = None if personas is None else set(personas)
    labels: dict[str, bool] = {}
    blank: list[str] = []
    seen: set[str] = set()
    try:
        for number, row in _rows(path, column):
            where = f"{path}:{number}"
            if selected is not None and row.get("persona") is not None \
                    and str(row["persona"]) not in selected:
                continue
            example_id = _scalar(row.get("id"), where, "id", required=True).strip()
            if example_id not in known:
                raise UserError(f"{where}: field 'id': '{example_id}' is not in {what}")
            if example_id in seen:
                raise UserError(f"{where}: field 'id': duplicate id '{example_id}'")
            seen.add(example_id)
            if column not in row:
                raise UserError(f"{where}: field '{column}': missing")
            value = _parse_bool(row.get(column), where, column)
            if value is None:
                if not allow_blank:
                    raise UserError(f"{where}: field '{column}': missing (true or false)")
                blank.append(example_id)
                continue
            labels[example_id] = value
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if not seen:
        raise UserError(f"{path}: empty {column} file (no rows)")
    if not labels:
        raise UserError(f"{path}: no labels filled in ({len(blank)} rows with an empty '{column}')")
    return labels, blank

