"""Label files written by people (or by another run): rows of `id` and `label`.

Read by `icm-ray audit LABELS` (the label set to audit) and `icm-ray run --clamp FILE` (human
labels fixed during a search). CSV, JSONL or Parquet; a steering-examples JSONL or a
`feedback suggest` file works as it is (other columns are ignored). Labels are true/false,
yes/no or 1/0. Ids must belong to the data they are used with.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from icm_ray.data import _json_lines, _parquet_rows, _parse_bool, _scalar
from icm_ray.errors import UserError


def _rows(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle), None)
        if not header:
            return iter(())
        if "id" not in header or "label" not in header:
            raise UserError(f"{path}:1: header must name the columns 'id' and 'label' "
                            f"(found {', '.join(header)[:200]})")
        return _label_csv(path)
    if suffix in (".jsonl", ".ndjson"):
        return _json_lines(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    raise UserError(f"{path}: unsupported label file type '{path.suffix}' (use .csv, .jsonl or .parquet)")


def _label_csv(path: Path):
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            if None in row:
                raise UserError(f"{path}:{reader.line_num}: more values than header columns")
            yield reader.line_num, row


def load_labels(path: str | Path, known: Iterable[str], what: str = "the data",
                allow_blank: bool = False) -> tuple[dict[str, bool], list[str]]:
    """(labels by id, ids whose label was left blank). Blank labels are an error unless
    `allow_blank` (a feedback file where some questions were not answered)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such label file")
    known = set(known)
    labels: dict[str, bool] = {}
    blank: list[str] = []
    seen: set[str] = set()
    try:
        for number, row in _rows(path):
            where = f"{path}:{number}"
            example_id = _scalar(row.get("id"), where, "id", required=True).strip()
            if example_id not in known:
                raise UserError(f"{where}: field 'id': '{example_id}' is not in {what}")
            if example_id in seen:
                raise UserError(f"{where}: field 'id': duplicate id '{example_id}'")
            seen.add(example_id)
            if "label" not in row:
                raise UserError(f"{where}: field 'label': missing")
            value = _parse_bool(row.get("label"), where, "label")
            if value is None:
                if not allow_blank:
                    raise UserError(f"{where}: field 'label': missing (true or false)")
                blank.append(example_id)
                continue
            labels[example_id] = value
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if not seen:
        raise UserError(f"{path}: empty label file (no rows)")
    if not labels:
        raise UserError(f"{path}: no labels filled in ({len(blank)} rows with an empty 'label')")
    return labels, blank

