"""Masking sensitive payload fields in everything the admin API returns.

A field is sensitive when its name, normalised to snake_case, is one of the sensitive names
or has one as a ``_``-separated part at its start or end (``password``, ``db_password``,
``cardNumber``, ``card-number``, ``api_key_v2``). Its value, whatever its type, becomes
``"***"``. Free text (errors, reasons) is masked twice over: ``name=value`` / ``name: value``
/ ``"name": "value"`` pairs, and any literal value that appears under a sensitive field
elsewhere in the same run (a card number that an exception message repeats).

On top of the names, a saga's declared sensitive paths (``Saga(sensitive=["card.number"])``)
are masked wherever they point, whatever the field is called: :meth:`Masker.run` reads them
from the definition when there is one, and otherwise from the run's own ``run.started``
history entry, so a reader with no saga definitions (the CLI, a standalone admin server)
masks them too.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from sagaway import Saga, SagaRun
from sagaway.definition.sensitive import Redactor
from sagaway.errors import DefinitionError

__all__ = ["DEFAULT_SENSITIVE_FIELDS", "MASK", "Masker"]

MASK = "***"

DEFAULT_SENSITIVE_FIELDS: frozenset[str] = frozenset({
    "access_token",
    "account_number",
    "api_key",
    "authorization",
    "card_number",
    "client_secret",
    "cvc",
    "cvv",
    "iban",
    "passwd",
    "password",
    "pin",
    "private_key",
    "refresh_token",
    "secret",
    "ssn",
    "token",
})
"""Field names masked by default; ``create_app(sensitive_fields=…)`` adds to them."""

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[\s.\-]+")
_MIN_SECRET_LEN = 4
"""Shorter values (a 3-digit CVV) are masked in their field but not searched for in text:
replacing every "123" in an error message would hide more than it protects."""


def normalise(name: str) -> str:
    """``cardNumber`` / ``Card-Number`` / ``card number`` → ``card_number``."""
    return _SEPARATORS.sub("_", _CAMEL.sub("_", name.strip())).lower()


class Masker:
    """Masks sensitive fields (by name) and their values (in free text) in JSON data."""

    def __init__(self, extra: Iterable[str] = (), *, paths: Iterable[str] = ()) -> None:
        names = {normalise(n) for n in (*DEFAULT_SENSITIVE_FIELDS, *extra) if n.strip()}
        self.fields: frozenset[str] = frozenset(names)
        self.paths: tuple[str, ...] = Redactor(paths).paths  # validated now
        self._seen: dict[str, bool] = {}
        # Any ``name=value`` / ``name: value`` pair in text; the name decides (is_sensitive).
        self._pairs = re.compile(
            r"""(?P<key>(?P<q>["']?)(?<![\w-])(?P<name>[A-Za-z_][\w-]*)(?P=q)\s*[:=]\s*)"""
            r"""(?P<value>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s,;&)}\]]+)""",
        )

    def is_sensitive(self, key: str) -> bool:
        """Whether a field of this name is masked."""
        known = self._seen.get(key)
        if known is None:
            norm = normalise(key)
            known = any(norm == n or norm.startswith(f"{n}_") or norm.endswith(f"_{n}")
                        or f"_{n}_" in norm for n in self.fields)
            if len(self._seen) < 10_000:  # field names are few; bound it against odd input
                self._seen[key] = known
        return known

    def secrets(self, *data: Any) -> frozenset[str]:
        """The literal values held under sensitive fields anywhere in ``data``."""
        found: set[str] = set()

        def collect(value: Any, hidden: bool) -> None:
            if isinstance(value, Mapping):
                for k, v in value.items():
                    collect(v, hidden or (isinstance(k, str) and self.is_sensitive(k)))
            elif isinstance(value, list | tuple):
                for v in value:
                    collect(v, hidden)
            elif hidden and isinstance(value, str | int | float) and not isinstance(value, bool):
                text = str(value)
                if len(text) >= _MIN_SECRET_LEN:
                    found.add(text)

        for item in data:
            collect(item, False)
        return frozenset(found)

    def text(self, text: str, secrets: Iterable[str] = ()) -> str:
        """Mask ``name=value`` pairs and known secret values in free text."""

        def pair(m: re.Match[str]) -> str:
            if not self.is_sensitive(m.group("name")):
                return m.group(0)
            value = m.group("value")
            quote = value[0] if value[:1] in ("'", '"') else ""
            return f"{m.group('key')}{quote}{MASK}{quote}"

        masked = self._pairs.sub(pair, text)
        for secret in sorted(secrets, key=len, reverse=True):
            masked = masked.replace(secret, MASK)
        return masked

    def data(self, value: Any, secrets: Iterable[str] = ()) -> Any:
        """A copy of JSON data with sensitive fields replaced by ``"***"`` and strings masked.

        Keys are kept (so a reader sees that a card number was there); only values change.
        """
        known = frozenset(secrets)

        def walk(v: Any) -> Any:
            if isinstance(v, Mapping):
                return {k: MASK if isinstance(k, str) and self.is_sensitive(k) else walk(item)
                        for k, item in v.items()}
            if isinstance(v, list | tuple):
                return [walk(item) for item in v]
            if isinstance(v, str):
                return self.text(v, known)
            return v

        return walk(value)

    def redactor(self, run: SagaRun, definition: Saga | None = None) -> Redactor:
        """The sensitive paths of this run: configured, declared by its definition, and
        recorded in its ``run.started`` entry."""
        paths = list(self.paths)
        if definition is not None:
            paths += definition.sensitive
        for entry in run.history:
            if entry.kind == "run.started" and entry.data:
                recorded = entry.data.get("sensitive")
                if isinstance(recorded, list):
                    paths += [p for p in recorded if isinstance(p, str)]
        try:
            return Redactor(paths)
        except DefinitionError:  # a hand-edited record: keep the paths that parse
            good = []
            for p in paths:
                try:
                    good.append(Redactor([p]).paths[0])
                except DefinitionError:
                    continue
            return Redactor(good)

    def run(self, run: SagaRun, definition: Saga | None = None) -> SagaRun:
        """A copy of a run snapshot with every sensitive field and value masked: input,
        results, each step's result and error, the error, the request and the timeline."""
        r = self.redactor(run, definition)
        history_data = [h.data for h in run.history if h.data]
        secrets = self.secrets(run.input, run.results, run.steps or {}, history_data)
        secrets |= r.secrets(run.input, run.results)
        steps = None
        if run.steps is not None:
            steps = {}
            for name, state in run.steps.items():
                state = dict(state)
                if "result" in state:
                    state["result"] = r.results({name: state["result"]})[name]
                steps[name] = self.data(state, secrets)
        return dataclasses.replace(
            run,
            input=self.data(r.input(run.input), secrets),
            results=self.data(r.results(run.results), secrets),
            error=None if run.error is None else self.text(run.error, secrets),
            history=tuple(dataclasses.replace(h, data=self.data(h.data, secrets))
                          if h.data else h for h in run.history),
            steps=steps,
            request=None if run.request is None else self.data(run.request, secrets),
        )
