"""Offline checks of infra/: the Dockerfile, the Kubernetes and KubeRay manifests, the Prefect deployments.

Nothing here needs a cluster. The manifests are parsed and checked against the fields Kubernetes
and the KubeRay CRDs (ray.io/v1) require, against the repository layout (the Serve import path,
the flow entrypoints), against each other (Services, ConfigMaps, Secrets, images) and against the
settings model (every variable they set must load).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.settings import STANDARD_ENV, Settings

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
KUSTOMIZE_FILES = {"kustomization.yaml", "kustomizeconfig.yaml"}
KINDS = {"Namespace", "ConfigMap", "Service", "Deployment", "StatefulSet", "RayCluster", "RayService"}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SECRET_NAME_RE = re.compile(r"(SECRET|PASSWORD|TOKEN|API_KEY|ACCESS_KEY|BACKEND_STORE_URI|CONNECTION_URL)")
URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
PROJECT_VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
OUR_IMAGE = re.compile(rf"^diki:{re.escape(PROJECT_VERSION)}-(cpu|cuda)$")

# Fields of the KubeRay v1 CRDs (ray.io/v1) this project may use.
RAYCLUSTER_SPEC = {
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headGroupSpec",
    "workerGroupSpecs",
    "headServiceAnnotations",
    "suspend",
    "gcsFaultToleranceOptions",
    "managedBy",
}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "suspend",
    "numOfHosts",
    "idleTimeoutSeconds",
}
AUTOSCALER_OPTIONS = {"idleTimeoutSeconds", "resources", "upscalingMode", "image", "imagePullPolicy", "env", "envFrom"}
RAYSERVICE_SPEC = {
    "serveConfigV2",
    "rayClusterConfig",
    "upgradeStrategy",
    "serviceUnhealthySecondThreshold",
    "deploymentUnhealthySecondThreshold",
    "excludeHeadPodFromServeSvc",
    "serveService",
}
SERVE_CONFIG = {"proxy_location", "http_options", "grpc_options", "logging_config", "applications"}
SERVE_APP = {"name", "import_path", "route_prefix", "args", "deployments", "runtime_env", "logging_config"}
SERVE_DEPLOYMENT = {
    "name",
    "num_replicas",
    "max_ongoing_requests",
    "max_queued_requests",
    "autoscaling_config",
    "ray_actor_options",
    "user_config",
    "health_check_period_s",
    "health_check_timeout_s",
    "graceful_shutdown_timeout_s",
    "graceful_shutdown_wait_loop_s",
    "placement_group_bundles",
    "placement_group_strategy",
    "max_replicas_per_node",
    "logging_config",
}


# -- loading ----------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name not in KUSTOMIZE_FILES)


def load_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                docs.append((path, doc))
    return docs


DOCS = load_docs()


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def ray_clusters() -> Iterator[tuple[str, dict[str, Any]]]:
    """Each RayCluster spec, and the cluster spec inside each RayService."""
    for doc in by_kind("RayCluster"):
        yield doc["metadata"]["name"], doc["spec"]
    for doc in by_kind("RayService"):
        yield doc["metadata"]["name"], doc["spec"]["rayClusterConfig"]


def pod_templates() -> Iterator[tuple[str, dict[str, Any]]]:
    """(owner, pod template) for every workload, Ray head and worker groups included."""
    for kind in ("Deployment", "StatefulSet"):
        for doc in by_kind(kind):
            yield f"{kind}/{doc['metadata']['name']}", doc["spec"]["template"]
    for name, spec in ray_clusters():
        yield f"{name}/head", spec["headGroupSpec"]["template"]
        for group in spec["workerGroupSpecs"]:
            yield f"{name}/{group['groupName']}", group["template"]


def containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for owner, template in pod_templates():
        spec = template["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield owner, template, container


def config_maps() -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc.get("data", {}) for doc in by_kind("ConfigMap")}


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets, with every secret replaced by a placeholder."""
    maps = config_maps()
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in item["valueFrom"]:
            env[item["name"]] = f"placeholder-{item['valueFrom']['secretKeyRef']['key'].lower()}"
        elif "configMapKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["configMapKeyRef"]
            if ref["key"] in maps[ref["name"]]:
                env[item["name"]] = maps[ref["name"]][ref["key"]]
    return env


