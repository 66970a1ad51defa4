"""How users declare sagas. Pure: no I/O, no asyncio."""

from sagaway.definition.retry import RetryPolicy
from sagaway.definition.saga import Saga, Step, StepContext, StepKind

__all__ = ["RetryPolicy", "Saga", "Step", "StepContext", "StepKind"]
