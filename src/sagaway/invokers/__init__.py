"""Invokers: how a step reaches its service (in-process, HTTP, messages).

The runtime hands a step's action or compensation to an invoker, which reports the
attempt's outcome. An invoker that knows more than "it raised" says so with
:class:`InvocationFailed`: whether another attempt may help, and whether the attempt may
have taken effect (the decider compensates a step that may have).
"""

from __future__ import annotations

__all__ = ["InvocationFailed"]


class InvocationFailed(Exception):
    """An attempt failed, with what the invoker knows about its effect.

    Internal to the engine and its invokers (not a user-facing error): the runtime turns it
    into the decider's ``ActionFailed``/``CompensationFailed`` event.
    """

    def __init__(self, message: str, *, retryable: bool, maybe_applied: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        """Another attempt may succeed (a 5xx, a timeout, a refused connection)."""
        self.maybe_applied = maybe_applied
        """The service may have carried the request out (a timeout, a 5xx, a cut reply)."""
        self.retry_after = retry_after
        """Seconds the service asked to wait before trying again (``Retry-After``)."""