def runs_our_code(container: dict[str, Any]) -> bool:
    return container["image"].split(":")[0] == "diki"


# -- every file parses ------------------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert len(files) >= 8
    for path in files:
        list(yaml.safe_load_all(path.read_text(encoding="utf-8")))


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {p.name for p in manifest_files()}
    assert kustomization["namespace"] == "diki"
    assert {"name": "diki", "newName": "diki"} in kustomization["images"]


# -- Kubernetes fields ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "doc"), DOCS, ids=[f"{p.name}:{d.get('kind')}/{d.get('metadata', {}).get('name')}" for p, d in DOCS]
)
def test_required_kubernetes_fields(path: Path, doc: dict[str, Any]) -> None:
    assert doc.get("apiVersion"), f"{path.name}: apiVersion missing"
    assert doc.get("kind") in KINDS, f"{path.name}: kind {doc.get('kind')!r} (a Secret never goes in a manifest)"
    metadata = doc.get("metadata", {})
    assert DNS_1123.fullmatch(metadata.get("name", "")), f"{path.name}: metadata.name {metadata.get('name')!r}"
    assert "app.kubernetes.io/name" in metadata.get("labels", {}), f"{path.name}: {metadata['name']} has no name label"
    assert "namespace" not in metadata, "the namespace comes from kustomization.yaml"
    expected_api = {
        "Namespace": "v1",
        "ConfigMap": "v1",
        "Service": "v1",
        "Deployment": "apps/v1",
        "StatefulSet": "apps/v1",
        "RayCluster": "ray.io/v1",
        "RayService": "ray.io/v1",
    }
    assert doc["apiVersion"] == expected_api[doc["kind"]]
    if doc["kind"] in ("Deployment", "StatefulSet"):
        spec = doc["spec"]
        selector = spec["selector"]["matchLabels"]
        labels = spec["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{metadata['name']}: selector does not match the pod labels"
        assert spec["template"]["spec"]["containers"]
    if doc["kind"] == "Service":
        assert doc["spec"]["selector"] and doc["spec"]["ports"]


def test_every_container_is_complete() -> None:
    seen = 0
    for owner, _, container in containers():
        seen += 1
        assert DNS_1123.fullmatch(container["name"]), owner
        assert container.get("image"), f"{owner}: no image"
        resources = container.get("resources", {})
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(section, {})), f"{owner}/{container['name']}: {section}"
        for port in container.get("ports", []):
            assert isinstance(port["containerPort"], int)
        for item in container.get("env", []):
            assert ("value" in item) != ("valueFrom" in item), f"{owner}: env {item['name']}"
    assert seen >= 8


