"""Run directories: results and checkpoints, written atomically.

Every write goes to a temporary name in the same directory and is renamed into place, so a
reader (or a resumed run) never sees a truncated file. `summary.json` is written last: a
run directory without it is unfinished.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from icm_ray.errors import UserError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A persona name or run id as one path component: no slashes, no '..', no control chars.

    Names that had to change get a short hash so two different names never collide.
    """
    cleaned = _UNSAFE.sub("_", name).strip("._") or "_"
    if cleaned != name:
        cleaned = f"{cleaned[:80]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return cleaned


def open_store(uri: str | Path) -> RunStore:
    """The store for a run directory (local now; s3:// URIs get their own store)."""
    return RunStore(uri)


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        self.uri = str(self.root)

    def clear(self) -> None:
        """Remove everything in the run directory (for --overwrite)."""
        import shutil

        if self.root.is_dir():
            shutil.rmtree(self.root)

    def path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def write_bytes(self, name: str, data: bytes) -> None:
        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def read_bytes(self, name: str) -> bytes:
        try:
            return self.path(name).read_bytes()
        except FileNotFoundError:
            raise UserError(f"{self.path(name)}: not found") from None

    def write_json(self, name: str, value: Any) -> None:
        self.write_bytes(name, json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8"))

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read_bytes(name))
        except json.JSONDecodeError as err:
            raise UserError(f"{self.path(name)}: corrupt JSON ({err.msg})") from None

    def write_jsonl(self, name: str, rows: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        self.write_bytes(name, text.encode("utf-8"))

    def write_parquet(self, name: str, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> None:
        table = pa.Table.from_pylist(rows, schema=schema)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.write_bytes(name, buffer.getvalue())

    def read_parquet(self, name: str) -> list[dict[str, Any]]:
        return pq.read_table(io.BytesIO(self.read_bytes(name))).to_pylist()
