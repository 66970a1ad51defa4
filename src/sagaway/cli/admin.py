"""``sagaway admin`` (serve the admin API and dashboard) and the operator commands
``retry | compensate | resume | resolve``, against a store or through an admin API.

Registered on the ``sagaway`` app when ``sagaway.cli`` is imported.
"""

from __future__ import annotations

import getpass
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from sagaway import Orchestrator, SagaRun, SagawayError
from sagaway.admin.auth import Token, is_loopback, load_tokens
from sagaway.cli.app import (
    DEFAULT_STORE,
    AdminToken,
    AdminUrl,
    Store,
    _checked_store,
    _fail,
    _remote,
    _run,
    app,
    err,
    out,
)
from sagaway.cli.remote import RemoteError
from sagaway.engine.worker import load_app

__all__ = ["ACTIONS", "serve_admin"]

ACTIONS = {
    "retry": "Retry a FAILED run: its failed compensations (or the step after the pivot that "
             "gave up) get a fresh retry budget.",
    "compensate": "Force-compensate a PENDING, RUNNING or FAILED run: steps in flight are cut "
                  "and everything that may have taken effect is undone.",
    "resume": "Resume a parked run now (PENDING, RUNNING or COMPENSATING): take it from its "
              "worker and fire its retry timers at once.",
    "resolve": "Mark a FAILED run RESOLVED: you settled it by hand.",
}


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers) and no LOGNAME/USER
        return "operator"


def _requested(action: str, run: SagaRun) -> Text:
    line = Text.assemble((action, "bold"), " of run ", (run.id, "cyan"))
    if run.request is not None:
        line.append(f" recorded (by {run.request.get('actor')}); a worker that registers "
                    f"{run.saga} v{run.version} carries it out. Status now {run.status.value}.")
    else:
        line.append(f" carried out already. Status now {run.status.value}.")
    return line


def _operator_command(action: str) -> Callable[..., None]:
    def command(
        run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run's id.")],
        reason: Annotated[str, typer.Option("--reason", "-r", metavar="TEXT",
                                            help="Why (recorded in the run's history).")],
        actor: Annotated[str | None, typer.Option(
            "--actor", metavar="NAME",
            help="Who does it (default: your login name). Through an admin API with "
                 "tokens the token's name is recorded instead.")] = None,
        store: Store = DEFAULT_STORE,
        admin: AdminUrl = None,
        token: AdminToken = None,
    ) -> None:
        if not reason.strip():
            raise typer.BadParameter("a reason is required; it goes into the run's history",
                                     param_hint="--reason")
        if admin is not None:
            with _remote(admin, token) as client:
                try:
                    run = client.act(action, run_id, reason=reason, actor=actor)
                except RemoteError as exc:
                    _fail(str(exc))
        else:
            _checked_store(store, must_exist=True)

            async def go() -> SagaRun:
                # A client records the request; the workers carry it out.
                async with Orchestrator(store, worker=False) as orch:
                    await getattr(orch, action)(run_id, reason=reason,
                                                actor=actor or _login())
                    return await orch.get(run_id)

            run = _run(go())
        out.print(_requested(action, run))

    command.__doc__ = ACTIONS[action] + " A worker carries it out; the reason and who did it " \
                                        "go into the run's history."
    command.__name__ = action
    return command


for _action in ACTIONS:
    app.command(name=_action)(_operator_command(_action))


