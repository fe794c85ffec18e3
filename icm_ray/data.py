"""Records and loaders: native JSONL/CSV/Parquet, reference ICM JSON, Anthropic persona JSONL.

Gold labels are split off at load time into `Dataset.gold`; an `Example` has no field
for them, so nothing that receives examples (the search, the scorer) can see gold.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from icm_ray.errors import UserError

# claim: a statement; comparison: prompt + two responses ("A is better than B");
# response: prompt + one candidate response (open-ended generation: would the persona endorse it?)
Kind = Literal["claim", "comparison", "response"]
SUPPORTED_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
FORMATS = ("auto", "native", "icm", "anthropic")
MAX_TEXT = 10_000  # characters per field: longer texts would not fit a prompt with demonstrations


@dataclass(frozen=True)
class Example:
    """One thing to label True/False for a persona. No gold label here, by design."""

    id: str
    persona: str
    kind: Kind
    claim: str = ""  # the statement or claim to judge (kind == "claim")
    question: str = ""  # optional question the claim answers; the prompt for comparisons
    response_a: str = ""  # comparison: "response A is better than response B" is the claim
    response_b: str = ""
    response: str = ""  # kind == "response": one candidate answer to `question` (the prompt)
    group: str | None = None  # consistency group (for example: one question)
    key: str | None = None  # consistency key within a group (for example: the final answer)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Persona:
    name: str
    description: str


@dataclass
class Dataset:
    examples: list[Example]
    gold: dict[str, bool] = field(default_factory=dict)  # evaluation only
    source: dict[str, str] = field(default_factory=dict)  # id -> "file:line"

    def personas(self) -> list[str]:
        return list(dict.fromkeys(e.persona for e in self.examples))

    def for_persona(self, persona: str) -> Dataset:
        examples = [e for e in self.examples if e.persona == persona]
        ids = {e.id for e in examples}
        return Dataset(
            examples,
            {i: g for i, g in self.gold.items() if i in ids},
            {i: s for i, s in self.source.items() if i in ids},
        )

    def select_personas(self, names: list[str]) -> Dataset:
        known = self.personas()
        for name in names:
            if name not in known:
                raise UserError(
                    f"unknown persona '{name}': the data has {', '.join(known) or 'no personas'}"
                )
        keep = set(names)
        examples = [e for e in self.examples if e.persona in keep]
        ids = {e.id for e in examples}
        return Dataset(examples, {i: g for i, g in self.gold.items() if i in ids},
                       {i: s for i, s in self.source.items() if i in ids})


# ---------------------------------------------------------------- value parsing

_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


def _parse_bool(value: Any, where: str, name: str) -> bool | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise UserError(f"{where}: field '{name}': expected true/false, got {value!r}")


def _text(row: dict, name: str, where: str, required: bool) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, float) and value != value):  # NaN from parquet/csv
        value = ""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name in ("id", "group", "key"):
        value = str(value)
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{name}': expected text, got {type(value).__name__}")
    if required and not value.strip():
        raise UserError(f"{where}: field '{name}': missing or empty")
    if len(value) > MAX_TEXT:
        raise UserError(f"{where}: field '{name}': {len(value):,} characters, more than {MAX_TEXT:,}")
    return value


def _optional(row: dict, name: str, where: str) -> str | None:
    text = _text(row, name, where, required=False)
    return text if text.strip() else None


def _scalar(value: Any, where: str, name: str, required: bool) -> str | None:
    """A key-like field (id, group, answer): text or a number, never null/list/object."""
    if value is None:
        if required:
            raise UserError(f"{where}: field '{name}': must be text or a number, got null")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"{where}: field '{name}': must be text or a number, got {type(value).__name__}")
    return str(value)


# ---------------------------------------------------------------- row readers


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8-sig") as handle:  # a leading BOM (Excel, Windows) is fine
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg} column {err.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def read_csv(path: Path, check_header: Callable[[list[str]], None]) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a CSV file with a header; malformed CSV (an unterminated quote, a
    field over the csv module's limit, a ragged row) is a one-line error naming file and line."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, strict=True)
        try:
            if not reader.fieldnames:
                return
            check_header(reader.fieldnames)
            for row in reader:
                if None in row:
                    raise UserError(f"{path}:{reader.line_num}: more values than header columns")
                yield reader.line_num, row
        except csv.Error as err:  # line_num is the last row read; the bad one begins after it
            raise UserError(f"{path}:{reader.line_num + 1}: not valid CSV ({err})") from None


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    def check(header: list[str]) -> None:
        if "id" not in header or not set(header) & {"claim", "response_a", "response", "statement"}:
            raise UserError(f"{path}:1: header must name the columns, with at least 'id' and 'claim' "
                            f"(found {', '.join(header)[:200]})")

    return read_csv(path, check)


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield number, row


# ---------------------------------------------------------------- formats


def _native(path: Path, rows: Iterator[tuple[int, dict]]) -> Iterator[tuple[str, Example, bool | None]]:
    for number, row in rows:
        where = f"{path}:{number}"
        persona = _optional(row, "persona", where) or path.stem
        has_pair = any(row.get(k) not in (None, "") for k in ("response_a", "response_b"))
        if not has_pair and row.get("response") not in (None, ""):
            kind = "response"
            question = _text(row, "prompt", where, required=False) or _text(
                row, "question", where, required=True)
            extra = dict(response=_text(row, "response", where, True))
            claim = ""
        elif has_pair:
            kind: Kind = "comparison"
            question = _text(row, "prompt", where, required=False) or _text(
                row, "question", where, required=True)
            extra = dict(response_a=_text(row, "response_a", where, True),
                         response_b=_text(row, "response_b", where, True))
            claim = ""
        else:
            kind = "claim"
            question = _text(row, "question", where, required=False)
            claim = _text(row, "claim", where, required=True)
            extra = {}
        example = Example(
            id=_text(row, "id", where, required=True).strip(),
            persona=persona,
            kind=kind,
            claim=claim,
            question=question,
            group=_optional(row, "group", where),
            key=_optional(row, "key", where),
            **extra,
        )
        yield where, example, _parse_bool(row.get("gold"), where, "gold")


def _anthropic(path: Path, rows: Iterator[tuple[int, dict]]) -> Iterator[tuple[str, Example, bool | None]]:
    for number, row in rows:
        where = f"{path}:{number}"
        statement = _text(row, "statement", where, required=True)
        answer = row.get("answer_matching_behavior")
        if answer is None:
            gold = None
        elif isinstance(answer, str) and answer.strip().lower() in ("yes", "no"):
            gold = answer.strip().lower() == "yes"
        else:
            raise UserError(f"{where}: field 'answer_matching_behavior': expected ' Yes' or ' No', "
                            f"got {answer!r}")
        yield where, Example(id=f"{path.stem}-{number:04d}", persona=path.stem, kind="claim",
                             claim=statement), gold


def _icm_reference(path: Path) -> Iterator[tuple[str, Example, bool | None]]:
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg} column {err.colno})") from None
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a JSON list of examples (reference ICM format)")
    for index, row in enumerate(items):
        where = f"{path}:item {index}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
        question = _text(row, "question", where, required=True)
        choice = _text(row, "choice", where, required=True)
        choice_2 = _optional(row, "choice_2", where)
        if "consistency_id" not in row:
            raise UserError(f"{where}: field 'consistency_id': missing")
        group = _scalar(row["consistency_id"], where, "consistency_id", required=True)
        key = _scalar(row.get("answer"), where, "answer", required=False)
        uid = (_scalar(row.get("uid", row.get("id")), where, "uid", required=False)
               or f"{path.stem}-{index:05d}")
        if choice_2 is not None:
            example = Example(id=str(uid), persona=path.stem, kind="comparison", question=question,
                              response_a=choice, response_b=choice_2, group=group, key=key)
        else:
            example = Example(id=str(uid), persona=path.stem, kind="claim", question=question,
                              claim=choice, group=group, key=key)
        yield where, example, _parse_bool(row.get("label"), where, "label")


def _detect(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "icm"
    if suffix in (".csv", ".parquet"):
        return "native"
    for _, row in _json_lines(path):
        return "anthropic" if "statement" in row and "claim" not in row else "native"
    return "native"


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given; a directory stands for its supported data files, sorted."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
            if not found:
                raise UserError(f"{path}: directory has no data files ({', '.join(SUPPORTED_SUFFIXES)})")
            out.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise UserError(f"{path}: unsupported file type '{path.suffix}' "
                                f"(use {', '.join(SUPPORTED_SUFFIXES)})")
            out.append(path)
        else:
            raise UserError(f"{path}: no such file or directory")
    return out


def load_file(path: Path, fmt: str = "auto", persona: str | None = None) -> Dataset:
    if fmt not in FORMATS:
        raise UserError(f"unknown data format '{fmt}' (use one of {', '.join(FORMATS)})")
    suffix = path.suffix.lower()
    try:
        fmt = _detect(path) if fmt == "auto" else fmt
        if fmt == "icm":
            records = _icm_reference(path)
        else:
            rows = {".csv": _csv_rows, ".parquet": _parquet_rows}.get(suffix, _json_lines)(path)
            records = (_anthropic if fmt == "anthropic" else _native)(path, rows)
        dataset = _collect(records, persona)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if not dataset.examples:
        raise UserError(f"{path}: empty file (no examples)")
    return dataset


def _collect(records: Iterator[tuple[str, Example, bool | None]], persona: str | None) -> Dataset:
    dataset = Dataset([])
    for where, example, gold in records:
        if persona:
            example = replace(example, persona=persona)
        if example.id in dataset.source:
            raise UserError(f"{where}: field 'id': duplicate id '{example.id}' "
                            f"(first at {dataset.source[example.id]})")
        dataset.examples.append(example)
        dataset.source[example.id] = where
        if gold is not None:
            dataset.gold[example.id] = gold
    return dataset


def dataset_from_rows(rows: list[dict], name: str, persona: str) -> Dataset:
    """Native rows that did not come from a file (an HTTP body), checked exactly as a file's rows
    are; errors name `name` and the row number (from 1)."""
    return _collect(_native(Path(name), enumerate(rows, start=1)), persona)


def load_datasets(paths: list[str | Path], fmt: str = "auto", persona: str | None = None) -> Dataset:
    merged = Dataset([])
    files: dict[Path, Path] = {}
    for path in expand_paths(paths):
        if Path(path).resolve() in files:
            raise UserError(f"{path}: given twice (also as {files[Path(path).resolve()]})")
        files[Path(path).resolve()] = Path(path)
        part = load_file(path, fmt, persona)
        for example in part.examples:
            if example.id in merged.source:
                first = merged.source[example.id]
                hint = ("; two files of the same name: ids made from the file name (Anthropic "
                        "format) clash, rename one" if Path(first.rsplit(":", 1)[0]).name
                        == Path(path).name else "")
                raise UserError(f"{part.source[example.id]}: field 'id': duplicate id "
                                f"'{example.id}' (first at {first}){hint}")
        merged.examples.extend(part.examples)
        merged.gold.update(part.gold)
        merged.source.update(part.source)
    return merged


# ---------------------------------------------------------------- personas

_VERBS = {"subscribes", "believes", "has", "is", "likes", "wants", "thinks", "cares", "loves",
          "supports", "values", "follows", "holds", "prefers", "desires"}


def default_description(name: str) -> str:
    """'subscribes-to-Islam' -> 'subscribes to Islam'; 'politically-liberal' -> 'is politically liberal'."""
    words = re.sub(r"[-_]+", " ", name).strip()
    first = words.split(" ", 1)[0].lower()
    if first in _VERBS:
        return words
    if first.endswith(("ness", "ism", "ity")):
        return f"shows {words}"
    return f"is {words}"


def read_yaml(path: Path) -> Any:
    """A YAML (or JSON) file's content; bad YAML or non-UTF-8 text is a one-line error."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: not valid YAML/JSON ({getattr(err, 'problem', err)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