def test_services_select_pods_and_ports() -> None:
    templates = [t for _, t in pod_templates()]
    for service in by_kind("Service"):
        selector = service["spec"]["selector"]
        matching = [t for t in templates if selector.items() <= t["metadata"]["labels"].items()]
        assert matching, f"Service {service['metadata']['name']} selects no pod"
        names = {p.get("name") for t in matching for c in t["spec"]["containers"] for p in c.get("ports", [])}
        numbers = {p["containerPort"] for t in matching for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names | numbers, (
                f"{service['metadata']['name']}: targetPort {port['targetPort']}"
            )


def test_probes_on_long_running_servers() -> None:
    for kind in ("Deployment", "StatefulSet"):
        for doc in by_kind(kind):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert "livenessProbe" in container, f"{doc['metadata']['name']}: no liveness probe"


# -- secrets and config -----------------------------------------------------------------------------


def test_secrets_only_through_secret_refs() -> None:
    for name, data in config_maps().items():
        for key, value in data.items():
            assert not SECRET_NAME_RE.search(key), f"ConfigMap {name} holds {key}: put it in a Secret"
            assert not URL_WITH_PASSWORD.search(str(value)), f"ConfigMap {name}: {key} has a password in a URL"
    for owner, _, container in containers():
        for item in container.get("env", []):
            if SECRET_NAME_RE.search(item["name"]):
                assert "secretKeyRef" in item.get("valueFrom", {}), f"{owner}: {item['name']} must come from a Secret"
            assert not URL_WITH_PASSWORD.search(str(item.get("value", ""))), f"{owner}: {item['name']}"
    for path in manifest_files():
        assert not re.search(r"^kind:\s*Secret\s*$", path.read_text(), re.M), f"{path.name} defines a Secret"


def secret_refs() -> set[tuple[str, str]]:
    refs = set()
    for _, _, container in containers():
        for item in container.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.add((ref["name"], ref["key"]))
    return refs


def test_deploy_doc_creates_every_secret_the_manifests_use() -> None:
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    created: set[tuple[str, str]] = set()
    for match in re.finditer(r"create secret generic ([a-z0-9-]+)((?:[^\n]*\\\n)*[^\n]*)", text):
        for key in re.findall(r"--from-literal=([A-Za-z0-9_]+)=", match.group(2)):
            created.add((match.group(1), key))
    missing = secret_refs() - created
    assert not missing, f"docs/deploy.md does not create {sorted(missing)}"


def test_config_map_references_resolve() -> None:
    maps = config_maps()
    for owner, _, container in containers():
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] in maps, owner
        for item in container.get("env", []):
            ref = item.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                assert ref["name"] in maps, owner
                assert ref.get("optional") or ref["key"] in maps[ref["name"]], f"{owner}: {ref}"


def field_paths(model: type, prefix: str = "") -> set[str]:
    paths = set()
    for name, info in model.model_fields.items():  # type: ignore[attr-defined]
        annotation = info.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            paths |= field_paths(annotation, f"{prefix}{name}__")
        else:
            paths.add(f"{prefix}{name}".upper())
    return paths


def test_env_names_and_values_match_the_settings_model(monkeypatch: pytest.MonkeyPatch) -> None:
    known = field_paths(Settings)
    checked = 0
    for owner, _, container in containers():
        if not runs_our_code(container):
            continue
        env = container_env(container)
        for name in env:
            if name.startswith("DIKI_"):
                assert name.removeprefix("DIKI_") in known, f"{owner}: {name} is not a setting"
        for name in list(os.environ):
            if name.startswith("DIKI_") or name in STANDARD_ENV:
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        settings = Settings.load()
        checked += 1
        if any(s["configMapRef"]["name"] == "diki-config" for s in container.get("envFrom", [])):
            data = config_maps()["diki-config"]
            assert settings.storage.root == data["DIKI_STORAGE__ROOT"]
            assert settings.mlflow.tracking_uri == data["MLFLOW_TRACKING_URI"]
            assert settings.s3.access_key_id is not None, f"{owner}: no S3 credentials"
    assert checked >= 6


def test_mlflow_artifacts_go_to_the_storage_bucket() -> None:
    bucket = config_maps()["diki-config"]["DIKI_STORAGE__ROOT"].removeprefix("s3://").split("/")[0]
    (mlflow,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    command = " ".join(mlflow["spec"]["template"]["spec"]["containers"][0]["command"])
    assert f"--artifacts-destination=s3://{bucket}/" in command
    assert "--host=0.0.0.0" in command


# -- images -----------------------------------------------------------------------------------------


def test_images_are_pinned_and_consistent() -> None:
    for owner, _, container in containers():
        image = container["image"]
        if runs_our_code(container):
            assert OUR_IMAGE.fullmatch(image), f"{owner}: {image} (expected diki:{PROJECT_VERSION}-cpu|cuda)"
        else:
            assert ":" in image and not image.endswith(":latest"), f"{owner}: {image} must name a version"
    for name, spec in ray_clusters():
        images = {c["image"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]}
        for group in spec["workerGroupSpecs"]:
            images |= {c["image"] for c in group["template"]["spec"]["containers"]}
        assert len(images) == 1, f"{name}: head and workers must run one image, not {images}"
        gpu = any(
            "nvidia.com/gpu" in c["resources"]["limits"]
            for g in spec["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]
        )
        assert not gpu or images == {f"diki:{PROJECT_VERSION}-cuda"}, f"{name}: GPU workers need the cuda image"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_kustomize_renders_and_rewrites_every_image(tmp_path: Path) -> None:
    shutil.copytree(K8S, tmp_path / "base")
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["base"], "images": [{"name": "diki", "newName": "registry.example.com/ml/diki"}]})
    )
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert all(d["metadata"].get("namespace") == "diki" for d in rendered if d["kind"] != "Namespace")
    images = re.findall(r"image:\s*(\S+)", out.stdout)
    ours = [i for i in images if "diki:" in i]
    assert ours and all(i.startswith("registry.example.com/ml/diki:") for i in ours), ours


