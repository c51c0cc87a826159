"""deploy/grafana/extproc-dashboard.json: a dashboard Grafana can import, whose every query parses as
PromQL and names only metrics and labels a live scrape of the sidecar shows, and which shows every metric
the sidecar exports."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.identity.dev import dev_identity, mint_dev_token

from .test_metrics import CARD, EMAIL, counted, exchange, scraped, start_server

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "extproc-dashboard.json"
# Labels Prometheus adds to every series it scrapes, whatever the target exports.
TARGET_LABELS = {"job", "instance"}
# Grafana's own variables, given values a query could have when Grafana sends it.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
PANEL_TYPES = {"timeseries", "stat", "row"}
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


class Scrape:
    """What a live /metrics scrape shows: series names (with their _total, _bucket, ... suffixes), family
    names, and label names."""

    def __init__(self, text: str) -> None:
        self.series: set[str] = set()
        self.families: set[str] = set()
        self.labels: set[str] = set()
        for family in text_string_to_metric_families(text):
            if family.name == "target_info":  # the resource, not one of the sidecar's instruments
                continue
            self.families.add(family.name)
            for sample in family.samples:
                self.series.add(sample.name)
                self.labels.update(sample.labels)


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Scrape:
    """A real server's /metrics after one exchange that touches every instrument that an exchange can:
    a verified token, a finding each way. (records_lost and reloads count from zero without one.)"""
    folder = tmp_path_factory.mktemp("dev-identity")

    async def run() -> str:
        server = await start_server(identity=dev_identity(folder))
        try:
            token = mint_dev_token(folder, "dashboard", [], 600)
            await exchange(server.grpc_port, f"card {CARD}".encode(), f"mail {EMAIL}".encode(), token=token)
            return await scraped(
                server.admin_port,
                counted("extproc_exchange_duration_seconds_count", extproc_decision="masked"),
            )
        finally:
            await server.stop()

    return Scrape(asyncio.run(run()))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def expand(expr: str, dashboard: dict[str, Any]) -> str:
    """``expr`` as Grafana sends it: its own variables, and the dashboard's at their All value."""
    defined = variables(dashboard)

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in GRAFANA_VARIABLES:
            return GRAFANA_VARIABLES[name]
        assert name in defined, f"{expr}: ${name} is not a variable of the dashboard"
        return str(defined[name].get("allValue") or ".*")

    return VARIABLE.sub(value, expr)


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target


def names(expr: promql_parser.Expr) -> tuple[set[str], set[str]]:
    """The metric names and the label names ``expr`` refers to: selectors, their matchers, and the
    labels of by/without and on/ignoring/group_left/group_right."""
    metrics: set[str] = set()
    labels: set[str] = set()

    def visit(node: promql_parser.Expr) -> bool:
        if isinstance(node, promql_parser.MatrixSelector):
            node = node.vector_selector
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                metrics.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    metrics.add(matcher.value)
                else:
                    labels.add(matcher.name)
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)
        if isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                labels.update(node.modifier.matching.labels)
            labels.update(node.modifier.group_labels or [])
        return True

    promql_parser.walk(expr, visit)
    return metrics, labels


def test_the_dashboard_has_grafanas_shape(dashboard: dict[str, Any]) -> None:
    for key, kind in (("title", str), ("uid", str), ("schemaVersion", int), ("panels", list)):
        assert isinstance(dashboard[key], kind), key
    datasource = variables(dashboard)["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        assert panel["type"] in PANEL_TYPES, panel["title"]
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid), panel["title"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the dashboard"
        if panel["type"] == "row":
            continue
        # Every panel and query reads the data source the variable picks, never one fixed by uid.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        targets = panel["targets"]
        assert targets, f"{panel['title']} has no query"
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in targets:
            assert target["datasource"] == panel["datasource"], panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_every_query_parses_and_names_only_what_the_sidecar_exports(
    dashboard: dict[str, Any], scrape: Scrape
) -> None:
    known_labels = scrape.labels | TARGET_LABELS
    for title, target in queries(dashboard):
        expr = expand(target["expr"], dashboard)
        try:
            parsed = promql_parser.parse(expr)
        except Exception as exc:  # the parser raises ValueError; the message says where
            raise AssertionError(f"{title}: {expr!r} is not PromQL: {exc}") from exc
        metrics, labels = names(parsed)
        assert metrics, f"{title}: {expr!r} reads no metric"
        assert metrics <= scrape.series, f"{title}: not exported: {metrics - scrape.series}"
        assert labels <= known_labels, f"{title}: no such label: {labels - known_labels}"
        legend = set(LEGEND_LABEL.findall(target.get("legendFormat", "")))
        assert legend <= known_labels, f"{title}: the legend names no such label: {legend - known_labels}"


def test_the_variables_read_an_exported_metric(dashboard: dict[str, Any], scrape: Scrape) -> None:
    for name, variable in variables(dashboard).items():
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        found = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert found, f"${name}: {query!r}"
        assert found.group(1) in scrape.series, f"${name} reads {found.group(1)}, which is not exported"
        assert found.group(2) in scrape.labels | TARGET_LABELS, f"${name}: no such label"


def test_every_exported_metric_has_a_panel(dashboard: dict[str, Any], scrape: Scrape) -> None:
    shown: set[str] = set()
    for _, target in queries(dashboard):
        shown |= names(promql_parser.parse(expand(target["expr"], dashboard)))[0]
    # A family is shown when any of its series is (a histogram through _bucket, _sum or _count).
    missing = {family for family in scrape.families if not any(s.startswith(family) for s in shown)}
    assert not missing, f"exported but on no panel: {missing}"
