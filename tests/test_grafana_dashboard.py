"""The Grafana dashboard of the Serve metrics (``infra/grafana/diki-serving.json``), checked offline.

It must be a well-formed dashboard whose every query names only metrics the serving app exports
(read from a real ``ServingMetrics`` rendering, after one request and one prediction were observed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent.parent / "infra" / "grafana" / "diki-serving.json"
# Suffixes Prometheus adds to a histogram's series.
_HISTOGRAM = ("_bucket", "_sum", "_count")


def exported_names() -> set[str]:
    from services.serving.metrics import ServingMetrics

    metrics = ServingMetrics()
    metrics.observe_request("/v1/classify", 200, 0.01)
    metrics.observe_predictions(["pets"], [0.9], [False])
    metrics.registry_call("alias", False)
    metrics.reloads.labels("loaded").inc()
    text = metrics.render().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_the_dashboard_is_valid_and_queries_only_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    names = exported_names()
    used: set[str] = set()
    for panel in panels:
        assert panel["type"] in ("timeseries", "stat") and panel["title"] and panel["targets"], panel
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            for metric in re.findall(r"\b((?:diki|process)_[a-z_]+)\b", expr):
                used.add(metric)
                assert metric in names, f"{panel['title']!r} queries {metric}, which the app does not export"
    # The figures an operator needs first are all on the board.
    for metric in ("diki_http_requests_total", "diki_routed_task_total", "diki_gate_bucket", "diki_bundle_version"):
        assert metric in used
    assert {"diki_http_request_duration_seconds" + s for s in _HISTOGRAM} & used
