"""The monitoring files in deploy/monitoring: the Prometheus scrape configs, the alert rules and the
Grafana dashboard, against the counters the steps declare (`METRICS` in runtime/steps.py) and
Triton's own.

promtool checks the configs and the rules and runs the rules' unit tests (alerts_test.yml); it is
Debian's prometheus package's binary, which `make setup` puts in .venv/bin. promql-parser (pinned in
requirements/dev-tools.txt) parses every expression, so the metric and label names are read from
the syntax tree. Like tests/test_deploy.py: a missing tool fails the test, never skips it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runtime import steps
from shoprec import contract
from shoprec.config import REPO_ROOT, load_config

MONITORING = REPO_ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = MONITORING / "alerts.yml"
STATIC_CONFIG, K8S_CONFIG = MONITORING / "prometheus.yml", MONITORING / "prometheus-k8s.yml"
DEPLOYMENT = REPO_ROOT / "deploy" / "k8s" / "deployment.yaml"
INSTALL_HINT = ("make setup installs promtool into .venv/bin (Debian package prometheus, the binary only) and "
                "promql-parser (.venv/bin/pip install -r requirements/dev-tools.txt)")

# Counters a dashboard may show before a step declares them (label names: what the dashboard groups by):
# none now. Once a step declares one, its labels are read from the code instead.
PENDING: dict[str, set[str]] = {}
NOT_ON_DASHBOARD: set[str] = set()  # counters deliberately without a panel: none
# Triton's metrics (its metrics docs) with the options serving/command.py starts it with. Not here on
# purpose: nv_inference_request_summary_us (quantiles), which needs --metrics-config summary_latencies=true.
TRITON_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_pending_request_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us", "nv_gpu_utilization", "nv_gpu_memory_total_bytes",
    "nv_gpu_memory_used_bytes", "nv_gpu_power_usage", "nv_gpu_power_limit", "nv_energy_consumption",
    "nv_cpu_utilization", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes",
}
TRITON_LABELS = {"model", "version", "reason", "gpu_uuid"}
PROMETHEUS_SERIES = {"up"}  # written by Prometheus for each target
TARGET_LABELS = {"job", "instance", "namespace", "pod", "node"}  # the scrape configs' target labels
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


def _promtool() -> str:
    found = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"promtool not found on PATH or next to {sys.executable}; {INSTALL_HINT}")
    return found


def _promtool_run(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


def _promql():
    try:
        import promql_parser
    except ImportError:
        pytest.fail(f"promql-parser is not installed; {INSTALL_HINT}")
    return promql_parser


# --- what the steps declare --------------------------------------------------------------------

def declared_metrics() -> dict[str, str]:
    """{counter or gauge name: description} of every step class in runtime/steps.py."""
    classes = [c for c in vars(steps).values() if isinstance(c, type) and issubclass(c, steps.StepImpl)]
    return {name: text for cls in classes for name, text in {**cls.METRICS, **cls.GAUGES}.items()}


def counted_labels() -> dict[str, set[str] | None]:
    """{counter name: label names} from the `self.count(name, value, label=...)` calls in runtime/steps.py;
    None where a call passes **labels (not known without running it)."""
    import ast

    found: dict[str, set[str] | None] = {}
    for node in ast.walk(ast.parse((REPO_ROOT / "runtime" / "steps.py").read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            name, labels = node.args[0].value, {k.arg for k in node.keywords}
            known = found.get(name, set())
            found[name] = None if None in labels or known is None else known | labels
    return found


def metric_labels() -> dict[str, set[str] | None]:
    """The label names each metric may carry (None: unknown), besides the target's."""
    counted = counted_labels()
    labels: dict[str, set[str] | None] = {name: counted.get(name, set()) for name in declared_metrics()}
    labels.update({name: want for name, want in PENDING.items() if name not in labels})
    labels.update({name: TRITON_LABELS for name in TRITON_METRICS})
    labels.update({name: set() for name in PROMETHEUS_SERIES})
    return labels


# --- the expressions ---------------------------------------------------------------------------

