"""Checking configuration values: one error type and one way to turn YAML/CLI values into field types.

Every config class (MoEConfig, ViTConfig, TrainConfig) validates its own fields with these helpers,
so a bad value fails the same way from Python, YAML or the command line: a `ConfigError` that names
the field (with its prefix, e.g. `model.moe.top_k`) and what is allowed.
"""
from __future__ import annotations

import math
import reprlib
import typing
from typing import Any, Callable, Iterable

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def boolean_word(value: Any) -> Any:
    """A true/false field's value with the words YAML 1.1 read as booleans (yes/no/on/off, and
    true/false/1/0 as text) turned into the bool; anything else as it was, for the check to refuse."""
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    return value


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names the field and what is."""


SHOWN_CHARS = 80
"""A value quoted in an error is cut to this many characters (a YAML alias bomb, a 10 MB string)."""
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = SHOWN_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def show(value: Any, limit: int = SHOWN_CHARS) -> str:
    """`repr(value)` for an error message, bounded however large or deeply shared the value is (a
    nested list from YAML aliases is never expanded: reprlib stops at depth 3 and 8 items a level)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def divisors_text(n: Any, limit: int = 24) -> str:
    """'one of [1, 2, 3, 4, 6, 12]' for a positive int n, computed in O(sqrt n) steps and only for n up
    to 10**12 (at most a million steps); larger n: 'a divisor of N'."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return "a positive divisor"
    if n > 10**12:
        return f"a divisor of {n}"
    small, large, d = [], [], 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
        d += 1
    found = small + large[::-1]
    if len(found) <= limit:
        return f"one of {found}"
    return f"one of [{', '.join(map(str, found[:limit]))}, ...] ({len(found)} in all)"


class Fields:
    """Checks the fields of one config object in place, naming each as `prefix + name`."""

    def __init__(self, obj: Any, prefix: str = ""):
        self.obj, self.prefix = obj, prefix

    def fail(self, name: str, allowed: str | Callable[[], str]) -> typing.NoReturn:
        allowed = allowed() if callable(allowed) else allowed
        raise ConfigError(f"{self.prefix}{name}={show(getattr(self.obj, name))} is not allowed: {allowed}")

    def need(self, ok: bool, name: str, allowed: str | Callable[[], str]) -> None:
        """`allowed` may be a function: an expensive text is built only when the value fails."""
        if not ok:
            self.fail(name, allowed)

    def choice(self, name: str, options: Iterable[Any]) -> None:
        options = tuple(options)
        v = getattr(self.obj, name)
        if isinstance(v, str) and v.strip().lower() in options:
            v = v.strip().lower()
            setattr(self.obj, name, v)
        self.need(v in options, name, f"one of {', '.join(map(str, options))}")

    def integer(self, name: str, lo: int | None = None, hi: int | None = None, optional: bool = False) -> None:
        v = getattr(self.obj, name)
        if v is None and optional:
            return
        if isinstance(v, str):
            v = _parse(v, int)
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        allowed = _range_text("an integer", lo, hi, optional)
        self.need(isinstance(v, int) and not isinstance(v, bool), name, allowed)
        self.need((lo is None or v >= lo) and (hi is None or v <= hi), name, allowed)
        setattr(self.obj, name, v)

    def number(self, name: str, lo: float | None = None, hi: float | None = None, strict_lo: bool = False,
               strict_hi: bool = False, optional: bool = False) -> None:
        """A finite number in the range (NaN and infinities are never allowed)."""
        v = getattr(self.obj, name)
        if v is None and optional:
            return
        if isinstance(v, str):
            v = _parse(v, float)
        allowed = _range_text("a finite number", lo, hi, optional, strict_lo, strict_hi)
        self.need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), name, allowed)
        v = float(v)
        self.need(lo is None or (v > lo if strict_lo else v >= lo), name, allowed)
        self.need(hi is None or (v < hi if strict_hi else v <= hi), name, allowed)
        setattr(self.obj, name, v)

    def boolean(self, name: str) -> None:
        v = boolean_word(getattr(self.obj, name))
        self.need(isinstance(v, bool), name, "true or false")
        setattr(self.obj, name, v)


def _parse(text: str, kind: type) -> Any:
    try:
        return kind(text.strip())
    except ValueError:
        return text


def _range_text(what: str, lo, hi, optional: bool, strict_lo: bool = False, strict_hi: bool = False) -> str:
    if lo is not None and hi is not None:
        text = f"{what} in {'(' if strict_lo else '['}{lo}, {hi}{')' if strict_hi else ']'}"
    elif lo is not None:
        text = f"{what} {'>' if strict_lo else '>='} {lo}"
    elif hi is not None:
        text = f"{what} {'<' if strict_hi else '<='} {hi}"
    else:
        text = what
    return f"null or {text}" if optional else text
