"""Run directories on local disk or S3: results and checkpoints, written atomically.

Local writes go to a temporary name in the same directory and are renamed into place; S3
writes are single PUTs, which S3 makes visible only when complete. Either way a reader (or
a resumed run) never sees a truncated file. `summary.json` is written last: a run without
it is unfinished. S3 credentials, region and endpoint come from the standard AWS
environment and config files (AWS_ENDPOINT_URL points boto3 at any S3-compatible server).
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
# What a run writes (README "Outputs"): all that --overwrite removes.
RUN_ENTRIES = ("summary.json", "labels.parquet", "trace.parquet", "config.json", "inputs.json",
               "steering_examples", "checkpoints")
_UMASK = os.umask(0)
os.umask(_UMASK)


def safe_name(name: str) -> str:
    """A persona name or run id as one path component: no slashes, no '..', no control chars.

    Names that had to change get a short hash so two different names never collide.
    """
    cleaned = _UNSAFE.sub("_", name).strip("._") or "_"
    if cleaned != name:
        cleaned = f"{cleaned[:80]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return cleaned


def open_store(uri: str | Path) -> Store:
    """The store for a run: `s3://bucket/prefix` or a local directory."""
    text = str(uri)
    if text.startswith("s3://"):
        return S3Store(text)
    return RunStore(text)


def output_file(out: str) -> tuple[Store, str]:
    """(store, name) for one output file (local path or s3://bucket/key), checked before any
    work is done: a missing bucket, an unwritable directory or a directory in the way fail here."""
    parent, _, name = out.rstrip("/").rpartition("/")
    if not name:
        raise UserError(f"{out}: not a file name")
    store = open_store(parent or ".")
    if isinstance(store, RunStore) and store.path(name).is_dir():
        raise UserError(f"{store.path(name)}: is a directory; give a file name")
    if store.exists(name):  # it may be a data file or part of a run: never written over
        raise UserError(f"{out}: already exists; choose another --out (or remove it first)")
    store.check_writable()
    return store, name


class Store:
    """What every store offers; subclasses implement bytes in and out."""

    uri: str

    def write_bytes(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def is_empty(self) -> bool:
        raise NotImplementedError

    def check_writable(self) -> None:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    def write_json(self, name: str, value: Any) -> None:
        self.write_bytes(name, json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8"))

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read_bytes(name))
        except json.JSONDecodeError as err:
            raise UserError(f"{self.uri}/{name}: corrupt JSON ({err.msg})") from None

    def write_jsonl(self, name: str, rows: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        self.write_bytes(name, text.encode("utf-8"))

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        rows = []
        for number, line in enumerate(self.read_bytes(name).decode("utf-8", "replace").splitlines(), 1):
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as err:
                raise UserError(f"{self.uri}/{name}:{number}: corrupt JSON ({err.msg})") from None
            if row is not None:
                rows.append(row)
        return rows

    def write_parquet(self, name: str, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> None:
        table = pa.Table.from_pylist(rows, schema=schema)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.write_bytes(name, buffer.getvalue())

    def read_parquet(self, name: str) -> list[dict[str, Any]]:
        try:
            return pq.read_table(io.BytesIO(self.read_bytes(name))).to_pylist()
        except pa.ArrowException as err:
            raise UserError(f"{self.uri}/{name}: not a readable Parquet file ({err})") from None


class RunStore(Store):
    """A local run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        self.uri = str(self.root)

    def is_empty(self) -> bool:
        return not (self.root.is_dir() and any(self.root.iterdir()))

    def clear(self) -> None:
        """Remove a previous run's own files (for --overwrite), nothing else; refuses a
        directory that is not a run."""
        import shutil

        if not self.root.is_dir():
            return
        if not (self.exists("inputs.json") or self.exists("summary.json")):
            raise UserError(f"{self.root}: not an icm-ray run directory (no inputs.json); "
                            "refusing to delete it, choose another --out")
        try:
            for name in RUN_ENTRIES:
                path = self.root / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
            if not any(self.root.iterdir()):
                self.root.rmdir()
        except OSError as err:
            raise UserError(f"{self.root}: cannot remove the previous run ({err.strerror})") from None

    def path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def write_bytes(self, name: str, data: bytes) -> None:
        target = self.path(name)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        except OSError as err:
            raise UserError(f"{target.parent}: cannot write there ({err.strerror})") from None
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for sharing
            os.replace(temporary, target)
        except OSError as err:
            Path(temporary).unlink(missing_ok=True)
            raise UserError(f"{target}: cannot write there ({err.strerror})") from None
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def check_writable(self) -> None:
        """Fail now, in one line, if the run directory cannot be created or written."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root}: exists and is not a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe.", delete=True)
            probe.close()
        except OSError as err:
            raise UserError(f"{self.root}: cannot write there ({err.strerror})") from None

    def read_bytes(self, name: str) -> bytes:
        try:
            return self.path(name).read_bytes()
        except FileNotFoundError:
            raise UserError(f"{self.path(name)}: not found") from None


class S3Store(Store):
    """`s3://bucket/prefix`: one object per file, written with a single PUT."""

    def __init__(self, uri: str):
        import boto3
        from botocore.config import Config

        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise UserError(f"{uri}: no bucket name (use s3://bucket/prefix)")
        self.uri = uri.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = boto3.client("s3", config=Config(retries={"max_attempts": 3, "mode": "standard"}))
        self._call(self.client.head_bucket, Bucket=bucket)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, method, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return method(**kwargs)
        except NoCredentialsError:
            raise UserError(f"{self.uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID/"
                            "AWS_SECRET_ACCESS_KEY or a profile)") from None
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket"):
                if method.__name__ in ("head_bucket",) or code == "NoSuchBucket":
                    raise UserError(f"s3://{self.bucket}: bucket does not exist") from None
                raise FileNotFoundError(kwargs.get("Key")) from None
            if code in ("NoSuchKey",):
                raise FileNotFoundError(kwargs.get("Key")) from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise UserError(f"{self.uri}: access denied ({code}); check the AWS credentials") from None
            raise UserError(f"{self.uri}: S3 error {code}: {err}") from None
        except BotoCoreError as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{self.uri}: cannot reach S3 ({first})") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        self._call(self.client.put_object, Bucket=self.bucket, Key=self._key(name), Body=data)

    def read_bytes(self, name: str) -> bytes:
        try:
            response = self._call(self.client.get_object, Bucket=self.bucket, Key=self._key(name))
        except FileNotFoundError:
            raise UserError(f"{self.uri}/{name}: not found") from None
        return response["Body"].read()

    def exists(self, name: str) -> bool:
        try:
            self._call(self.client.head_object, Bucket=self.bucket, Key=self._key(name))
            return True
        except FileNotFoundError:
            return False

    def _keys(self) -> list[str]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys

    def is_empty(self) -> bool:
        return not self._keys()

    def check_writable(self) -> None:
        """The bucket was checked when the store opened; S3 has nothing more to probe."""

    def clear(self) -> None:
        if not (self.exists("inputs.json") or self.exists("summary.json")):
            raise UserError(f"{self.uri}: not an icm-ray run (no inputs.json); refusing to delete it")
        prefix = f"{self.prefix}/" if self.prefix else ""
        keys = [k for k in self._keys() if k[len(prefix):].split("/", 1)[0] in RUN_ENTRIES]
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start:start + 1000]]
            self._call(self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": chunk})
