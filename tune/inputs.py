"""A trial's inputs: the personas' search pools, held-out parts and the optional gold file."""

from __future__ import annotations

from pathlib import Path

from icm_ray.data import Dataset, Persona
from icm_ray.errors import UserError
from icm_ray.labelfile import load_labels
from icm_ray_tune.objectives import PersonaTask, split_heldout


def load_gold(path: str | Path, dataset: Dataset) -> dict[str, bool]:
    """Gold labels for ids of the data: rows with `id` and `gold` (other fields are ignored)."""
    gold, _ = load_labels(path, [e.id for e in dataset.examples], "the tuned data", column="gold")
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
