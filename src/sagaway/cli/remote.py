"""The CLI's client for a running admin API (``--admin URL --token SECRET``).

It speaks the admin API's JSON over httpx (the ``[admin]`` extra) and turns it back into the
public snapshots (``SagaRun``), so the CLI renders a remote run exactly like a local one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sagaway import HistoryEntry, SagaRun, SagaStatus

if TYPE_CHECKING:
    import httpx

__all__ = ["AdminClient", "RemoteError", "run_from_json"]

PAGE = 500


class RemoteError(Exception):
    """The admin API refused a request or could not be reached; the message says why."""


def run_from_json(data: dict[str, Any]) -> SagaRun:
    """A run as the admin API returns it (summary or detail) → ``SagaRun``."""
    return SagaRun(
        id=data["id"],
        saga=data["saga"],
        version=int(data["version"]),
        status=SagaStatus(data["status"]),
        input=data.get("input"),
        results=data.get("results") or {},
        error=data.get("error"),
        history=tuple(
            HistoryEntry(at=h["at"], kind=h["kind"], step=h.get("step"),
                         attempt=h.get("attempt"), data=h.get("data"))
            for h in data.get("history") or ()
        ),
        created_at=data["created_at"],
        updated_at=data["updated_at"],
        idempotency_key=data.get("start_key"),
        owner=data.get("owner"),
        lease_expires=data.get("lease_expires"),
        wake_at=data.get("wake_at"),
        request=data.get("request"),
    )


class AdminClient:
    """A synchronous client of the admin API's ``/api/`` endpoints."""

    def __init__(self, url: str, token: str | None, *, timeout: float = 30.0) -> None:
        try:
            import httpx
        except ImportError:
            raise RemoteError("--admin needs httpx: pip install 'sagaway[admin]'") from None
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http: httpx.Client = httpx.Client(base_url=self.url, headers=headers,
                                                timeout=timeout)
        self._error: type[Exception] = httpx.HTTPError

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except self._error as exc:
            raise RemoteError(f"cannot reach the admin API at {self.url}: {exc}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = None
            raise RemoteError(f"{detail or response.reason_phrase} "
                              f"(HTTP {response.status_code} from {self.url})")
        try:
            return response.json()
        except ValueError:
            raise RemoteError(f"{self.url} did not answer with JSON; is it a sagaway admin "
                              f"API?") from None

    def list_runs(self, *, status: Sequence[SagaStatus] = (), saga: str | None = None,
                  limit: int = 20) -> list[SagaRun]:
        """Runs newest first, following cursors until ``limit`` runs are read."""
        runs: list[SagaRun] = []
        cursor: str | None = None
        while len(runs) < limit:
            params: dict[str, Any] = {"limit": min(PAGE, limit - len(runs))}
            if status:
                params["status"] = [s.value for s in status]
            if saga is not None:
                params["saga"] = saga
            if cursor:
                params["cursor"] = cursor
            page = self._call("GET", "/api/runs", params=params)
            runs += [run_from_json(r) for r in page["runs"]]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return runs

    def get(self, run_id: str) -> SagaRun:
        return run_from_json(self._call("GET", f"/api/runs/{_segment(run_id)}"))

    def act(self, action: str, run_id: str, *, reason: str, actor: str | None) -> SagaRun:
        """Ask for an operator action; the server records the token's name as the actor."""
        body: dict[str, Any] = {"reason": reason}
        if actor:
            body["actor"] = actor
        return run_from_json(
            self._call("POST", f"/api/runs/{_segment(run_id)}/{action}", json=body))


def _segment(value: str) -> str:
    return quote(value, safe="")
