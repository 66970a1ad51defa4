"""``sagaway choreography …`` and the choreographed demo's stopgap command.

``draw`` imports a :class:`~sagaway.choreography.Choreography` (``module:attr``, or
``module:factory()``), which validates it, and prints it as Mermaid (or plain text).
``track`` runs a :class:`~sagaway.choreography.Tracker` for one or more flows.
``run_choreography_demo`` (``sagaway demo ecommerce --style choreography``) runs the
choreographed e-commerce example
(``examples/ecommerce/choreography``), so it needs a source checkout: the example is not part
of the installed package.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from sagaway.choreography import Choreography, Tracker
from sagaway.errors import DefinitionError, SagawayError

__all__ = ["choreography_app", "load_flow", "run_choreography_demo"]

choreography_app = typer.Typer(
    help="Choreographed sagas: draw a flow, run a tracker.", no_args_is_help=True,
    add_completion=False,
)
out = Console()


def load_flow(spec: str) -> Choreography:
    """Import ``module:attr`` (or ``module:factory()``) and return the Choreography.

    Raises:
        ValueError: a malformed spec, a missing attribute, or not a Choreography.
        DefinitionError: the flow does not validate (raised while it is built).
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected 'package.module:flow', got {spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    target: Any = getattr(module, attr.removesuffix("()"), None)
    if target is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr.removesuffix('()')!r}")
    if attr.endswith("()"):
        target = target()
    if not isinstance(target, Choreography):
        raise ValueError(f"{spec!r} is a {type(target).__name__}, not a Choreography")
    return target


@choreography_app.command()
def draw(
    spec: Annotated[str, typer.Argument(metavar="MODULE:FLOW",
                                        help="Where the Choreography is, e.g. "
                                             "shop.flows:order_flow (FLOW() calls a factory).")],
    text: Annotated[bool, typer.Option("--text", help="Plain text instead of Mermaid.")]
    = False,
) -> None:
    """Validate a choreography and print it as a Mermaid flowchart (or text)."""
    try:
        flow = load_flow(spec)
    except DefinitionError as exc:
        out.print(f"[bold red]error:[/] the flow is invalid: {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="MODULE:FLOW") from exc
    sys.stdout.write(flow.describe() if text else flow.to_mermaid())


@choreography_app.command()
def track(
    specs: Annotated[list[str], typer.Argument(metavar="MODULE:FLOW...",
                                               help="The choreographies to track.")],
    store: Annotated[str, typer.Option(
        "--store", envvar="SAGAWAY_STORE", show_envvar=True,
        help="The saga log the runs go to (sqlite:///path.db, postgresql://…).")],
    transport: Annotated[str, typer.Option(
        "--transport", envvar="SAGAWAY_TRANSPORT", show_envvar=True,
        help="The broker the flows' events travel on (amqp://…, nats://…, redis://…).")],
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING…")]
    = "INFO",
) -> None:
    """Run a tracker: record choreographed runs in the saga log until SIGTERM or SIGINT.

    Several trackers may share the work (one writer per run, through leases).
    """
    logging.basicConfig(
        stream=sys.stderr, level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    try:
        flows = [load_flow(spec) for spec in specs]
    except DefinitionError as exc:
        out.print(f"[bold red]error:[/] the flow is invalid: {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="MODULE:FLOW") from exc
    try:
        tracker = Tracker(store, transport, flows)
    except (SagawayError, ValueError) as exc:
        out.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None

    async def go() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, tracker.stop)
        await tracker.run()

    try:
        asyncio.run(go())
    except SagawayError as exc:
        out.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None


def run_choreography_demo(*, transport: str, count: int, workdir: Path | None) -> None:
    """``sagaway demo ecommerce --style choreography``: the e-commerce order saga
    choreographed, its services as processes, ``count`` sagas. Needs a source checkout."""
    try:
        demo = importlib.import_module("examples.ecommerce.choreography.demo")
    except ModuleNotFoundError:
        root = Path.cwd()
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        try:
            demo = importlib.import_module("examples.ecommerce.choreography.demo")
        except ModuleNotFoundError as exc:
            out.print(f"[bold red]error:[/] the choreography demo lives in the sagaway "
                      f"repository's examples/ecommerce/choreography; run this from a "
                      f"checkout's root ({exc})", soft_wrap=True)
            raise typer.Exit(1) from None
    result = asyncio.run(demo.run_demo(out, transport=transport, n=count, workdir=workdir))
    if not result.ok:
        raise typer.Exit(1)
