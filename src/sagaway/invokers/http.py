"""The HTTP invoker: sends a step's request with httpx and classifies the answer.

Pooled ``httpx.AsyncClient`` connections, one pool per service (opened with the
orchestrator, closed with it), carry every HTTP step, so connections are reused across runs
and a hanging service cannot take the connections other services need. Every attempt carries
``Idempotency-Key`` (the same on every attempt of the action, another for the
compensation), ``X-Correlation-Id`` (the run id), ``X-Sagaway-*`` facts about the attempt and
whatever headers the listeners' ``on_invoke`` returned (``traceparent``).

How an answer is read (``classify``), for an action:

======================================  =========  ================  =====================
answer                                  retried    possibly applied  then
======================================  =========  ================  =====================
2xx (body matches ``response_model``)   —          yes               step succeeded
2xx, body does not match the model      no         yes               compensate
4xx except 408/409/425/429              no         no                compensate the others
408, 425, 429 (not processed)           yes        no                per the retry policy
409 (a request with this key is busy)   yes        no                per the retry policy
5xx                                     yes        yes               per the retry policy
connection refused, DNS, pool full      yes        no                per the retry policy
timeout, connection cut mid-request     yes        yes               per the retry policy
1xx/3xx (redirects are not followed)    no         no                compensate the others
======================================  =========  ================  =====================

For a compensation, 2xx and also 404/410 (nothing to undo) count as undone; any other 4xx
(but 408/409/425/429) is a refusal that retrying cannot change, so the run ends FAILED at
once for an operator; everything else is retried by the compensation's policy.

A ``Retry-After`` on a retried answer is passed on (``InvocationFailed.retry_after``): the
decider waits at least that long before the next attempt, within the policy's cap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sagaway.definition.http import BODY_METHODS, HttpCall, TemplateError, render_path
from sagaway.definition.saga import Saga, StepContext, idempotency_key
from sagaway.errors import DefinitionError
from sagaway.invokers import InvocationFailed

if TYPE_CHECKING:
    import httpx

__all__ = ["HttpInvoker", "Verdict", "classify", "env_var", "parse_retry_after",
           "resolve_services"]

_NOT_PROCESSED = frozenset({408, 425, 429})
"""The server says it did not process the request: retry, nothing to undo."""
_EXCERPT = 200
_NO_BODY = object()


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one HTTP answer means for the attempt."""

    ok: bool
    retryable: bool = False
    maybe_applied: bool = False
    note: str = ""


def classify(status: int, *, compensating: bool) -> Verdict:
    """Read a status code (the table in the module docstring)."""
    if 200 <= status < 300:
        return Verdict(True, maybe_applied=True)
    if compensating and status in (404, 410):
        return Verdict(True, note="nothing to undo")
    if status in _NOT_PROCESSED:
        return Verdict(False, retryable=True, note="not processed")
    if status == 409:
        return Verdict(False, retryable=True, note="conflict")
    if 400 <= status < 500:
        return Verdict(False, note="refused" if compensating else "business failure")
    if 500 <= status < 600:
        return Verdict(False, retryable=True, maybe_applied=True, note="server error")
    return Verdict(False, note="unexpected status (redirects are not followed: point the "
                               "service's base URL at the final address)")


def env_var(service: str) -> str:
    """The environment variable that can hold a service's base URL."""
    return "SAGAWAY_SERVICE_" + re.sub(r"[^A-Za-z0-9]", "_", service).upper()


def http_calls(saga: Saga) -> Iterable[tuple[str, HttpCall]]:
    for step in saga.steps:
        for call in (step.action, step.compensation_fn):
            if isinstance(call, HttpCall):
                yield f"{saga.name}.{step.name}", call


