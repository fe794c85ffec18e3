"""Pydantic field types shared by the config models (run config, search settings)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError


def _not_a_boolean(value: Any) -> Any:
    # pydantic's int takes True/False as 1/0, so `max_tail: true` in YAML would pass as 1.
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer, not {value}",
                                  {"value": str(value).lower()})
    return value


# An int that refuses booleans; otherwise as pydantic's int (YAML integers, numpy integers
# from Tune's samplers), so only the boolean mistake is newly an error.
Integer = Annotated[int, BeforeValidator(_not_a_boolean)]