@app.command(name="admin")
def serve_admin(
    store: Store = DEFAULT_STORE,
    host: Annotated[str, typer.Option("--host", help="Address to bind. Anything but "
                                                     "loopback needs tokens.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535)] = 8080,
    token: Annotated[list[str] | None, typer.Option(
        "--token", metavar="NAME:ROLE:SECRET",
        help="A bearer token (repeatable). ROLE is viewer (read) or operator (read and act); "
             "NAME is recorded as who did an action. Also read from $SAGAWAY_ADMIN_TOKENS.")]
    = None,
    tokens_file: Annotated[Path | None, typer.Option(
        "--tokens-file", envvar="SAGAWAY_ADMIN_TOKENS_FILE", show_envvar=True,
        help="A file of tokens, one NAME:ROLE:SECRET a line (# comments).")] = None,
    sensitive_field: Annotated[list[str] | None, typer.Option(
        "--sensitive-field", metavar="NAME",
        help="Mask this payload field too (repeatable), on top of card_number, cvv, "
             "password, secret, token, iban, account_number, ssn, …")] = None,
    sensitive_path: Annotated[list[str] | None, typer.Option(
        "--sensitive-path", metavar="PATH",
        help="Mask this payload path too (repeatable), e.g. card.number, items.*.card, "
             "results.charge.token; paths a saga declares are masked anyway.")] = None,
    metrics_auth: Annotated[bool, typer.Option(
        "--metrics-auth", help="/metrics needs a viewer token too (by default it needs "
                               "none: it holds counts only).")] = False,
    stuck_after: Annotated[float, typer.Option(
        "--stuck-after", min=1, help="An active run with no transition for this many "
                                     "seconds is listed as stuck.")] = 300.0,
    app_spec: Annotated[str | None, typer.Option(
        "--app", metavar="MODULE:ATTR",
        help="Your Orchestrator, only to read its saga definitions (step kinds); the admin "
             "server never drives runs.")] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    r"""Serve the admin REST API and the dashboard (pip install 'sagaway\[admin]').

    Without tokens, auth is off and the server binds loopback only; binding another address without tokens is refused.
    """  # noqa: E501 - one line, so the help text wraps to the terminal
    try:
        tokens = load_tokens(token or (), file=tokens_file)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--token") from exc
    if not tokens and not is_loopback(host):
        err.print(Text.assemble(
            ("error: ", "bold red"),
            f"refusing to bind {host} without tokens: anyone who can reach it could act on "
            f"runs. Bind 127.0.0.1, or give --token NAME:ROLE:SECRET (or "
            f"$SAGAWAY_ADMIN_TOKENS)."), soft_wrap=True)
        raise typer.Exit(2)
    _checked_store(store, must_exist=False)
    try:
        import uvicorn

        from sagaway.admin import create_app
    except ImportError:
        _fail("the admin server needs FastAPI and uvicorn: pip install 'sagaway[admin]'")
    sagas = []
    if app_spec is not None:
        try:
            sagas = load_app(app_spec).sagas
        except (ImportError, ValueError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--app") from exc
    try:
        application = create_app(store, tokens=tokens, sensitive_fields=sensitive_field or (),
                                 stuck_after=stuck_after, sagas=sagas,
                                 sensitive_paths=sensitive_path or (),
                                 metrics_auth=metrics_auth)
    except SagawayError as exc:
        raise typer.BadParameter(str(exc), param_hint="--sensitive-path") from exc
    out.print(_banner(host, port, store, tokens), soft_wrap=True)
    logging.basicConfig(stream=sys.stderr, level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = uvicorn.Config(application, host=host, port=port, log_level=log_level.lower(),
                            ws="none", lifespan="on", server_header=False)
    uvicorn.Server(config).run()


def _banner(host: str, port: int, store: str, tokens: list[Token]) -> Text:
    shown = f"[{host}]" if ":" in host else host
    line = Text.assemble(("sagaway admin", "bold"), f" on http://{shown}:{port}/ "
                         f"(API docs at /docs) for {store.split('@')[-1]}\n")
    if tokens:
        who = ", ".join(f"{t.name} ({t.role})" for t in tokens)
        line.append(f"auth on: {len(tokens)} token(s): {who}", style="green")
    else:
        line.append("auth OFF: no tokens configured, so it serves this machine only; pass "
                    "--token NAME:ROLE:SECRET to serve others", style="yellow")
    return line
