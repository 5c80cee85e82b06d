"""The deployment files (compose, Prometheus, collector, Grafana) are consistent with each other and with the proxy.

No Docker engine runs here, so these tests parse the files and check their
structure: services and ports, that the proxy's command line is one the CLI
accepts, that scrape, trace and data-source addresses point at services that
exist, and that every PromQL expression of the dashboard names only metrics the
proxy's registry exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from proxy.cli import build_parser
from proxy.observability.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DASHBOARD = json.loads((REPO / "deploy/grafana/dashboards/purpose-proxy.json").read_text())


def host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.split("//")[-1], int(port)


def mounts(service: str) -> dict[str, str]:
    """Container path -> host path of a service's bind mounts (read-only suffix dropped)."""
    out = {}
    for v in SERVICES[service].get("volumes", []):
        parts = v.split(":")
        out[parts[1]] = parts[0]
    return out


def proxy_args():
    return build_parser().parse_args(SERVICES["purpose-proxy"]["command"])


def published(service: str) -> set[int]:
    return {int(str(p).split(":")[-1]) for p in SERVICES[service].get("ports", [])}


def test_services_and_ports():
    assert set(SERVICES) >= {"postgres", "purpose-proxy", "prometheus", "grafana", "otel-collector", "jaeger"}
    assert {6432, 9187} <= published("purpose-proxy")
    assert 9090 in published("prometheus") and 3000 in published("grafana") and 16686 in published("jaeger")
    for name, svc in SERVICES.items():
        for dep in svc.get("depends_on", {}):
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"


def test_bind_mounted_files_exist():
    for name in SERVICES:
        for target, source in mounts(name).items():
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source} (for {target}) does not exist"


def test_postgres_loads_the_sample_schema_as_an_init_script():
    init = {t: s for t, s in mounts("postgres").items() if t.startswith("/docker-entrypoint-initdb.d/")}
    assert list(init.values()) == ["./proxy/devtools/sample/schema.sql"]
    assert next(iter(init)).endswith(".sql")


def test_proxy_command_is_one_the_cli_accepts_and_points_at_the_services():
    args = proxy_args()
    assert args.command == "serve"
    assert host_port(args.upstream) == ("postgres", 5432)
    assert "@postgres:5432/" in args.schema_dsn
    assert host_port(args.metrics_listen) == ("0.0.0.0", 9187)
    assert args.trace_exporter == "otlp" and host_port(args.otlp_endpoint) == ("otel-collector", 4318)
    audit_volume = mounts("purpose-proxy")[Path(args.audit_path).parent.as_posix()]  # the audit log outlives the container
    assert audit_volume in COMPOSE["volumes"]
    assert "/readyz" in " ".join(SERVICES["purpose-proxy"]["healthcheck"]["test"])


def test_dockerfile_installs_the_otlp_exporter_the_compose_file_needs():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "otlp" in re.search(r'pip install[^\n]*"\.\[([^\]]*)\]"', dockerfile).group(1).split(",")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r"^otlp = \[.*opentelemetry-exporter-otlp-proto-http", pyproject, re.M)


def test_prometheus_scrapes_the_proxy():
    target = mounts("prometheus")["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load((REPO / target).read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "purpose-proxy"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["purpose-proxy:9187"]
    assert host_port(targets[0])[1] == host_port(proxy_args().metrics_listen)[1]


def test_collector_receives_otlp_and_exports_to_jaeger():
    target = mounts("otel-collector")[SERVICES["otel-collector"]["command"][0].split("=", 1)[1]]
    config = yaml.safe_load((REPO / target).read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    assert host_port(protocols["http"]["endpoint"])[1] == host_port(proxy_args().otlp_endpoint)[1]
    assert host_port(protocols["grpc"]["endpoint"])[1] == 4317
    pipeline = config["service"]["pipelines"]["traces"]
    assert "otlp" in pipeline["receivers"]
    exporters = [config["exporters"][e] for e in pipeline["exporters"]]
    assert any(host_port(e.get("endpoint", ":0"))[0] == "jaeger" for e in exporters)
    assert all(p in config["processors"] for p in pipeline["processors"])
    assert SERVICES["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


def test_grafana_provisioning():
    grafana = mounts("grafana")
    provisioning = REPO / grafana["/etc/grafana/provisioning"]
    sources = yaml.safe_load((provisioning / "datasources/datasources.yaml").read_text())["datasources"]
    by_uid = {s["uid"]: s for s in sources}
    assert by_uid["prometheus"]["url"] == "http://prometheus:9090"
    assert host_port(by_uid["jaeger"]["url"])[0] == "jaeger"
    providers = yaml.safe_load((provisioning / "dashboards/dashboards.yaml").read_text())["providers"]
    path = providers[0]["options"]["path"]
    assert path in grafana and (REPO / grafana[path] / "purpose-proxy.json").exists()
    for panel in DASHBOARD["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in by_uid


_STRIP = [re.compile(r'"(?:[^"\\]|\\.)*"'), re.compile(r"\{[^}]*\}"), re.compile(r"\[[^\]]*\]"),
          re.compile(r"\b(?:by|without)\s*\([^)]*\)")]
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (identifiers that are not functions, labels or keywords)."""
    for pattern in _STRIP:
        expr = pattern.sub(" ", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[m.end():].lstrip()
        if rest.startswith("(") or m.group(0) in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="y"}[5m]))) / b') == {"a_bucket", "b"}
    assert metric_names("time() - purpose_proxy_x") == {"purpose_proxy_x"}


def dashboard_expressions() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in DASHBOARD["panels"] for t in p["targets"]]


@pytest.mark.parametrize("title,expr", dashboard_expressions())
def test_every_dashboard_query_uses_only_exported_metrics(title, expr):
    exported = Metrics(process=False).names()
    names = metric_names(expr)
    assert names, f"{title}: no metric in {expr}"
    assert names <= exported, f"{title}: {sorted(names - exported)} not exported by the proxy"


def test_dashboard_covers_what_operators_and_auditors_look_at():
    titles = " | ".join(p["title"].lower() for p in DASHBOARD["panels"])
    for topic in ("decisions by purpose", "decisions by category", "refusals", "latency", "sessions", "reloads"):
        assert topic in titles, topic
    exprs = " ".join(e for _, e in dashboard_expressions())
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for p in DASHBOARD["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24


def test_the_image_builds_the_compiled_framing_loop():
    # setup.py must be in the build context, and a compiler present while pip installs.
    dockerfile = (REPO / "Dockerfile").read_text()
    copied = re.search(r"^COPY ([^\n]*) \./$", dockerfile, re.M).group(1).split()
    assert "setup.py" in copied and "pyproject.toml" in copied
    install = dockerfile.index("pip install")
    assert dockerfile.index("gcc") < install < dockerfile.index("apt-get purge")
