"""Export a finished run's steering examples for training: SFT JSONL, DPO pairs, HF `datasets`.

- sft: one row per labelled example: `prompt` (persona header + the query, exactly as the
  search showed it) and `completion` (the verbalised ICM label, e.g. " True").
- dpo: `prompt`, `chosen`, `rejected`. For a claim: the ICM label's verbaliser vs the
  opposite one. For a comparison (prompt, response A, response B) the preferred response
  is chosen and the other rejected, with the comparison's own prompt.
- response (open-ended generation): sft keeps the endorsed responses as prompt -> response
  (under the persona's generation header); dpo pairs, for each prompt, every endorsed
  response (chosen) with every response the persona would not endorse (rejected).
- hf: a `datasets.Dataset` saved with `save_to_disk`: the sft and dpo columns plus id,
  persona, kind, text, label and confidence (needs `pip install 'icm-ray[export]'`).

Rows are in the run's order: persona by persona, most confident first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from icm_ray.errors import UserError

FORMATS = ("sft", "dpo", "hf")


def export_rows(run: str, personas: list[str] | None = None) -> list[dict[str, Any]]:
    """Every labelled example of the run (or of `personas`), with sft and dpo fields."""
    from icm_ray.engine import load_inputs
    from icm_ray.steering import load_run
    from icm_ray.store import open_store

    entries = load_run(run)
    for name in personas or []:
        if name not in entries:
            raise UserError(f"unknown persona '{name}': the run has {', '.join(entries) or 'no personas'}")
    _, dataset, _ = load_inputs(open_store(run))
    by_id = {e.id: e for e in dataset.examples}
    rows = []
    for name, entry in entries.items():
        if personas and name not in personas:
            continue
        true_text, false_text = entry.prompts.options
        for example in entry.examples:
            source = by_id[example.id]
            said, other = (true_text, false_text) if example.label else (false_text, true_text)
            prompt = entry.header + example.text
            row = {"id": example.id, "persona": name, "kind": source.kind, "text": example.text,
                   "label": example.label, "confidence": example.confidence,
                   "prompt": prompt, "completion": said, "chosen": said, "rejected": other,
                   "dpo_prompt": prompt}
            if source.kind == "response":
                ask = _generation_prompt(entry, source)
                row.update(prompt=ask, completion=" " + source.response, dpo_prompt=ask,
                           chosen=" " + source.response, rejected=None)
            if source.kind == "comparison":
                better, worse = ((source.response_a, source.response_b) if example.label
                                 else (source.response_b, source.response_a))
                row.update(dpo_prompt=source.question, chosen=better, rejected=worse)
            rows.append(row)
    if not rows:
        raise UserError(f"{run}: no labelled examples to export")
    return rows


def _generation_prompt(entry, source) -> str:
    """The generation example up to where the response starts (its leading space goes with it)."""
    text = entry.prompts.generation.format(claim=source.claim, question=source.question, response="\0",
                                           response_a=source.response_a, response_b=source.response_b)
    return entry.generation_header + text.partition("\0")[0].rstrip(" ")


def sft_records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"prompt": r["prompt"], "completion": r["completion"], "persona": r["persona"], "id": r["id"]}
            for r in rows if r["kind"] != "response" or r["label"]]  # generation: endorsed only


def dpo_records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = [{"prompt": r["dpo_prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
            "persona": r["persona"], "id": r["id"]} for r in rows if r["kind"] != "response"]
    by_prompt: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["kind"] == "response":
            by_prompt.setdefault((r["persona"], r["dpo_prompt"]), []).append(r)
    for (persona, prompt), group in by_prompt.items():
        for good in (r for r in group if r["label"]):
            for bad in (r for r in group if not r["label"]):
                out.append({"prompt": prompt, "chosen": good["chosen"], "rejected": bad["chosen"],
                            "persona": persona, "id": f"{good['id']}>{bad['id']}"})
    return out


def _write_jsonl(out: str, records: list[dict[str, Any]]) -> None:
    from icm_ray.store import output_file

    if not out.startswith("s3://") and Path(out).is_dir():
        raise UserError(f"--out {out!r}: give a file name, e.g. sft.jsonl")
    store, name = output_file(out)  # refuses an existing file
    store.write_jsonl(name, records)  # atomic: never a half-written file


def _save_hf(out: str, rows: list[dict[str, Any]]) -> None:
    if out.startswith("s3://"):
        raise UserError("--format hf writes a local directory; export to disk, then copy it to S3")
    try:
        import datasets
    except ImportError:
        raise UserError("--format hf needs the 'datasets' package: pip install 'icm-ray[export]'") from None
    target = Path(out).absolute()
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise UserError(f"{target}: already exists; choose another --out")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.")
    except OSError as err:
        raise UserError(f"{target.parent}: cannot write there ({err.strerror})") from None
    try:  # written under a temporary name, then renamed: never a half-written dataset
        datasets.disable_progress_bars()
        datasets.Dataset.from_list(rows).save_to_disk(staging)
        if target.is_dir():
            target.rmdir()
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export(run: str, fmt: str, out: str, personas: list[str] | None = None) -> int:
    """Write the export; returns the number of rows."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}' (use {', '.join(FORMATS)})")
    if not out or not out.strip():
        raise UserError("--out is empty; give a file (sft, dpo) or a directory (hf)")
    rows = export_rows(run, personas)
    if fmt in ("sft", "dpo"):
        records = (sft_records if fmt == "sft" else dpo_records)(rows)
        if not records:
            raise UserError(f"{run}: no {fmt} records (open-ended responses need endorsed ones, and dpo "
                            "needs a rejected response for the same prompt)")
        _write_jsonl(out, records)
        return len(records)
    else:
        _save_hf(out, rows)
    return len(rows)