# -- KubeRay ----------------------------------------------------------------------------------------


def check_ray_cluster(name: str, spec: dict[str, Any]) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC, f"{name}: unknown RayCluster fields {set(spec) - RAYCLUSTER_SPEC}"
    assert spec["rayVersion"] == version("ray"), f"{name}: rayVersion {spec['rayVersion']} != installed ray"
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP and {"rayStartParams", "template"} <= set(head), f"{name}: headGroupSpec"
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0].get("ports", [])}
    assert {6379, 8265} <= head_ports, f"{name}: head must expose GCS 6379 and the dashboard 8265"
    groups = spec["workerGroupSpecs"]
    assert groups, f"{name}: no workerGroupSpecs"
    for group in groups:
        assert set(group) <= WORKER_GROUP, f"{name}: unknown worker group fields {set(group) - WORKER_GROUP}"
        assert {"groupName", "rayStartParams", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{name}/{group['groupName']}"
        for container in group["template"]["spec"]["containers"]:
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            if gpus is not None:
                assert container["resources"]["requests"].get("nvidia.com/gpu") == gpus
                tolerations = group["template"]["spec"].get("tolerations", [])
                assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), f"{name}: GPU toleration"
    for params in [head["rayStartParams"], *(g["rayStartParams"] for g in groups)]:
        assert all(isinstance(v, str) for v in params.values()), f"{name}: rayStartParams values must be strings"


