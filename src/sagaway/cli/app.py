"""The ``sagaway`` command: argument parsing only; the work is done by the public API."""

from __future__ import annotations

import asyncio
import enum
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from sagaway import Orchestrator, SagaRun, SagaStatus, SagawayError, SQLiteStore, __version__
from sagaway.cli import render
from sagaway.cli.demo import STEPS, DemoError, resume_demo, run_demo
from sagaway.cli.remote import AdminClient, RemoteError
from sagaway.engine.worker import load_app, serve
from sagaway.store import open_store

__all__ = ["app", "main"]

T = TypeVar("T")

DEFAULT_STORE = "sqlite:///sagaway-demo.db"

app = typer.Typer(
    name="sagaway",
    help="Durable sagas for Python microservices: run the demo, list runs, show a timeline.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)

out = Console()
err = Console(stderr=True)


class DemoStep(enum.StrEnum):
    """The demo saga's steps, for ``--fail-at`` / ``--crash-at``."""

    reserve_inventory = "reserve_inventory"
    charge_payment = "charge_payment"
    arrange_shipping = "arrange_shipping"


assert tuple(DemoStep) == STEPS

Store = Annotated[
    str,
    typer.Option("--store", envvar="SAGAWAY_STORE", show_envvar=True,
                 help="The saga log: sqlite:///path.db (relative to here) or memory://."),
]


AdminUrl = Annotated[
    str | None,
    typer.Option("--admin", envvar="SAGAWAY_ADMIN_URL", show_envvar=True, metavar="URL",
                 help="Work through a running admin API (e.g. http://127.0.0.1:8080) instead "
                      "of the store; takes precedence over --store."),
]
AdminToken = Annotated[
    str | None,
    typer.Option("--token", envvar="SAGAWAY_ADMIN_TOKEN", show_envvar=True, metavar="SECRET",
                 help="The bearer token's secret for --admin."),
]


def _fail(message: str) -> NoReturn:
    err.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(1)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one command's coroutine; sagaway's and the demo's errors end it with exit 1."""
    try:
        return asyncio.run(coro)
    except (SagawayError, DemoError) as exc:
        _fail(str(exc))


def _remote(admin: str, token: str | None) -> AdminClient:
    try:
        return AdminClient(admin, token)
    except RemoteError as exc:
        _fail(str(exc))


def _checked_store(url: str, *, must_exist: bool) -> None:
    """Reject a bad URL (usage error) or, to read, a SQLite file that is not there (exit 1).

    Opening a missing file would create an empty saga log, so reads check first.
    """
    try:
        store = open_store(url)
    except SagawayError as exc:
        raise typer.BadParameter(str(exc), param_hint="--store") from exc
    if must_exist and isinstance(store, SQLiteStore) and store.path != ":memory:" \
            and not Path(store.path).exists():
        _fail(f"no saga store at {store.path!r} ({url}); run `sagaway demo` first or pass "
              f"--store")


def _version(value: bool) -> None:
    if value:
        out.print(f"sagaway {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Durable sagas for Python microservices."""


class Example(enum.StrEnum):
    """The example systems ``sagaway demo`` can run (examples/ of a checkout)."""

    ecommerce = "ecommerce"
    travel = "travel"
    bank = "bank"


@app.command()
def demo(
    example: Annotated[
        Example | None,
        typer.Argument(help="Run an example system as real services instead (from examples/ "
                            "of a checkout)."),
    ] = None,
    store: Store = DEFAULT_STORE,
    fail_at: Annotated[
        str | None,
        typer.Option("--fail-at", metavar="STEP",
                     help="Make this step fail: one of the demo's steps (arrange_shipping: its "
                          "first 2 attempts), or of the example's (every second saga fails "
                          "there)."),
    ] = None,
    sagas: Annotated[
        int, typer.Option("--sagas", "-n", min=1, max=100_000,
                          help="With an example: how many sagas to run.")
    ] = 20,
    amqp: Annotated[
        str, typer.Option("--amqp", envvar="SAGAWAY_AMQP_URL", show_envvar=True, metavar="URL",
                          help="With the bank example: the RabbitMQ to use.")
    ] = "amqp://guest:guest@127.0.0.1:5672/",
    crash_at: Annotated[
        DemoStep | None,
        typer.Option("--crash-at", help="SIGKILL this process while this step is in flight; "
                                         "prints the command that resumes the run."),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option("--resume", metavar="RUN_ID",
                     help="Finish a demo run a crashed process left behind."),
    ] = None,
) -> None:
    """Run the e-commerce order saga and watch its timeline.

    reserve_inventory → charge_payment (pivot) → arrange_shipping (retriable), against pretend services that apply each effect once per idempotency key.

    sagaway demo ecommerce|travel|bank [--fail-at STEP] [--sagas N] runs an example system instead: its services as real processes on free 127.0.0.1 ports, N sagas, then the outcome and the invariant check.
    """  # noqa: E501 - one line, so the help text wraps to the terminal
    if example is not None:
        _run_example(example.value, fail_at=fail_at, sagas=sagas, amqp=amqp,
                     quick=(crash_at, resume))
        return
    if fail_at is not None and fail_at not in STEPS:
        raise typer.BadParameter(f"{fail_at!r} is not a step of the demo: use one of "
                                 f"{', '.join(STEPS)}", param_hint="--fail-at")
    if fail_at is not None and crash_at is not None:
        raise typer.BadParameter("use either --fail-at or --crash-at, not both",
                                 param_hint="--crash-at")
    if resume is not None and (fail_at is not None or crash_at is not None):
        raise typer.BadParameter("--resume finishes an existing run; it takes no faults",
                                 param_hint="--resume")
    _checked_store(store, must_exist=resume is not None)
    if resume is not None:
        run = _run(resume_demo(out, store, resume))
    else:
        run = _run(run_demo(out, store, fail_at=fail_at,
                            crash_at=crash_at.value if crash_at else None))
    # COMPENSATED is the demo working as intended; only a run that needs an operator is an
    # error for the shell.
    if run.status is SagaStatus.FAILED:
        raise typer.Exit(1)


def _run_example(name: str, *, fail_at: str | None, sagas: int, amqp: str,
                 quick: tuple[object, ...]) -> None:
    from sagaway.cli.examples import EXAMPLE_STEPS, ExampleUnavailable, run_example

    if any(option is not None for option in quick):
        raise typer.BadParameter("--crash-at and --resume belong to the quick demo; an "
                                 "example takes --fail-at, --sagas, --amqp",
                                 param_hint="EXAMPLE")
    if fail_at is not None and fail_at not in EXAMPLE_STEPS[name]:
        raise typer.BadParameter(f"{fail_at!r} is not a step of {name}: use one of "
                                 f"{', '.join(EXAMPLE_STEPS[name])}", param_hint="--fail-at")
    try:
        ok = run_example(out, name, sagas=sagas, fail_at=fail_at, amqp_url=amqp)
    except ExampleUnavailable as exc:
        _fail(str(exc))
    if not ok:
        raise typer.Exit(1)


@app.command()
def runs(
    store: Store = DEFAULT_STORE,
    status: Annotated[
        list[SagaStatus] | None,
        typer.Option("--status", "-s", case_sensitive=False,
                     help="Only runs in this status (repeat for several)."),
    ] = None,
    saga: Annotated[str | None, typer.Option("--saga", help="Only runs of this saga.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=10_000,
                                       help="At most this many runs.")] = 20,
    admin: AdminUrl = None,
    token: AdminToken = None,
) -> None:
    """List runs, newest first."""
    statuses = list(dict.fromkeys(status or ()))
    if admin is not None:
        with _remote(admin, token) as client:
            try:
                found = client.list_runs(status=statuses, saga=saga, limit=limit)
            except RemoteError as exc:
                _fail(str(exc))
    else:
        _checked_store(store, must_exist=True)

        async def go() -> list[SagaRun]:
            async with Orchestrator(store, worker=False) as orch:
                return await orch.list(status=statuses or None, saga=saga, limit=limit)

        found = _run(go())
    if not found:
        out.print(Text("no runs match", style="bright_black"))
        return
    out.print(render.runs_table(found, out.width))


@app.command()
def show(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run's id.")],
    store: Store = DEFAULT_STORE,
    admin: AdminUrl = None,
    token: AdminToken = None,
) -> None:
    """Print one run's timeline, input and results."""
    if admin is not None:
        with _remote(admin, token) as client:
            try:
                out.print(render.run_details(client.get(run_id)))
            except RemoteError as exc:
                _fail(str(exc))
        return
    _checked_store(store, must_exist=True)

    async def go() -> SagaRun:
        # A client (worker=False) claims and recovers nothing: it only reads.
        async with Orchestrator(store, worker=False) as orch:
            return await orch.get(run_id)

    out.print(render.run_details(_run(go())))


@app.command()
def worker(
    app_spec: Annotated[
        str,
        typer.Option("--app", metavar="MODULE:ATTR",
                     help="Where your Orchestrator is, e.g. shop.sagas:orchestrator "
                          "(ATTR() calls a factory)."),
    ],
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING…")]
    = "INFO",
) -> None:
    """Run a worker: drive and recover runs of your sagas until SIGTERM or SIGINT.

    Several workers on one PostgreSQL saga log share the work through leases. On SIGTERM the
    worker releases its leases so the others resume its runs at once.
    """
    logging.basicConfig(
        stream=sys.stderr, level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    try:
        orch = load_app(app_spec)
    except (ImportError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--app") from exc
    _run(serve(orch))


@app.command()
def migrate(store: Store = DEFAULT_STORE) -> None:
    """Apply the saga log's schema migrations (safe to run from many processes at once)."""
    try:
        target = open_store(store)
    except SagawayError as exc:
        raise typer.BadParameter(str(exc), param_hint="--store") from exc

    target.migrate_on_open = False

    async def go() -> list[str]:
        async with target:
            return await target.migrate()

    applied = _run(go())
    where = target.url.split("@")[-1]
    if applied:
        out.print(f"applied {len(applied)} migration(s) to {where}: {', '.join(applied)}")
    else:
        out.print(f"the saga log at {where} is up to date")


@app.command("check")
def check_cmd(
    spec: Annotated[str, typer.Argument(metavar="MODULE:SAGA",
                                        help="The saga to check, e.g. shop.sagas:order (or an "
                                             "Orchestrator, or a list of sagas).")],
) -> None:
    """Check saga definitions for risky shapes, each with its fix; exit 1 on errors (CI)."""
    from sagaway.cli.check import load_sagas, report

    try:
        sagas = load_sagas(spec)
    except (ImportError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="MODULE:SAGA") from exc
    errors = report(sagas, out)
    if errors:
        err.print(f"{errors} error(s)")
        raise typer.Exit(1)


def main() -> None:
    """The console-script entry point."""
    app(prog_name="sagaway")