def resolve_services(sagas: Iterable[Saga], configured: Mapping[str, str],
                     environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The base URL of every service the sagas' HTTP steps name.

    ``configured`` (``Orchestrator(services=…)``) wins over ``SAGAWAY_SERVICE_<NAME>``.

    Raises:
        DefinitionError: a service has no base URL, or its URL is not http(s)://host[:port].
    """
    env = os.environ if environ is None else environ
    found: dict[str, str] = {}
    missing: dict[str, list[str]] = {}
    for saga in sagas:
        for where, call in http_calls(saga):
            if call.service in found:
                continue
            url = configured.get(call.service) or env.get(env_var(call.service))
            if not url:
                missing.setdefault(call.service, []).append(where)
                continue
            found[call.service] = _check_base_url(call.service, url)
    if missing:
        lines = "; ".join(
            f"{name!r} (used by {', '.join(sorted(set(users)))}): pass "
            f"Orchestrator(services={{{name!r}: 'http://host:port'}}) or set {env_var(name)}"
            for name, users in sorted(missing.items()))
        raise DefinitionError(f"no base URL for HTTP service {lines}")
    return found


def _check_base_url(service: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or \
            parts.fragment:
        raise DefinitionError(
            f"the base URL of HTTP service {service!r} is {url!r}; it must look like "
            f"http://host:port or https://host/prefix (no query or fragment)")
    return url.rstrip("/")


def _import_httpx() -> Any:
    try:
        import httpx
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise DefinitionError(
            "HTTP steps need httpx: pip install 'sagaway[http]'") from None
    return httpx


class HttpInvoker:
    """Sends HTTP steps' requests over pooled ``httpx.AsyncClient`` connections.

    Each service gets its own pool (a bulkhead): a service that hangs holds its own
    connections, never the ones another service's steps need.

    Args:
        services: base URL by service name (see ``resolve_services``).
        max_connections: the most connections open at once to one service; a request that
            finds none free waits (within its timeout) for one.
    """

    def __init__(self, services: Mapping[str, str], *, max_connections: int = 16) -> None:
        self._httpx = _import_httpx()
        self._max_connections = max_connections
        self.services: dict[str, str] = {}
        self._clients: dict[str, httpx.AsyncClient] = {}
        self.add_services(services)

    def add_services(self, services: Mapping[str, str]) -> None:
        from sagaway import __version__

        hx = self._httpx
        for name, url in services.items():
            if name in self._clients:
                continue
            self.services[name] = url
            self._clients[name] = hx.AsyncClient(
                limits=hx.Limits(max_connections=self._max_connections,
                                 max_keepalive_connections=self._max_connections,
                                 keepalive_expiry=30.0),
                headers={"User-Agent": f"sagaway/{__version__}"},
                follow_redirects=False,
            )

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    # -- the two entry points the runtime calls ---------------------------------------------

    async def act(self, call: HttpCall, ctx: StepContext, data: Any, *,
                  replay: bool = False) -> Any:
        """Carry out an action; return its result (the response's JSON).

        Raises:
            InvocationFailed: the attempt failed (how, and whether it may have taken effect).
        """
        values = {"input": data, "results": ctx.results, "run_id": ctx.run_id,
                  "step": ctx.step}
        if call.json is not None:
            body = self._build(call, lambda: call.json(ctx, data))
        else:
            body = data if call.method in BODY_METHODS else _NO_BODY
        response, what = await self._send(call, ctx, values, body, replay=replay)
        verdict = classify(response.status_code, compensating=False)
        if not verdict.ok:
            raise InvocationFailed(self._explain(what, response, verdict),
                                   retryable=verdict.retryable,
                                   maybe_applied=verdict.maybe_applied,
                                   retry_after=_retry_after(response, verdict))
        result = _body(response)
        if call.response_model is not None:
            try:
                model = call.response_model.model_validate(result)
            except Exception as exc:  # pydantic.ValidationError, or the model's own check
                # The service said yes and acted; its answer is unusable. Retrying gets the
                # same answer from an idempotent service, so compensate instead.
                raise InvocationFailed(
                    f"{what} -> {response.status_code}, but the body does not match "
                    f"{getattr(call.response_model, '__name__', 'the response model')} "
                    f"(may have taken effect): {_first_line(exc)}; body: "
                    f"{_excerpt(response.text)}",
                    retryable=False, maybe_applied=True) from None
            result = model.model_dump(mode="json")
        return result

    async def undo(self, call: HttpCall, ctx: StepContext, data: Any, result: Any, *,
                   known: bool, action: Any) -> None:
        """Carry out a compensation.

        ``known`` is False when no action attempt answered (they timed out or were cut):
        then, if the URL needs the action's result, the action's request is sent again with
        its own ``Idempotency-Key`` (an idempotent service answers with the stored response)
        to learn what to undo; a business refusal of that replay means nothing took effect.

        Raises:
            InvocationFailed: the compensation failed.
        """
        if not known and call.uses_result:
            if not isinstance(action, HttpCall):
                raise InvocationFailed(
                    f"{call.url} needs the action's result, which is unknown (no attempt "
                    f"answered); address the compensation by the input instead",
                    retryable=False)
            replay_ctx = dataclasses.replace(
                ctx, compensating=False,
                idempotency_key=idempotency_key(ctx.run_id, ctx.step, compensation=False))
            try:
                result = await self.act(action, replay_ctx, data, replay=True)
            except InvocationFailed as exc:
                if not exc.retryable and not exc.maybe_applied:
                    return  # the service refuses the action: it never took effect
                raise InvocationFailed(
                    f"could not learn the action's result to undo it: {exc.message}",
                    retryable=exc.retryable, retry_after=exc.retry_after) from None
            known = True
        values: dict[str, Any] = {"input": data, "results": ctx.results,
                                  "run_id": ctx.run_id, "step": ctx.step}
        if known:
            values["result"] = result
        if call.json is not None:
            body = self._build(call, lambda: call.json(ctx, data, result))
        elif call.method in BODY_METHODS:
            body = {"input": data, "result": result}
        else:
            body = _NO_BODY
        response, what = await self._send(call, ctx, values, body)
        verdict = classify(response.status_code, compensating=True)
        if not verdict.ok:
            raise InvocationFailed(self._explain(what, response, verdict),
                                   retryable=verdict.retryable,
                                   retry_after=_retry_after(response, verdict))

    # -- the request ---------------------------------------------------------------------

    @staticmethod
    def _build(call: HttpCall, build: Any) -> Any:
        try:
            return build()
        except Exception as exc:
            raise InvocationFailed(f"{call.method} {call.url}: json= raised "
                                   f"{type(exc).__name__}: {exc} (nothing was sent)",
                                   retryable=False) from None

    async def _send(self, call: HttpCall, ctx: StepContext, values: dict[str, Any], body: Any,
                    *, replay: bool = False) -> tuple[httpx.Response, str]:
        httpx = self._httpx
        try:
            path = render_path(call, values)
        except TemplateError as exc:
            raise InvocationFailed(f"{call.method} {exc} (nothing was sent)",
                                   retryable=False) from None
        base = self.services.get(call.service)
        client = self._clients.get(call.service)
        if base is None or client is None:  # resolve_services ran at open()
            raise InvocationFailed(f"no base URL for HTTP service {call.service!r}; set "
                                   f"{env_var(call.service)}", retryable=False)
        what = f"{call.method} {call.service} {urlsplit(path).path or '/'}"
        # Case-insensitive: a listener's header never doubles or overrides sagaway's own.
        headers = httpx.Headers(ctx.headers)
        headers.update({
            "Idempotency-Key": ctx.idempotency_key,
            "X-Correlation-Id": ctx.run_id,
            "X-Sagaway-Run-Id": ctx.run_id,
            "X-Sagaway-Saga": ctx.saga,
            "X-Sagaway-Step": ctx.step,
            "X-Sagaway-Attempt": str(ctx.attempt),
        })
        if ctx.compensating:
            headers["X-Sagaway-Compensation"] = "true"
        if replay:
            headers["X-Sagaway-Replay"] = "true"
        timeout = call.timeout
        # Connecting (or waiting for a pooled connection) may use half the budget; running
        # out there means nothing was sent, which is worth knowing.
        limits = httpx.Timeout(timeout, connect=timeout / 2, pool=timeout / 2)
        kwargs: dict[str, Any] = {"headers": headers, "timeout": limits}
        if body is not _NO_BODY:
            kwargs["json"] = body
        try:
            # The whole attempt, a slowly trickling answer included, stays within timeout.
            async with asyncio.timeout(timeout):
                response = await client.request(call.method, base + path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise InvocationFailed(f"{what}: not sent ({_kind(exc)}: {exc})",
                                   retryable=True) from None
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise InvocationFailed(f"{what}: timed out after {timeout}s (may have taken "
                                   f"effect)", retryable=True, maybe_applied=True) from exc
        except httpx.NetworkError as exc:
            # Sent, then the connection broke (the server crashed mid-request?): unknown.
            raise InvocationFailed(f"{what}: connection lost ({_kind(exc)}: {exc}) (may have "
                                   f"taken effect)", retryable=True, maybe_applied=True
                                   ) from None
        except httpx.RemoteProtocolError as exc:
            raise InvocationFailed(f"{what}: connection lost ({_kind(exc)}: {exc}) (may "
                                   f"have taken effect)", retryable=True, maybe_applied=True
                                   ) from None
        except (TypeError, ValueError) as exc:  # a body json cannot encode
            raise InvocationFailed(f"{what}: the body cannot be sent as JSON: {exc} "
                                   f"(nothing was sent)", retryable=False) from None
        except httpx.HTTPError as exc:
            raise InvocationFailed(f"{what}: {_kind(exc)}: {exc}", retryable=False) from None
        return response, what

    @staticmethod
    def _explain(what: str, response: httpx.Response, verdict: Verdict) -> str:
        status = f"{response.status_code} {response.reason_phrase}".strip()
        text = f"{what} -> {status} ({verdict.note})"
        retry_after = response.headers.get("Retry-After")
        if retry_after:
            text += f" (Retry-After: {retry_after[:40]})"
        excerpt = _excerpt(response.text)
        if excerpt:
            text += f": {excerpt}"
        if verdict.maybe_applied:
            text += " (may have taken effect)"
        return text


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now``: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT
        return None
    return max(when.timestamp() - now, 0.0)


def _retry_after(response: httpx.Response, verdict: Verdict) -> float | None:
    if not verdict.retryable:
        return None
    return parse_retry_after(response.headers.get("Retry-After"), time.time())


def _kind(exc: BaseException) -> str:
    return type(exc).__name__


def _body(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _EXCERPT else flat[:_EXCERPT] + "…"


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return "; ".join(lines[:3]) if lines else type(exc).__name__
