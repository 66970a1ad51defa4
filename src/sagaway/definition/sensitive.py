"""Sensitive fields: payload paths a saga declares secret, and the redaction that hides them.

``Saga("order", sensitive=["card.number", "customer.*.ssn", "results.charge.token"])``.
A path is dot-separated keys into the run's input; ``*`` matches any key or list item, a
number matches a list index. A path that starts with ``results.`` points into step results
instead: ``results.<step>.<path>`` (so an input key named ``results`` cannot be declared;
rename it or declare its children with ``*``).

The values found at those paths are the run's *secrets*. Documents are redacted by path
(the value becomes ``"***"``, whatever its type) and free text (error messages, log lines)
by value: every secret string of at least :data:`MIN_SECRET_CHARS` characters is replaced,
so an exception that repeats a card number is hidden too. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sagaway.errors import DefinitionError

__all__ = ["MASK", "MIN_SECRET_CHARS", "Redactor", "parse_path", "redact"]

MASK = "***"

MIN_SECRET_CHARS = 4
"""Shorter values (a 3-digit CVV) are masked in their field, but not searched for in free
text: replacing every "123" in a message would hide more than it protects."""

_RESULTS = "results"

Path = tuple[str, ...]


def parse_path(path: str) -> Path:
    """``"card.number"`` → ``("card", "number")``. Raises DefinitionError when malformed."""
    if not isinstance(path, str) or not path.strip():
        raise DefinitionError(f"a sensitive path must be a non-empty string, got {path!r}")
    parts = tuple(p.strip() for p in path.split("."))
    if any(not p for p in parts):
        raise DefinitionError(
            f"sensitive path {path!r} has an empty part: write keys separated by single dots, "
            f"e.g. 'card.number' or 'items.*.card'"
        )
    if parts[0] == _RESULTS and len(parts) < 3:
        raise DefinitionError(
            f"sensitive path {path!r}: a results path names a step and a field in its result, "
            f"e.g. 'results.charge.token'"
        )
    return parts


def _matches(part: str, key: Any) -> bool:
    return part == "*" or part == str(key)


def _mask_at(value: Any, path: Sequence[str]) -> Any:
    """A copy of ``value`` with whatever ``path`` reaches replaced by the mask."""
    if not path:
        return MASK
    head, rest = path[0], path[1:]
    if isinstance(value, Mapping):
        return {k: _mask_at(v, rest) if _matches(head, k) else v for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_at(v, rest) if _matches(head, i) else v for i, v in enumerate(value)]
    return value


def _leaves(value: Any, out: set[str]) -> None:
    if isinstance(value, Mapping):
        for v in value.values():
            _leaves(v, out)
    elif isinstance(value, list | tuple):
        for v in value:
            _leaves(v, out)
    elif isinstance(value, str | int | float) and not isinstance(value, bool):
        text = str(value)
        if len(text) >= MIN_SECRET_CHARS:
            out.add(text)


def _collect(value: Any, path: Sequence[str], out: set[str]) -> None:
    if not path:
        _leaves(value, out)
        return
    head, rest = path[0], path[1:]
    if isinstance(value, Mapping):
        for k, v in value.items():
            if _matches(head, k):
                _collect(v, rest, out)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            if _matches(head, i):
                _collect(v, rest, out)


class Redactor:
    """Hides the values at a saga's sensitive paths, in documents and in free text.

    Example::

        r = Redactor(["card.number"])
        r.input({"card": {"number": "4111111111111111"}})   # {"card": {"number": "***"}}
        secrets = r.secrets(data)
        r.text("declined: 4111111111111111", secrets)      # "declined: ***"
    """

    __slots__ = ("_input", "_results", "paths")

    def __init__(self, paths: Iterable[str] = ()) -> None:
        self.paths: tuple[str, ...] = tuple(dict.fromkeys(paths))
        parsed = [parse_path(p) for p in self.paths]
        self._input = [p for p in parsed if p[0] != _RESULTS]
        self._results = [p[1:] for p in parsed if p[0] == _RESULTS]

    def __bool__(self) -> bool:
        return bool(self.paths)

    def __repr__(self) -> str:
        return f"Redactor({list(self.paths)!r})"

    @property
    def covers_results(self) -> bool:
        """Some path points into step results (their secrets change as steps succeed)."""
        return bool(self._results)

    def secrets(self, input: Any, results: Mapping[str, Any] | None = None) -> frozenset[str]:
        """The literal values (as text) at the sensitive paths of this input and results."""
        found: set[str] = set()
        for path in self._input:
            _collect(input, path, found)
        if results:
            for path in self._results:
                _collect(results, path, found)
        return frozenset(found)

    def input(self, value: Any) -> Any:
        """A copy of a run input with its sensitive fields masked."""
        for path in self._input:
            value = _mask_at(value, path)
        return value

    def results(self, results: Mapping[str, Any]) -> Any:
        """A copy of step results (by step name) with their sensitive fields masked."""
        value: Any = results
        for path in self._results:
            value = _mask_at(value, path)
        return value

    @staticmethod
    def text(text: str, secrets: Iterable[str]) -> str:
        """``text`` with every secret value replaced by the mask (longest first)."""
        for secret in sorted(secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, MASK)
        return text


def redact(value: Any, paths: Iterable[str], *, input: Any = None,
           results: Mapping[str, Any] | None = None) -> Any:
    """Hide sensitive data: the hook for your own logs, spans and messages.

    ``paths`` is usually ``saga.sensitive``. A string is redacted by value: every secret
    found at ``paths`` in ``input`` (and ``results``) becomes ``"***"``
    (``redact(str(exc), order.sensitive, input=data)``). Anything else is taken as a run
    input: the values at ``paths`` become ``"***"``, and strings elsewhere in it lose any
    secret they repeat (``redact(data, order.sensitive)``).
    """
    redactor = Redactor(paths)
    if isinstance(value, str):
        return redactor.text(value, redactor.secrets(input, results))
    secrets = redactor.secrets(value, results)
    masked = redactor.input(value)

    def strings(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: strings(item) for k, item in v.items()}
        if isinstance(v, list | tuple):
            return [strings(item) for item in v]
        if isinstance(v, str):
            return redactor.text(v, secrets)
        return v

    return strings(masked)
