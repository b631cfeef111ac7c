"""Typed reading of a JSON object (a checkpoint's quantization_config, bitsmoe_vllm/format.py): every error names the
full key path and what was expected."""

import math
from collections.abc import Mapping
from typing import Any


class Reader:
    """Typed access to one JSON object; every error names the full key path."""

    def __init__(self, d: Any, where: str):
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected an object, found {type(d).__name__}")
        self.d, self.where = d, where

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if key.isidentifier() else f"{self.where}[{key!r}]"

    def child(self, key: str) -> "Reader":
        return Reader(self.get(key, dict), self.path(key))

    def get(self, key: str, types: type | tuple[type, ...]) -> Any:
        if key not in self.d:
            raise ValueError(f"{self.path(key)}: missing key")
        value = self.d[key]
        if (isinstance(value, bool) and types is not bool) or not isinstance(value, types):
            raise ValueError(f"{self.path(key)}: expected {type_names(types)}, found {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.path(key)}: expected a finite number, found {value!r}")
        return value

    def positive_int(self, key: str) -> int:
        value = self.get(key, int)
        if value <= 0:
            raise ValueError(f"{self.path(key)}: expected a positive integer, found {value}")
        return value

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.get(key, str)
        if value not in allowed:
            raise ValueError(f"{self.path(key)}: expected one of {list(allowed)}, found {value!r}")
        return value

    def int_list(self, key: str, allowed: tuple[int, ...] | None = None) -> list[int]:
        values = self.get(key, list)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (allowed is not None and v not in allowed):
                expected = f"values in {list(allowed)}" if allowed is not None else "non-negative integers"
                raise ValueError(f"{self.path(key)}: expected {expected}, found {v!r}")
        return values


def type_names(types: type | tuple[type, ...]) -> str:
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "an object",
        list: "a list",
    }
    return " or ".join(names.get(t, t.__name__) for t in (types if isinstance(types, tuple) else (types,)))
