"""The search space: which SearchConfig fields a tuning run varies, and how.

A space is a mapping from a `search` field of the run config to a distribution or a fixed
value (YAML, see the README):

    alpha: {loguniform: [1, 50]}
    temperature_schedule: {choice: [log, exponential, linear]}
    seed_labels: {randint: [4, 12]}        # both ends included
    cooling_rate: {uniform: [0.05, 1.0]}
    final_alpha: {grid: [5, 50]}           # every value, for every sample
    inconsistency_weight: 2.0              # fixed for every trial

Each end of a range and each listed value is checked against SearchConfig before anything
starts, so a bad space fails in one line naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from icm_ray.data import read_yaml
from icm_ray.errors import UserError
from icm_ray.search import SearchConfig

# Not tunable here: the budget is the same for every trial (ASHA compares like with like),
# and tuning the seed would only fit noise.
FIXED_FIELDS = ("iterations", "seed")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")

# The built-in space: the schedules of issue 5. A lower alpha is the lever the 135M model
# needs (adding a label lowers mean P by 0.1-0.4, so at alpha 50 the search stalls).
DEFAULT_SPACE: dict[str, Any] = {
    "alpha": {"loguniform": [1.0, 50.0]},
    "final_alpha": {"loguniform": [1.0, 50.0]},
    "temperature_schedule": {"choice": ["log", "exponential", "linear"]},
    "initial_temperature": {"loguniform": [0.5, 20.0]},
    "cooling_rate": {"uniform": [0.05, 1.0]},
    "seed_labels": {"choice": [4, 8, 12]},
}


def _values_to_check(name: str, spec: Any, where: str) -> list[Any]:
    """The values a spec can produce at its edges (range ends, every listed value)."""
    if not isinstance(spec, dict):
        return [spec]
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise UserError(f"{where}: field '{name}': expected a value or one of "
                        f"{{{', '.join(d + ': ...' for d in DISTRIBUTIONS)}}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise UserError(f"{where}: field '{name}': {kind} needs a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        return list(args)
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise UserError(f"{where}: field '{name}': {kind} needs [low, high] numbers, got {args!r}")
    low, high = args
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise UserError(f"{where}: field '{name}': randint needs whole numbers, got {args!r}")
    if low > high or (kind != "randint" and low == high):
        raise UserError(f"{where}: field '{name}': {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"{where}: field '{name}': loguniform needs low > 0, got {args!r}")
    return [low, high]


def validate_space(space: Any, base: SearchConfig, where: str = "search space") -> dict[str, Any]:
    """Check every field and every edge value against SearchConfig; returns the space."""
    if not isinstance(space, dict) or not space:
        raise UserError(f"{where}: expected a mapping of search fields to distributions or values")
    known = set(SearchConfig.model_fields)
    fixed = {k: v for k, v in space.items() if not isinstance(v, dict)}
    for name, spec in space.items():
        if name in FIXED_FIELDS:
            raise UserError(f"{where}: field '{name}': not tunable (set it with --{name} or --config)")
        if name not in known:
            raise UserError(f"{where}: field '{name}': not a search setting "
                            f"(one of {', '.join(sorted(known - set(FIXED_FIELDS)))})")
        for value in _values_to_check(name, spec, where):
            try:
                SearchConfig.model_validate({**base.model_dump(), **fixed, name: value})
            except ValidationError as err:
                first = err.errors()[0]
                raise UserError(f"{where}: field '{name}': value {value!r}: {first['msg']}") from None
    return space


def load_space(path: str | Path | None, base: SearchConfig) -> dict[str, Any]:
    """The space from a YAML/JSON file (optionally under a `search:` key), or the built-in one."""
    if path is None:
        return validate_space(DEFAULT_SPACE, base, "built-in space")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such space file")
    raw = read_yaml(path)
    if isinstance(raw, dict) and set(raw) == {"search"}:
        raw = raw["search"]
    return validate_space(raw, base, str(path))


def has_grid(space: dict[str, Any]) -> bool:
    return any(isinstance(v, dict) and "grid" in v for v in space.values())


def to_tune(space: dict[str, Any]) -> dict[str, Any]:
    """Ray Tune's param_space for a validated space."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, spec in space.items():
        if not isinstance(spec, dict):
            out[name] = spec
            continue
        kind, args = next(iter(spec.items()))
        out[name] = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                     "randint": lambda a: tune.randint(a[0], a[1] + 1),  # Tune excludes the top
                     "choice": tune.choice, "grid": tune.grid_search}[kind](args)
    return out