def load_personas(path: str | Path | None) -> dict[str, Persona]:
    """Persona definitions from YAML/JSON: {personas: [{name, description}]} or {name: description}."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such persona file")
    raw = read_yaml(path)
    if isinstance(raw, dict) and "personas" in raw:
        raw = raw["personas"]
    items: list[tuple[str, Any]]
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list):
        items = []
        for index, entry in enumerate(raw):
            if not isinstance(entry, dict) or "name" not in entry:
                raise UserError(f"{path}: persona {index}: field 'name': missing")
            items.append((entry["name"], entry.get("description")))
    else:
        raise UserError(f"{path}: expected a list of personas or a mapping name -> description")
    personas = {}
    for name, description in items:
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{path}: persona name must be non-empty text, got {name!r}")
        if description is None:
            description = default_description(name)
        if not isinstance(description, str) or not description.strip():
            raise UserError(f"{path}: persona '{name}': field 'description': expected text")
        personas[name] = Persona(name, description.strip())
    return personas


def resolve_persona(name: str, definitions: dict[str, Persona]) -> Persona:
    return definitions.get(name) or Persona(name, default_description(name))


def demo_data_dir() -> Path:
    return Path(__file__).parent / "demo_data"


def load_demo() -> tuple[Dataset, dict[str, Persona]]:
    """The built-in demo: three personas written for this project, with gold labels."""
    folder = demo_data_dir()
    return (load_datasets(sorted(folder.glob("*.jsonl"))),
            load_personas(folder / "personas.yaml"))
