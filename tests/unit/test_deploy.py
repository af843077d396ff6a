"""What operators run: the Kubernetes manifests, the compose file and the image definition are checked
against their schemas and against the code (setting names, queue names, ports, drain timeout)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from contracts.messages import TIERS
from worker import topology
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SETTINGS = {f"SEEDANCE_{name.upper()}" for name in Settings.model_fields}
# The video store's standard variables: read by obstore itself, never settings of ours.
STORE_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP"}
BUILTIN_KINDS = {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"}


def manifests() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    found: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def deployment() -> dict[str, Any]:
    return manifests()["Deployment/seedance-worker"]


def container() -> dict[str, Any]:
    (worker,) = deployment()["spec"]["template"]["spec"]["containers"]
    return worker


@pytest.mark.parametrize("key", sorted(k for k in manifests() if k.split("/")[0] in BUILTIN_KINDS))
def test_builtin_resources_match_the_kubernetes_schema(key: str) -> None:
    kubernetes_validate.validate(manifests()[key], desired_version="1.30.0", strict=True)


def test_every_manifest_file_is_in_the_kustomization() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_probes_use_the_health_endpoints_on_the_metrics_port() -> None:
    worker = container()
    port = next(p for p in worker["ports"] if p["name"] == "metrics")["containerPort"]
    assert port == int(manifests()["ConfigMap/seedance-worker"]["data"]["SEEDANCE_METRICS_PORT"])
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_the_grace_period_outlasts_the_drain_timeout() -> None:
    drain = float(manifests()["ConfigMap/seedance-worker"]["data"]["SEEDANCE_DRAIN_TIMEOUT_SECONDS"])
    grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= drain + 10


def test_every_configured_variable_is_a_real_setting() -> None:
    configured = set(manifests()["ConfigMap/seedance-worker"]["data"]) | {e["name"] for e in container()["env"]}
    assert configured - SETTINGS - STORE_VARIABLES == set()


def test_the_store_credentials_come_from_the_secret_and_the_store_url_is_valid() -> None:
    env = {e["name"]: e for e in container()["env"]}
    secret = manifests()["Secret/seedance-worker"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]
        assert name not in manifests()["ConfigMap/seedance-worker"]["data"]
    Settings(storage_url=manifests()["ConfigMap/seedance-worker"]["data"]["SEEDANCE_STORAGE_URL"])


def test_the_api_key_comes_from_a_mounted_secret_file() -> None:
    env = {e["name"]: e for e in container()["env"]}
    assert "SEEDANCE_API_KEY" not in env and "SEEDANCE_API_KEY" not in manifests()["ConfigMap/seedance-worker"]["data"]
    key_file = Path(env["SEEDANCE_API_KEY_FILE"]["value"])
    (mount,) = [m for m in container()["volumeMounts"] if key_file.parent == Path(m["mountPath"])]
    (volume,) = [v for v in deployment()["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    secret = manifests()[f"Secret/{volume['secret']['secretName']}"]
    (item,) = volume["secret"]["items"]
    assert item["path"] == key_file.name and item["key"] in secret["stringData"]
    assert env["SEEDANCE_AMQP_URL"]["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]


def test_resources_and_security_are_set() -> None:
    worker = container()
    assert {"cpu", "memory"} <= set(worker["resources"]["requests"])
    assert worker["securityContext"]["allowPrivilegeEscalation"] is False
    assert deployment()["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_selectors_of_service_pdb_and_monitor_match_the_pods() -> None:
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    found = manifests()
    for key in ("Service/seedance-worker",):
        assert found[key]["spec"]["selector"].items() <= labels.items()
    assert found["PodDisruptionBudget/seedance-worker"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    monitor = found["ServiceMonitor/seedance-worker"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= found["Service/seedance-worker"]["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] in {
        p["name"] for p in found["Service/seedance-worker"]["spec"]["ports"]
    }


def test_keda_scales_the_deployment_on_both_tier_queues() -> None:
    found = manifests()
    scaled = found["ScaledObject/seedance-worker"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment()["metadata"]["name"]
    queues = {t["metadata"]["queueName"] for t in scaled["spec"]["triggers"] if t["type"] == "rabbitmq"}
    assert queues == {topology.job_queue(tier) for tier in TIERS}
    auth = found["TriggerAuthentication/seedance-rabbitmq"]
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["key"] in found[f"Secret/{ref['name']}"]["stringData"]
    assert scaled["spec"]["minReplicaCount"] >= found["PodDisruptionBudget/seedance-worker"]["spec"]["minAvailable"]


def test_the_compose_file_matches_the_compose_specification() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_compose_stack_is_wired_to_real_files_and_settings() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"rabbitmq", "mock", "worker", "prometheus", "grafana"} <= set(services)
    assert set(services["worker"]["environment"]) <= SETTINGS | STORE_VARIABLES
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"
        build = service.get("build")
        if build:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).exists()
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert f"worker:{services['worker']['environment']['SEEDANCE_METRICS_PORT']}" in targets
    assert Path(prometheus["rule_files"][0]).name == "alerts.yml"
    assert services["worker"]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"


def test_the_compose_worker_writes_to_the_compose_store_with_its_credentials() -> None:
    import json  # noqa: PLC0415

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    worker, store = services["worker"]["environment"], services["seaweedfs"]
    settings = Settings(storage_url=worker["SEEDANCE_STORAGE_URL"])
    assert settings.storage_url is not None and settings.storage_url.startswith("s3://")
    port = next(a.split("=")[1] for a in store["command"] if a.startswith("-s3.port="))
    assert worker["AWS_ENDPOINT_URL"] == f"http://seaweedfs:{port}" and worker["AWS_ALLOW_HTTP"] == "true"
    config = next(v.split(":")[0] for v in store["volumes"] if v.endswith("/etc/seaweedfs/s3.json:ro"))
    identities = json.loads((COMPOSE.parent / config).read_text())["identities"]
    keys = {(c["accessKey"], c["secretKey"]) for i in identities for c in i["credentials"]}
    assert (worker["AWS_ACCESS_KEY_ID"], worker["AWS_SECRET_ACCESS_KEY"]) in keys
    assert services["worker"]["depends_on"]["seaweedfs"]["condition"] == "service_healthy"


def test_the_image_runs_as_a_numeric_non_root_user_and_copies_what_exists() -> None:
    lines = [line.split() for line in DOCKERFILE.read_text().splitlines() if line and not line.startswith("#")]
    users = [words[1] for words in lines if words[0] == "USER"]
    assert users and users[-1].isdigit() and users[-1] != "0"
    for words in lines:
        if words[0] == "COPY" and not any(w.startswith("--from") for w in words):
            for source in words[1:-1]:
                assert (ROOT / source).exists(), source
    assert lines[-1][0] == "CMD" and "seedance-worker" in " ".join(lines[-1])


def test_the_wheel_the_image_installs_carries_schemas_sample_and_commands(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in (
        "contracts/openapi.json",
        "contracts/asyncapi.json",
        "contracts/schemas/job_message.schema.json",
        "worker/samples/boat.png",
        "mock_server/app.py",
    ):
        assert needed in names
    assert not any(n.startswith(("tests/", "deploy/", "scripts/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for command in ("seedance-worker", "seedance-mock", "seedance ="):
        assert command in text


def test_the_prometheus_rule_carries_the_same_alerts_as_alerts_yml() -> None:
    rule = manifests()["PrometheusRule/seedance-worker"]
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())


def test_the_dashboard_is_well_formed() -> None:
    import json  # noqa: PLC0415

    board = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "seedance.json").read_text())
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "tier"} <= variables
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["description"], panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            for used in set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}:
                assert used in variables, (panel["title"], used)
    provisioned = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/seedance.yml").read_text())
    assert provisioned["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
