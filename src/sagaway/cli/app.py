"""The ``sagaway`` command: argument parsing only; the work is done by the public API."""

from __future__ import annotations

import asyncio
import enum
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from sagaway import Orchestrator, SagaRun, SagaStatus, SagawayError, SQLiteStore, __version__
from sagaway.admin.masking import Masker
from sagaway.cli import render
from sagaway.cli.choreography import choreography_app, run_choreography_demo
from sagaway.cli.demo import STEPS, DemoError, resume_demo, run_demo
from sagaway.cli.remote import AdminClient, RemoteError
from sagaway.engine.worker import load_app, serve
from sagaway.observability.logs import configure_logging
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

class LogFormat(enum.StrEnum):
    """``sagaway worker --log-format``."""

    text = "text"
    json = "json"


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


class DemoStyle(enum.StrEnum):
    """How the e-commerce example's services cooperate."""

    orchestration = "orchestration"
    choreography = "choreography"


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
    style: Annotated[
        DemoStyle,
        typer.Option("--style", case_sensitive=False,
                     help="With the ecommerce example: an orchestrator calling the services "
                          "over HTTP, or services reacting to each other's events over "
                          "--transport."),
    ] = DemoStyle.orchestration,
    transport: Annotated[
        str, typer.Option("--transport", envvar="SAGAWAY_TRANSPORT", show_envvar=True,
                          metavar="URL",
                          help="With --style choreography: the broker (amqp://… or nats://…).")
    ] = "amqp://guest:guest@127.0.0.1:5672/",
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="With --style choreography: where the "
                                  "services' databases and the saga log go (default: a new "
                                  "temporary directory).")
    ] = None,
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
    if style is DemoStyle.choreography:
        if example is not Example.ecommerce:
            raise typer.BadParameter("the choreography variant exists for the ecommerce "
                                     "example: sagaway demo ecommerce --style choreography",
                                     param_hint="--style")
        if fail_at is not None or crash_at is not None or resume is not None:
            raise typer.BadParameter("the choreographed demo plans its own failures (every "
                                     "few orders fail at payment or shipping); it takes "
                                     "--sagas, --transport, --workdir", param_hint="--style")
        run_choreography_demo(transport=transport, count=sagas, workdir=workdir)
        return
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

        found = [Masker().run(r) for r in _run(go())]
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

    # Masked as the admin API masks it: sensitive names, and the run's declared paths.
    out.print(render.run_details(Masker().run(_run(go()))))


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
    log_format: Annotated[LogFormat, typer.Option(
        "--log-format", help="text, or json: one object per line with run_id, saga, step "
                             "and attempt.")] = LogFormat.text,
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", min=0, max=65535, metavar="PORT",
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 9464); needs "
             "sagaway[prometheus].")] = None,
    metrics_host: Annotated[str, typer.Option(
        "--metrics-host", help="The address --metrics-port listens on.")] = "0.0.0.0",
) -> None:
    """Run a worker: drive and recover runs of your sagas until SIGTERM or SIGINT.

    Several workers on one PostgreSQL saga log share the work through leases. On SIGTERM the
    worker releases its leases so the others resume its runs at once.
    """
    try:
        configure_logging(log_level, fmt=log_format.value, stream=sys.stderr)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-level") from exc
    if metrics_port is not None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            _fail("--metrics-port needs prometheus_client: pip install 'sagaway[prometheus]'")
    try:
        orch = load_app(app_spec)
    except (ImportError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--app") from exc
    _run(serve(orch, metrics_port=metrics_port, metrics_host=metrics_host))


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


app.add_typer(choreography_app, name="choreography")
Keys = Annotated[
    str | None,
    typer.Option("--keys", envvar="SAGAWAY_KEYS", show_envvar=True, metavar="KID:B64,…",
                 help="Payload keys, 'k1:<base64>,k2:<base64>' (see `sagaway keygen`)."),
]
ActiveKey = Annotated[
    str | None,
    typer.Option("--active-key", envvar="SAGAWAY_ACTIVE_KEY", show_envvar=True,
                 metavar="KID", help="The key id that encrypts (default: the last listed)."),
]


def _codec(keys: str | None, active: str | None) -> Any:
    from sagaway.protection.codec import AesGcmCodec, parse_keys

    if not keys:
        return None
    try:
        return AesGcmCodec(parse_keys(keys), active=active or None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--keys") from exc


@app.command()
def keygen(
    kid: Annotated[str, typer.Argument(metavar="KEY_ID", help="The new key's id.")] = "k1",
) -> None:
    """Print a new random 256-bit payload key as KEY_ID:BASE64, for SAGAWAY_KEYS."""
    from sagaway.protection.codec import AesGcmCodec, generate_key

    key = generate_key()
    try:
        AesGcmCodec({kid: key})
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="KEY_ID") from exc
    out.print(f"{kid}:{key}", soft_wrap=True)


@app.command()
def erase(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run's id.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the timeline).")],
    store: Store = DEFAULT_STORE,
    actor: Annotated[str | None, typer.Option("--actor", help="Who (default: $USER).")]
    = None,
) -> None:
    """Erase a finished run's payloads (input, results, error texts, message payloads).

    Its timeline stays, with a run.erased entry. Only COMPLETED, COMPENSATED and RESOLVED
    runs.
    """
    import getpass

    from sagaway.protection.erasure import erase_run

    _checked_store(store, must_exist=True)
    who = actor or getpass.getuser()

    async def go() -> bool:
        async with open_store(store) as target:
            try:
                return await erase_run(target, run_id, actor=who, reason=reason)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--reason") from exc

    if _run(go()):
        out.print(f"erased the payloads of run {run_id}; its timeline is kept")
    else:
        out.print(f"run {run_id} was already erased")


@app.command()
def purge(
    older_than: Annotated[str, typer.Option("--older-than", metavar="AGE",
                                            help="e.g. 30d, 12h, 90m.")],
    store: Store = DEFAULT_STORE,
) -> None:
    """Erase the payloads of runs that finished longer ago than AGE (retention).

    The same as a worker with Orchestrator(retention_days=…) does periodically.
    """
    from sagaway.protection.erasure import parse_age, purge_finished

    try:
        seconds = parse_age(older_than)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--older-than") from exc
    _checked_store(store, must_exist=True)

    async def go() -> int:
        async with open_store(store) as target:
            return await purge_finished(target, older_than=seconds)

    out.print(f"erased the payloads of {_run(go())} run(s) finished before the cutoff")


@app.command("rotate-keys")
def rotate_keys(
    store: Store = DEFAULT_STORE,
    keys: Keys = None,
    active: ActiveKey = None,
    after: Annotated[str | None, typer.Option("--after", metavar="RUN_ID",
                                              help="Resume after this run id.")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, max=10_000)] = 200,
) -> None:
    """Re-encrypt every stored run's payloads with the active key.

    Old keys must still be configured to read old values. Resumable (--after, printed as it
    goes) and idempotent: runs already under the active key are not rewritten.
    """
    from sagaway.protection.erasure import RotationReport
    from sagaway.protection.erasure import rotate_keys as rotate

    codec = _codec(keys, active)
    if codec is None:
        raise typer.BadParameter("no keys: set SAGAWAY_KEYS or pass --keys",
                                 param_hint="--keys")
    _checked_store(store, must_exist=True)

    def progress(report: RotationReport) -> None:
        err.print(f"… {report.scanned} scanned, {report.rewritten} re-encrypted "
                  f"(resume with --after {report.last_id})", soft_wrap=True)

    async def go() -> RotationReport:
        async with open_store(store) as target:
            return await rotate(target, codec, after=after, batch=batch, progress=progress)

    report = _run(go())
    out.print(f"{report.scanned} run(s) scanned, {report.rewritten} re-encrypted with key "
              f"{codec.active!r}")
    for run_id, why in report.unreadable.items():
        err.print(f"run {run_id}: {why}", soft_wrap=True)
    if report.unreadable:
        _fail(f"{len(report.unreadable)} run(s) could not be re-encrypted (see above)")
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
