"""HTTP steps as data: the request a step (or its compensation) makes, with a URL template.

Pure: nothing here opens a socket. ``Saga.http_step`` builds :class:`HttpCall` markers; the
runtime hands them to ``sagaway.invokers.http``, which renders the template against the
orchestrator's configured base URLs and sends the request.

A URL template starts with the service's name in braces, ``{inventory}``, which the
orchestrator replaces with that service's base URL (``Orchestrator(services={...})`` or the
``SAGAWAY_SERVICE_INVENTORY`` environment variable). The rest may name:

* ``{input[order_id]}``: a field of the run's input (``[0]`` indexes a list);
* ``{results[reserve][id]}``: a field of an earlier step's result;
* ``{result[reservation_id]}``: in a compensation, a field of this step's action result;
* ``{run_id}``, ``{step}``: the run's id and the step's name.

Values are percent-encoded as one path segment, so an input cannot change the URL's shape.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from sagaway.errors import DefinitionError

__all__ = ["HTTP_METHODS", "HttpCall", "TemplateError", "parse_template", "render_path"]

HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
"""Methods that send a body by default (the others send none unless ``json=`` says so)."""

_SERVICE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")
_ROOTS = frozenset({"input", "results", "result", "run_id", "step"})
_SCALARS = frozenset({"run_id", "step"})
_INDEX = re.compile(r"\[([^\[\]]*)\]")

# One piece of a parsed template: literal text, or a field as (root, keys).
Piece = str | tuple[str, tuple[str, ...]]


class TemplateError(Exception):
    """A template field cannot be rendered for this run (a missing key, an unknown result)."""

    def __init__(self, message: str, *, root: str) -> None:
        super().__init__(message)
        self.root = root


@dataclass(frozen=True, slots=True)
class HttpCall:
    """A step's action (or compensation) carried out as one HTTP request.

    Built by ``Saga.http_step``; the runtime sends it through the HTTP invoker.
    """

    method: str
    url: str
    """The template as written, e.g. ``{inventory}/reservations/{result[id]}``."""
    service: str
    """The service whose base URL the template starts with."""
    path: tuple[Piece, ...]
    """The rest of the template, parsed."""
    timeout: float
    json: Callable[..., Any] | None = None
    """Builds the body: ``(ctx, data)`` for an action, ``(ctx, data, result)`` for a
    compensation. ``None``: the default body (see ``Saga.http_step``)."""
    response_model: Any = None
    """A pydantic model the 2xx response body must match (actions only)."""
    compensating: bool = False

    def __call__(self, *args: Any) -> Any:
        raise TypeError(
            f"{self.method} {self.url} is an HTTP request: the orchestrator sends it; it "
            f"cannot be called in-process"
        )

    @property
    def __name__(self) -> str:
        # The definition's error messages name an action by its __name__.
        return f"{self.method} {self.url}"

    @property
    def uses_result(self) -> bool:
        """The URL names a field of the action's result."""
        return any(isinstance(p, tuple) and p[0] == "result" for p in self.path)

    def fields(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        for piece in self.path:
            if isinstance(piece, tuple):
                yield piece


def parse_template(template: str, *, where: str, compensation: bool
                   ) -> tuple[str, tuple[Piece, ...]]:
    """Split ``{service}/rest/{field}`` into the service name and the parsed rest.

    Raises:
        DefinitionError: the template does not start with ``{service}``, or names a field
            that does not exist (or ``result`` outside a compensation).
    """
    if not isinstance(template, str) or not template.startswith("{"):
        raise DefinitionError(
            f"{where}: the URL {template!r} must start with a service name in braces, e.g. "
            f"'{{inventory}}/reservations'; base URLs come from Orchestrator(services=...) "
            f"or SAGAWAY_SERVICE_<NAME>, not from the definition"
        )
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DefinitionError(f"{where}: the URL {template!r} is not a valid template: {exc}"
                              ) from None
    _, service, spec, conv = parsed[0]
    if not service or not _SERVICE.fullmatch(service) or service in _ROOTS or spec or conv:
        raise DefinitionError(
            f"{where}: the URL {template!r} must start with a service name in braces, e.g. "
            f"'{{inventory}}/reservations' (letters, digits, '_', '-'; not one of "
            f"{', '.join(sorted(_ROOTS))})"
        )
    pieces: list[Piece] = []
    first = True
    for literal, name, spec, conv in parsed:
        if literal:
            pieces.append(literal)
        if name is None:
            continue
        if first:
            first = False
            continue
        pieces.append(_parse_field(template, name, spec, conv, where=where,
                                   compensation=compensation))
    return service, tuple(pieces)


def _parse_field(template: str, name: str, spec: str | None, conv: str | None, *,
                 where: str, compensation: bool) -> tuple[str, tuple[str, ...]]:
    allowed = "input[…], results[step][…], run_id, step" + (", result[…]" if compensation
                                                           else "")
    if spec or conv:
        raise DefinitionError(f"{where}: field {{{name}}} in {template!r} has a format spec or "
                              f"conversion; templates take plain fields ({allowed})")
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[[^\[\]]*\])*)", name)
    if match is None:
        raise DefinitionError(
            f"{where}: field {{{name}}} in {template!r} is not a field sagaway knows; use "
            f"{allowed} (index with [key], not attributes)"
        )
    root, rest = match.group(1), match.group(2)
    keys = tuple(_INDEX.findall(rest))
    if root not in _ROOTS or (root == "result" and not compensation):
        hint = (" (result[…] is only known to a compensation; an action can use "
                "results[earlier_step][…])" if root == "result" else "")
        raise DefinitionError(
            f"{where}: field {{{name}}} in {template!r} is unknown{hint}; use {allowed}")
    if root in _SCALARS and keys:
        raise DefinitionError(f"{where}: {{{root}}} in {template!r} takes no index")
    if root == "results" and not keys:
        raise DefinitionError(f"{where}: {{results}} in {template!r} needs a step name, "
                              f"e.g. {{results[reserve][id]}}")
    if root == "result" and not keys:
        raise DefinitionError(f"{where}: {{result}} in {template!r} needs a key, "
                              f"e.g. {{result[id]}}")
    if any(not k for k in keys):
        raise DefinitionError(f"{where}: field {{{name}}} in {template!r} has an empty index")
    return root, keys


def render_path(call: HttpCall, values: dict[str, Any]) -> str:
    """The URL's path (everything after the base URL) with its fields filled in.

    Args:
        values: ``input``, ``results``, ``result`` (absent when unknown), ``run_id``, ``step``.

    Raises:
        TemplateError: a field's value is missing.
    """
    out: list[str] = []
    for piece in call.path:
        if isinstance(piece, str):
            out.append(piece)
            continue
        root, keys = piece
        if root not in values:
            raise TemplateError(f"{call.url}: {{{root}}} is not known for this call", root=root)
        value = values[root]
        walked = root
        for key in keys:
            value = _index(value, key)
            walked += f"[{key}]"
            if value is _MISSING:
                raise TemplateError(f"{call.url}: {{{walked}}} is missing", root=root)
        if value is None or isinstance(value, dict | list):
            kind = "null" if value is None else type(value).__name__
            raise TemplateError(f"{call.url}: {{{walked}}} is {kind}, not a value for a URL",
                                root=root)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out.append(quote(text, safe=""))
    return "".join(out)


_MISSING = object()


def _index(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return value.get(key, _MISSING)
    if isinstance(value, list) and key.lstrip("-").isdigit():
        i = int(key)
        return value[i] if -len(value) <= i < len(value) else _MISSING
    return _MISSING
