"""The Grafana dashboard and the Prometheus alert rules only name metrics the code exports,
and promtool accepts the rules."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from obs_helpers import order, samples, shop_saga

from sagaway import Orchestrator
from sagaway.messaging.envelope import Envelope
from sagaway.messaging.memory import MemoryTransport
from sagaway.observability import PrometheusMetrics
from sagaway.observability.metrics import METRIC_NAMES
from sagaway.protection import EnvelopeSigner

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "sagaway.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
_METRIC = re.compile(r"\bsagaway_[a-z0-9_]+\b")
# Everything in an expression that is not a metric: PromQL functions, keywords, label names.
_IDENT = re.compile(r"(?<![\w$\"'])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w\"'])")
_PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "increase", "irate",
    "histogram_quantile", "le", "saga", "step", "phase", "status", "source", "outcome",
    "and", "or", "unless", "on", "ignoring", "group_left", "group_right", "offset", "bool",
}


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    queries = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k == "expr" and isinstance(v, str):
                    queries.append(v)
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(doc["panels"])
    # Query variables (the saga picker) are PromQL too.
    queries += [v["definition"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return queries


def alert_queries() -> list[str]:
    # The rules file's `expr:` lines (no YAML parser needed for this flat layout).
    return [line.split("expr:", 1)[1].strip() for line in ALERTS.read_text().splitlines()
            if line.strip().startswith("expr:")]


def unknown_metrics(queries: list[str], exported: set[str]) -> list[tuple[str, str]]:
    """(query, name) for each name in a query that is not an exported metric."""
    bad = []
    for q in queries:
        stripped = re.sub(r"\{[^}]*\}", "", re.sub(r"\[[^\]]*\]", "", q))  # selectors, ranges
        stripped = re.sub(r'"[^"]*"', "", stripped)
        for name in _IDENT.findall(stripped):
            if name.startswith("sagaway_"):
                if name not in exported:
                    bad.append((q, name))
            elif name not in _PROMQL_WORDS and not name.startswith("label_values"):
                bad.append((q, name))
        if not _METRIC.search(q):
            bad.append((q, "(no sagaway metric)"))
    return bad


async def exported_names(tmp_path: Path) -> set[str]:
    """The sample names a registry holds after real runs (all outcomes, a dead letter)."""
    metrics = PrometheusMetrics()
    async with Orchestrator(f"sqlite:///{tmp_path}/s.db", sagas=[shop_saga()],
                            listeners=[metrics]) as orch:
        metrics.watch(orch)
        for extra in ({}, {"decline": True}, {"decline": True, "release_broken": True}):
            await (await orch.start("shop", order(**extra))).wait(timeout=10)
        text = (await metrics.render()).decode()
    async with MemoryTransport() as transport:
        # Signed, so the signature-check counters are exported too.
        transport.signer = EnvelopeSigner({"s1": os.urandom(32)})
        metrics.watch_transport(transport)

        async def broken(delivery: Any) -> None:
            raise RuntimeError("no")

        await transport.subscribe("obs-deploy-q", broken, max_deliveries=1)
        await transport.publish("obs-deploy-q", Envelope(type="t", payload={}))
        for _ in range(200):
            if "sagaway_messages_dead_lettered_total{" in (await metrics.render()).decode():
                break
            await asyncio.sleep(0.01)
    text = (await metrics.render()).decode()
    names = {name for name, _, _ in samples(text)}
    # Families (histograms) as well as their samples.
    assert set(METRIC_NAMES) <= names | {n.removesuffix("_count") for n in names}
    return names | set(METRIC_NAMES)


async def test_every_dashboard_query_names_exported_metrics(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 15
    exported = await exported_names(tmp_path)
    assert unknown_metrics(queries, exported) == []
    # The checker itself catches a typo and a foreign metric.
    assert unknown_metrics(['sum(rate(sagaway_runs_startd_total[5m]))'], exported) != []
    assert unknown_metrics(['sum(rate(http_requests_total[5m]))'], exported) != []
    # The panels the issue asks for are there.
    titles = " ".join(p["title"].lower() for p in json.loads(DASHBOARD.read_text())["panels"])
    for word in ("throughput", "outcomes", "latency", "stuck", "outbox"):
        assert word in titles


async def test_every_alert_names_exported_metrics(tmp_path: Path) -> None:
    queries = alert_queries()
    assert len(queries) >= 5
    assert unknown_metrics(queries, await exported_names(tmp_path)) == []
    text = ALERTS.read_text()
    for alert in ("SagawayRunsFailed", "SagawayRunsStuck", "SagawayCompensationFailures",
                  "SagawayOutboxLag", "SagawayDeadLetters"):
        assert f"alert: {alert}" in text


def test_promtool_accepts_the_alert_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "promtool is missing: apt-get install prometheus"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (.ci/run installs it)", pytrace=False)
        pytest.skip(message)
    done = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout
    # And it would reject a broken rule.
    broken = tmp_path / "broken.yml"
    broken.write_text(ALERTS.read_text().replace("> 0\n", "> \n", 1))
    done = subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
