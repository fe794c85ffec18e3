"""A trial's inputs: the personas' search pools, held-out parts and the optional gold file."""

from __future__ import annotations

from pathlib import Path

import yaml

from icm_ray.data import Dataset, Persona, _csv_rows, _json_lines, _parse_bool, _scalar
from icm_ray.errors import UserError
from icm_ray_tune.objectives import PersonaTask, split_heldout


def _rows(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix in (".jsonl", ".ndjson"):
        return _json_lines(path)
    if suffix in (".json", ".yaml", ".yml"):
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{path}{line}: not valid YAML/JSON ({getattr(err, 'problem', err)})") from None
        if isinstance(raw, dict):  # {id: true/false}
            return ((index + 1, {"id": k, "gold": v}) for index, (k, v) in enumerate(raw.items()))
        if isinstance(raw, list) and all(isinstance(r, dict) for r in raw):
            return ((index + 1, row) for index, row in enumerate(raw))
        raise UserError(f"{path}: expected a list of {{id, gold}} rows or a mapping id -> true/false")
    raise UserError(f"{path}: unsupported gold file type '{path.suffix}' (use .jsonl, .csv, .json or .yaml)")


def load_gold(path: str | Path, dataset: Dataset) -> dict[str, bool]:
    """Gold labels for ids of the data: rows with `id` and `gold` (other fields are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such gold file")
    known = {e.id for e in dataset.examples}
    gold: dict[str, bool] = {}
    try:
        for number, row in _rows(path):
            where = f"{path}:{number}"
            example_id = _scalar(row.get("id"), where, "id", required=True)
            if example_id not in known:
                raise UserError(f"{where}: field 'id': '{example_id}' is not in the tuned data")
            if example_id in gold:
                raise UserError(f"{where}: field 'id': duplicate id '{example_id}'")
            value = _parse_bool(row.get("gold"), where, "gold")
            if value is None:
                raise UserError(f"{where}: field 'gold': missing")
            gold[example_id] = value
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if not gold:
        raise UserError(f"{path}: empty gold file (no rows)")
    return gold


def build_tasks(dataset: Dataset, personas: dict[str, Persona], metric: str, heldout_fraction: float,
                seed: int, gold: dict[str, bool]) -> list[PersonaTask]:
    tasks = []
    for name in dataset.personas():
        examples = [e for e in dataset.examples if e.persona == name]
        pool, heldout = examples, []
        if metric == "heldout_p":
            if len(examples) < 4:
                raise UserError(f"persona '{name}': {len(examples)} examples are too few to hold some out "
                                "(need 4; use --metric u_per_label)")
            pool, heldout = split_heldout(examples, heldout_fraction, seed)
        ids = {e.id for e in examples}
        tasks.append(PersonaTask(personas[name], pool, heldout, {i: g for i, g in gold.items() if i in ids}))
    return tasks