def test_rayclusters_follow_the_crd() -> None:
    clusters = list(ray_clusters())
    assert {n for n, _ in clusters} == {"diki-train", "diki-serve"}
    for name, spec in clusters:
        check_ray_cluster(name, spec)
    (train,) = [s for n, s in clusters if n == "diki-train"]
    assert any(
        "nvidia.com/gpu" in c["resources"]["limits"]
        for g in train["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    )


def app_args_fields(module: Path) -> set[str]:
    """The fields of ``AppArgs``, defined in ``module`` or in the module it imports it from."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "AppArgs":
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
        if isinstance(node, ast.ImportFrom) and node.module and any(a.name == "AppArgs" for a in node.names):
            return app_args_fields(REPO / (node.module.replace(".", "/") + ".py"))
    raise AssertionError(f"{module} defines no AppArgs")


def test_rayservice_serve_config() -> None:
    (service,) = by_kind("RayService")
    spec = service["spec"]
    assert set(spec) <= RAYSERVICE_SPEC, f"unknown RayService fields {set(spec) - RAYSERVICE_SPEC}"
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    config = yaml.safe_load(spec["serveConfigV2"])
    assert set(config) <= SERVE_CONFIG
    assert config["applications"]
    worker_gpus = max(
        float(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in spec["rayClusterConfig"]["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    )
    for app in config["applications"]:
        assert set(app) <= SERVE_APP and {"name", "import_path", "route_prefix", "deployments"} <= set(app)
        assert app["route_prefix"].startswith("/")
        module_name, _, function = app["import_path"].partition(":")
        assert module_name == "services.serving.app" and function == "build_app"
        module = REPO / (module_name.replace(".", "/") + ".py")
        assert module.is_file(), f"{app['import_path']}: {module.relative_to(REPO)} does not exist"
        source = module.read_text(encoding="utf-8")
        assert re.search(rf"^def {function}\(", source, re.M), f"{module.name} defines no {function}()"
        assert set(app.get("args", {})) <= app_args_fields(module), "args must be fields of AppArgs"
        for deployment in app["deployments"]:
            assert set(deployment) <= SERVE_DEPLOYMENT, (
                f"unknown deployment options {set(deployment) - SERVE_DEPLOYMENT}"
            )
            assert f'"{deployment["name"]}"' in source, f"{module.name} has no deployment named {deployment['name']}"
            options = deployment.get("ray_actor_options", {})
            assert float(options.get("num_gpus", 0)) <= worker_gpus, "a replica asks for more GPUs than a worker has"
            assert float(options.get("num_gpus", 0)) == float(app.get("args", {}).get("num_gpus", 0))


# -- Prefect ----------------------------------------------------------------------------------------


PREFECT_FILE = INFRA / "prefect" / "prefect.yaml"


def test_prefect_yaml_matches_worker_and_settings() -> None:
    data = yaml.safe_load(PREFECT_FILE.read_text(encoding="utf-8"))
    config = config_maps()["diki-config"]
    (worker,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "prefect-worker"]
    command = worker["spec"]["template"]["spec"]["containers"][0]["command"]
    pool = command[command.index("--pool") + 1]
    assert pool == config["DIKI_PIPELINE__WORK_POOL"]
    names = {d["name"] for d in data["deployments"]}
    assert {"watch-incoming", "learn-dataset"} <= names
    for deployment in data["deployments"]:
        assert deployment["work_pool"]["name"] == pool
        path, _, function = deployment["entrypoint"].partition(":")
        assert path.endswith(".py") and function.isidentifier() and not Path(path).is_absolute()
    (watch,) = [d for d in data["deployments"] if d["name"] == "watch-incoming"]
    assert float(watch["schedules"][0]["interval"]) == float(config["DIKI_PIPELINE__POLL_INTERVAL_S"])
    assert data["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/app"
    assert data["prefect-version"] == version("prefect")


def test_prefect_yaml_validates_with_prefect() -> None:
    models = pytest.importorskip("prefect.cli.deploy._models")
    parsed = models.PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_FILE.read_text(encoding="utf-8")))
    assert all(d.entrypoint and d.work_pool and d.work_pool.name for d in parsed.deployments)


@pytest.mark.parametrize("deployment", yaml.safe_load(PREFECT_FILE.read_text())["deployments"], ids=lambda d: d["name"])
def test_prefect_entrypoints_exist(deployment: dict[str, Any]) -> None:
    # Read, never imported: the module must exist and define the flow function at its top level.
    path, _, function = deployment["entrypoint"].partition(":")
    module = REPO / path
    assert module.is_file(), f"{deployment['name']}: entrypoint module {path} is not in the repository"
    tree = ast.parse(module.read_text(encoding="utf-8"), filename=str(module))
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
    assert function in defined, f"{deployment['name']}: {path} defines no top-level function {function!r}"


# -- Dockerfile -------------------------------------------------------------------------------------


def test_dockerfile() -> None:
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG VARIANT=cpu$", dockerfile, re.M)
    assert "cpu)" in dockerfile and "cuda)" in dockerfile
    assert "requirements.lock" in dockerfile
    assert re.search(r"^USER (?!root)\S+", dockerfile, re.M), "the image must not run as root"
    for match in re.finditer(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", dockerfile, re.M):
        for source in match.group(1).split():
            if "[" in source:
                continue
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    for line in (INFRA / "docker" / "requirements-server.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", line.strip()), f"pin {line!r} exactly"
    lock = (REPO / "requirements.lock").read_text()
    for name in ("torch", "torchvision"):
        assert re.search(rf"^{name}==", lock, re.M), f"the CPU variant takes the {name} pin from requirements.lock"