def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _rules() -> list[dict]:
    return [rule for group in _yaml(ALERTS)["groups"] for rule in group["rules"]]


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _grafana(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def dashboard_expressions() -> list[tuple[str, str]]:
    found = [(f"panel {p['title']!r} {t['refId']}", _grafana(t["expr"])) for p in _panels() for t in p["targets"]]
    for var in _dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert selector, f"variable {var['name']}: expected label_values(<selector>, <label>), got {query}"
            found.append((f"variable {var['name']}", _grafana(selector.group(1))))
    return found


def alert_expressions() -> list[tuple[str, str]]:
    return [(f"alert {r['alert']}", r["expr"]) for r in _rules()]


def _selectors(node, grouping: frozenset = frozenset()):
    """Yield (metric name, matchers, grouping labels) for every selector in a parsed expression; the grouping
    labels are those of the `by (...)` and `on (...)` clauses above the selector."""
    pq = _promql()
    if isinstance(node, pq.VectorSelector):
        matchers = list(node.matchers.matchers)
        name = node.name or next((m.value for m in matchers if m.name == "__name__"), None)
        yield name, [m for m in matchers if m.name != "__name__"], grouping
    elif isinstance(node, pq.MatrixSelector):
        yield from _selectors(node.vector_selector, grouping)
    elif isinstance(node, pq.AggregateExpr):
        by = node.modifier.labels if node.modifier is not None and node.modifier.type == pq.AggModifierType.By else []
        yield from _selectors(node.expr, grouping | set(by))
    elif isinstance(node, pq.BinaryExpr):
        on = list(node.modifier.matching.labels) if node.modifier is not None and node.modifier.matching else []
        for side in (node.lhs, node.rhs):
            yield from _selectors(side, grouping | set(on))
    elif isinstance(node, pq.Call):
        for arg in node.args:
            yield from _selectors(arg, grouping)
    elif hasattr(node, "expr"):  # parentheses, unary minus, subqueries
        yield from _selectors(node.expr, grouping)


def _parsed(expressions: list[tuple[str, str]]) -> list[tuple[str, str, list, frozenset]]:
    pq, out = _promql(), []
    for where, expr in expressions:
        try:
            tree = pq.parse(expr)
        except Exception as exc:  # noqa: BLE001 - the parser's own exception types vary by version
            pytest.fail(f"{where}: not valid PromQL ({exc}):\n{expr}")
        out += [(where, *s) for s in _selectors(tree)]
    return out


def _all_selectors():
    return _parsed(dashboard_expressions() + alert_expressions())


# --- (a) every metric is one the server publishes ----------------------------------------------

def test_every_metric_is_declared_by_a_step_or_triton():
    declared = declared_metrics()
    assert {"shoprec_requests_total", "shoprec_route_empty_total", "shoprec_list_pairs_total",
            "shoprec_online_store_used_bytes"} <= set(declared)
    known = set(declared) | set(PENDING) | TRITON_METRICS | PROMETHEUS_SERIES
    unknown = sorted({(name, where) for where, name, _, _ in _all_selectors() if name not in known})
    assert not unknown, ("metrics neither declared in a step's METRICS (runtime/steps.py) nor Triton's: "
                         + ", ".join(f"{n} ({w})" for n, w in unknown))


def test_every_step_counter_has_a_panel():
    on_dashboard = {name for _, name, _, _ in _parsed(dashboard_expressions())}
    missing = sorted((set(declared_metrics()) | set(PENDING)) - on_dashboard - NOT_ON_DASHBOARD)
    assert not missing, f"counters the steps publish that no dashboard panel shows: {missing}"


def test_labels_exist_and_values_are_real():
    labels, models = metric_labels(), {contract.ENSEMBLE} | {
        p.name for p in (REPO_ROOT / "model_repository").glob("*/*") if (p / "config.pbtxt").is_file()}
    allowed_values = {"route": set(contract.ROUTES), "model": models, "job": {"shoprec"}}
    for where, name, matchers, grouping in _all_selectors():
        have = labels.get(name)
        if have is None:
            continue
        used = {m.name for m in matchers} | set(grouping)
        assert used <= have | TARGET_LABELS, f"{where}: {name} has no label {sorted(used - have - TARGET_LABELS)}"
        for m in matchers:
            if m.name in allowed_values and re.fullmatch(r"[\w|]+", m.value):
                values = set(m.value.split("|"))
                assert values <= allowed_values[m.name], f"{where}: no {m.name} {sorted(values - allowed_values[m.name])}"


def test_metric_labels_come_from_the_code():
    labels = counted_labels()
    assert labels["shoprec_route_empty_total"] == {"route"} and labels["shoprec_requests_total"] == set()
    assert set(labels) <= set(declared_metrics()), "a step counts a metric its METRICS does not declare"


# --- (b) Prometheus configs and alert rules ----------------------------------------------------

def test_promtool_checks_the_rules():
    proc = _promtool_run("check", "rules", ALERTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in proc.stdout


def test_alert_rules_pass_their_unit_tests():
    proc = _promtool_run("test", "rules", "alerts_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = {t["alertname"] for case in _yaml(MONITORING / "alerts_test.yml")["tests"] for t in case["alert_rule_test"]
              if t.get("exp_alerts")}
    assert tested == {r["alert"] for r in _rules()}, "every alert has a unit test in which it fires"


def test_promtool_really_checks(tmp_path):
    # guards against a promtool that exits 0 without parsing
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum(rate(x[5m])\n")
    proc = _promtool_run("check", "rules", str(bad))
    assert proc.returncode != 0 and "parse error" in proc.stdout + proc.stderr


def test_alert_rules_shape():
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) and all(re.fullmatch(r"Shoprec[A-Z]\w+", n) for n in names)
    assert {"ShoprecRequestsFailing", "ShoprecDegradedShareHigh", "ShoprecRecallRouteEmpty", "ShoprecColdStartSpike",
            "ShoprecLatencyHigh"} <= set(names)
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert re.fullmatch(r"\d+m", rule["for"]), f"{rule['alert']}: a `for` rides over one bad scrape"
    degraded = next(r for r in rules if r["alert"] == "ShoprecDegradedShareHigh")
    assert degraded["for"] == "5m" and re.search(r">\s*0\.05\s*$", degraded["expr"])


@pytest.mark.parametrize("path", [STATIC_CONFIG, K8S_CONFIG], ids=lambda p: p.name)
def test_scrape_configs(path):
    config = _yaml(path)
    assert config["rule_files"] == [ALERTS.name]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "shoprec"  # the rules and the dashboard select job="shoprec"
    assert job["scrape_interval"] == "15s" and config["global"]["scrape_interval"] == "15s"
    assert job["metrics_path"] == "/metrics"
    if path == STATIC_CONFIG:
        ports = {int(t.rsplit(":", 1)[1]) for c in job["static_configs"] for t in c["targets"]}
        assert ports == {load_config().serve.metrics_port}


def test_promtool_checks_the_static_config():
    proc = _promtool_run("check", "config", STATIC_CONFIG.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_checks_the_k8s_config(tmp_path):
    """Debian's promtool is built without the Kubernetes discovery: where it refuses the field, the rest of
    the config (relabeling included) is checked with the discovery swapped for a static target, and the
    discovery block by test_k8s_discovery_finds_the_recommender_pods."""
    proc = _promtool_run("check", "config", K8S_CONFIG.name)
    if proc.returncode != 0 and "field kubernetes_sd_configs not found" in proc.stdout + proc.stderr:
        config = _yaml(K8S_CONFIG)
        job = config["scrape_configs"][0]
        assert [sd["role"] for sd in job.pop("kubernetes_sd_configs")] == ["pod"]
        job["static_configs"] = [{"targets": ["10.0.0.1:8002"]}]
        (tmp_path / K8S_CONFIG.name).write_text(yaml.safe_dump(config))
        shutil.copy(ALERTS, tmp_path / ALERTS.name)
        proc = _promtool_run("check", "config", K8S_CONFIG.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _relabel(labels: dict[str, str], rules: list[dict]) -> dict[str, str] | None:
    """Prometheus relabeling (the actions the config uses): the target's labels, or None when dropped."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep" and not match or action == "drop" and match:
            return None
        if action == "replace" and match:
            template = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rule.get("replacement", "$1"))  # Go's $1 is \g<1>
            labels[rule["target_label"]] = match.expand(template)
        elif action not in ("keep", "drop", "replace"):
            raise AssertionError(f"relabel action {action!r}: teach this test its meaning")
    return labels


def _pod_targets(pod_template: dict, job: dict) -> list[dict[str, str]]:
    """The targets Kubernetes discovery (role pod: one per container port) makes of a pod, after relabeling."""
    def meta(kind, values):
        return {f"__meta_kubernetes_pod_{kind}_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": str(v) for k, v in values.items()}

    base = {"__meta_kubernetes_namespace": "shop", "__meta_kubernetes_pod_name": "shoprec-7d9f-x2",
            "__meta_kubernetes_pod_node_name": "gpu-node-1", "__metrics_path__": job["metrics_path"],
            **meta("label", pod_template["metadata"].get("labels", {})),
            **meta("annotation", pod_template["metadata"].get("annotations", {}))}
    targets = []
    for container in pod_template["spec"]["containers"]:
        for port in container.get("ports", []):
            labels = {**base, "__address__": f"10.0.0.7:{port['containerPort']}",
                      "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                      "__meta_kubernetes_pod_container_port_number": str(port["containerPort"])}
            kept = _relabel(labels, job["relabel_configs"])
            if kept is not None:
                targets.append(kept)
    return targets


def test_k8s_discovery_finds_the_recommender_pods():
    job = _yaml(K8S_CONFIG)["scrape_configs"][0]
    pod = _yaml(DEPLOYMENT)["spec"]["template"]
    annotations, labels = pod["metadata"]["annotations"], pod["metadata"]["labels"]
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod"
    for selector in sd.get("selectors", []):  # the API server's label selector must select the Deployment's pods
        assert selector["role"] == "pod"
        assert dict(kv.split("=", 1) for kv in selector["label"].split(",")).items() <= labels.items()

    (target,) = _pod_targets(pod, job)  # the metrics port only, not gRPC
    assert target["__address__"] == f"10.0.0.7:{annotations['prometheus.io/port']}"
    assert target["__metrics_path__"] == annotations["prometheus.io/path"] == job["metrics_path"]
    assert target["pod"] == "shoprec-7d9f-x2" and target["namespace"] == "shop"

    off = {**pod, "metadata": {**pod["metadata"], "annotations": {**annotations, "prometheus.io/scrape": "false"}}}
    assert _pod_targets(off, job) == []
    redis = next(d for d in yaml.safe_load_all((REPO_ROOT / "deploy" / "k8s" / "redis.yaml").read_text())
                 if d["kind"] == "StatefulSet")
    assert _pod_targets(redis["spec"]["template"], job) == []


# --- (c) the dashboard -------------------------------------------------------------------------

def test_dashboard_is_valid_grafana_json():
    dash = _dashboard()
    assert dash["schemaVersion"] == 39 and dash["uid"] == "shoprec-recommender" and dash["title"]
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids), "panel ids must be unique"
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles))
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert set(g) == {"x", "y", "w", "h"} and all(isinstance(v, int) for v in g.values()), p["title"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]!r} and {p['title']!r} overlap"
                cells[(x, y)] = p["title"]


def test_dashboard_datasource_is_a_variable():
    dash = _dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    want = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for p in _panels():
        assert p["datasource"] == want, p["title"]
        assert p["targets"], f"{p['title']}: no query"
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == want and t["expr"].strip(), p["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == want, v["name"]


def test_dashboard_has_the_panels_operators_need():
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in _panels()}

    def shows(*names):
        return any(all(n in e for n in names) for e in exprs.values())

    assert shows("shoprec_scene_requests_total", "by (scene)") and shows("shoprec_arm_requests_total", "by (layer, arm)")
    assert shows("shoprec_cold_start_total", "shoprec_requests_total")
    assert shows("shoprec_degraded_total", "shoprec_requests_total")
    assert shows("shoprec_route_candidates_total", "by (route)", "shoprec_requests_total")
    assert shows("shoprec_served_route_items_total", "by (route)", "shoprec_served_items_total")
    assert shows("shoprec_route_empty_total", "by (route)")
    assert shows("shoprec_list_pairs_diverse_total", "shoprec_list_pairs_total")
    assert shows("nv_inference_request_duration_us", 'model="recommender"')
    assert shows("nv_inference_queue_duration_us", "by (model)") and shows("nv_inference_compute_infer_duration_us")
    assert shows("nv_inference_request_failure")
