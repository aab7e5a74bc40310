"""Parameter settings: a value that may vary by tensor name and by layer depth.

A setting is one of
- a scalar: ``0.5``;
- a gradient, a list of scalars: ``[0, 0.5, 1]``, read at the tensor's position ``t`` in its
  stack of layers (0 at the first layer, 1 at the last; 0 for tensors outside the layers).
  Numbers are interpolated linearly between neighbouring entries; booleans and strings are
  picked, not interpolated;
- conditions, a list of ``{tensors: PATTERN, value: SETTING}``: the first entry whose pattern
  matches the tensor name gives the value (an entry without ``tensors`` matches every tensor).
  When none matches, the setting says nothing and the next scope down decides.

These are mergekit's parameter values (its ``filter: self_attn`` is ``tensors: "*self_attn*"``),
so that mergekit configs translate one to one.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Callable

SCALARS = (bool, int, float, str)
_CONDITION_KEYS = {"tensors", "value"}


def tensor_matcher(pattern: str) -> Callable[[str], bool]:
    """Matcher for a tensor pattern: ``re:<regex>`` searches, anything else is a glob."""
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return lambda name: rx.search(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of ``setting`` for one tensor at layer position ``t``; None if it says nothing.

    Interpolation is done in Python floats, as mergekit does, so the same config gives the same
    bits."""
    if isinstance(setting, SCALARS):
        return setting
    if not setting:
        return None
    if all(isinstance(e, dict) for e in setting):
        for cond in setting:
            pattern = cond.get("tensors")
            if pattern is None or tensor_matcher(pattern)(tensor_name):
                return evaluate(cond["value"], tensor_name, t)
        return None
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


def check(setting: Any, where: str, check_scalar: Callable[[Any, str], bool],
          errors: list[str]) -> None:
    """Append to ``errors`` what is wrong with ``setting``; ``check_scalar(value, where)``
    validates each scalar (type, bounds, choices) and reports its own errors."""
    if isinstance(setting, SCALARS):
        check_scalar(setting, where)
        return
    if not isinstance(setting, list) or not setting:
        errors.append(f"{where}: expected a value, a list of values (a gradient over layers) or "
                      f"a list of {{tensors: PATTERN, value: ...}} conditions, got {setting!r}")
        return
    if all(isinstance(e, dict) for e in setting):
        for i, cond in enumerate(setting):
            extra = set(cond) - _CONDITION_KEYS
            if extra:
                errors.append(f"{where}[{i}]: unknown keys {', '.join(sorted(map(str, extra)))}; "
                              "a condition has tensors and value")
            pattern = cond.get("tensors")
            if pattern is not None:
                if not isinstance(pattern, str):
                    errors.append(f"{where}[{i}].tensors: expected a pattern string, "
                                  f"got {pattern!r}")
                else:
                    try:
                        tensor_matcher(pattern)
                    except re.error as e:
                        errors.append(f"{where}[{i}].tensors: invalid regex ({e})")
            if "value" not in cond:
                errors.append(f"{where}[{i}].value: missing required key")
            elif isinstance(cond["value"], list) and any(isinstance(e, dict)
                                                         for e in cond["value"]):
                errors.append(f"{where}[{i}].value: conditions cannot be nested")
            else:
                check(cond["value"], f"{where}[{i}].value", check_scalar, errors)
        return
    if any(not isinstance(e, SCALARS) for e in setting):
        errors.append(f"{where}: a gradient is a list of plain values, got {setting!r}")
        return
    for i, e in enumerate(setting):
        check_scalar(e, f"{where}[{i}]")
