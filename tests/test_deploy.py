"""Static checks of deploy/ (KubeRay manifests, Ray cluster launcher config, Dockerfile).

Nothing here talks to a cluster: these catch the mistakes that otherwise show up only after an
image push and a `kubectl apply` (a misspelt field that the API server silently prunes, a
/dev/shm that makes Ray spill to disk, a GPU flag on a CPU node, a token missing on one pod).
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
YAML_FILES = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))

AUTH_SECRET_KEY = "auth_token"  # the key KubeRay reads from authOptions.secretName
GPU_RESOURCE = "nvidia.com/gpu"

# --- Allowed fields ---------------------------------------------------------------------------
# A schema maps every allowed key to the schema of its value; ANY stops the walk (scalars, label
# maps, objects not checked here). Lists are checked item by item against the same schema.
# CRDs with structural schemas prune unknown fields without an error, so a typo such as
# `rayStartParam` would be dropped silently; this walk turns it into a test failure.
ANY = None

# Kubernetes core/v1, only the parts the manifests use (plus a few an operator is likely to add).
KEY_SELECTOR = {"name": ANY, "key": ANY, "optional": ANY}
ENV_VAR = {
    "name": ANY,
    "value": ANY,
    "valueFrom": {
        "secretKeyRef": KEY_SELECTOR,
        "configMapKeyRef": KEY_SELECTOR,
        "fieldRef": ANY,
        "resourceFieldRef": ANY,
    },
}
RESOURCE_REQUIREMENTS = {"requests": ANY, "limits": ANY, "claims": ANY}
VOLUME_MOUNT = {"name": ANY, "mountPath": ANY, "subPath": ANY, "readOnly": ANY}
CONTAINER_PORT = {"name": ANY, "containerPort": ANY, "protocol": ANY}
CONTAINER = {
    "name": ANY,
    "image": ANY,
    "imagePullPolicy": ANY,
    "command": ANY,
    "args": ANY,
    "workingDir": ANY,
    "env": ENV_VAR,
    "envFrom": ANY,
    "ports": CONTAINER_PORT,
    "resources": RESOURCE_REQUIREMENTS,
    "volumeMounts": VOLUME_MOUNT,
    "securityContext": ANY,
    "lifecycle": ANY,
}
VOLUME = {
    "name": ANY,
    "persistentVolumeClaim": {"claimName": ANY, "readOnly": ANY},
    "emptyDir": {"medium": ANY, "sizeLimit": ANY},
    "secret": ANY,
    "configMap": ANY,
}
POD_SPEC = {
    "containers": CONTAINER,
    "initContainers": CONTAINER,
    "volumes": VOLUME,
    "nodeSelector": ANY,
    "tolerations": ANY,
    "affinity": ANY,
    "imagePullSecrets": ANY,
    "serviceAccountName": ANY,
    "securityContext": ANY,
    "priorityClassName": ANY,
    "terminationGracePeriodSeconds": ANY,
}
POD_TEMPLATE = {"metadata": {"labels": ANY, "annotations": ANY}, "spec": POD_SPEC}

# KubeRay ray.io/v1 json tags, from ray-operator/apis/ray/v1/raycluster_types.go and
# rayjob_types.go (github.com/ray-project/kuberay).
AUTH_OPTIONS = {"mode": ANY, "secretName": ANY, "enableK8sTokenAuth": ANY}
AUTOSCALER_OPTIONS = {
    "resources": RESOURCE_REQUIREMENTS,
    "image": ANY,
    "imagePullPolicy": ANY,
    "securityContext": ANY,
    "idleTimeoutSeconds": ANY,
    "upscalingMode": ANY,
    "version": ANY,
    "env": ENV_VAR,
    "envFrom": ANY,
    "volumeMounts": VOLUME_MOUNT,
    "command": ANY,
    "args": ANY,
}
HEAD_GROUP_SPEC = {
    "template": POD_TEMPLATE,
    "headService": ANY,
    "enableIngress": ANY,
    "ingressOptions": ANY,
    "resources": ANY,
    "labels": ANY,
    "rayStartParams": ANY,
    "serviceType": ANY,
}
WORKER_GROUP_SPEC = {
    "suspend": ANY,
    "groupName": ANY,
    "replicas": ANY,
    "minReplicas": ANY,
    "maxReplicas": ANY,
    "idleTimeoutSeconds": ANY,
    "priority": ANY,
    "resources": ANY,
    "labels": ANY,
    "rayStartParams": ANY,
    "template": POD_TEMPLATE,
    "scaleStrategy": {"workersToDelete": ANY},
    "numOfHosts": ANY,
}
RAY_CLUSTER_SPEC = {
    "upgradeStrategy": {"type": ANY},
    "authOptions": AUTH_OPTIONS,
    "suspend": ANY,
    "managedBy": ANY,
    "autoscalerOptions": AUTOSCALER_OPTIONS,
    "headServiceAnnotations": ANY,
    "enableInTreeAutoscaling": ANY,
    "gcsFaultToleranceOptions": ANY,
    "historyServerOptions": ANY,
    "networkPolicy": ANY,
    "tlsOptions": {"enabled": ANY},
    "headGroupSpec": HEAD_GROUP_SPEC,
    "rayVersion": ANY,
    "workerGroupSpecs": WORKER_GROUP_SPEC,
}
RAY_JOB_SPEC = {
    "activeDeadlineSeconds": ANY,
    "backoffLimit": ANY,
    "rayClusterSpec": RAY_CLUSTER_SPEC,
    "submitterPodTemplate": POD_TEMPLATE,
    "metadata": ANY,
    "clusterSelector": ANY,
    "submitterConfig": ANY,
    "managedBy": ANY,
    "deletionStrategy": ANY,
    "entrypoint": ANY,
    "runtimeEnvYAML": ANY,
    "jobId": ANY,
    "submissionMode": ANY,
    "entrypointResources": ANY,
    "entrypointNumCpus": ANY,
    "entrypointNumGpus": ANY,
    "ttlSecondsAfterFinished": ANY,
    "preRunningDeadlineSeconds": ANY,
    "shutdownAfterJobFinishes": ANY,
    "suspend": ANY,
}
OBJECT = {"apiVersion": ANY, "kind": ANY, "metadata": ANY}
DOCUMENT_SCHEMAS = {
    "RayJob": {**OBJECT, "spec": RAY_JOB_SPEC},
    "RayCluster": {**OBJECT, "spec": RAY_CLUSTER_SPEC},
}

# Ray cluster launcher, from python/ray/autoscaler/ray-schema.json (Ray 2.60).
LAUNCHER_TOP = {
    "cluster_name",
    "max_workers",
    "upscaling_speed",
    "idle_timeout_minutes",
    "docker",
    "provider",
    "auth",
    "available_node_types",
    "head_node_type",
    "file_mounts",
    "file_mounts_sync_continuously",
    "cluster_synced_files",
    "rsync_exclude",
    "rsync_filter",
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
    "no_restart",
    "metadata",
}
LAUNCHER_DOCKER = {
    "image",
    "head_image",
    "worker_image",
    "container_name",
    "pull_before_run",
    "run_options",
    "head_run_options",
    "worker_run_options",
    "disable_automatic_runtime_detection",
    "disable_shm_size_detection",
    "use_podman",
}
LAUNCHER_NODE_TYPE = {
    "node_config",
    "resources",
    "labels",
    "min_workers",
    "max_workers",
    "idle_timeout_s",
    "priority",
    "initialization_commands",
    "worker_setup_commands",
    "docker",
}
LAUNCHER_NODE_TYPE_DOCKER = {"pull_before_run", "worker_image", "worker_run_options"}


# --- Helpers ----------------------------------------------------------------------------------
def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _docs(kind: str | None = None) -> list[tuple[str, dict]]:
    found = []
    for path in YAML_FILES:
        for doc in _load(path):
            if kind is None or doc.get("kind") == kind:
                found.append((path.name, doc))
    return found


def _ray_docs() -> list[tuple[str, dict]]:
    return _docs("RayJob") + _docs("RayCluster")


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _groups(doc: dict) -> list[tuple[str, dict, bool]]:
    """(name, group spec, is_head) for the head group and every worker group."""
    spec = _cluster_spec(doc)
    groups = [("head", spec["headGroupSpec"], True)]
    groups += [(g["groupName"], g, False) for g in spec.get("workerGroupSpecs", [])]
    return groups


def _pods() -> list[tuple[str, str, dict, bool]]:
    """(where, group name, pod spec, is_head) for every Ray pod template under deploy/."""
    return [
        (f"{name}:{doc['metadata']['name']}/{group}", group, spec["template"]["spec"], is_head)
        for name, doc in _ray_docs()
        for group, spec, is_head in _groups(doc)
    ]


def _containers() -> list[tuple[str, dict, dict]]:
    """(where, container, pod spec) for every container of every Ray pod template."""
    return [(f"{where}/{c['name']}", c, pod) for where, _, pod, _ in _pods() for c in pod["containers"]]


def _unknown_keys(node, schema, path: str) -> list[str]:
    if schema is ANY:
        return []
    if isinstance(node, list):
        return [p for i, item in enumerate(node) for p in _unknown_keys(item, schema, f"{path}[{i}]")]
    if not isinstance(node, dict):
        return [f"{path}: expected an object, got {type(node).__name__}"]
    problems = []
    for key, value in node.items():
        if key not in schema:
            problems.append(f"{path}.{key}")
        else:
            problems += _unknown_keys(value, schema[key], f"{path}.{key}")
    return problems


_QUANTITY = re.compile(r"^([0-9.]+)([KMGTPE]i?|m)?$")
_SUFFIX = {
    None: 1,
    "m": 1e-3,
    "K": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def _quantity(value) -> float:
    match = _QUANTITY.match(str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def _has_registry_host(image: str) -> bool:
    # Docker's rule: the first path component is a registry host if it has a dot or a port,
    # or is localhost; otherwise `ctsearch:0.1.0` means docker.io/library/ctsearch.
    first, sep, _ = image.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith(("#", "!"))]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Rough .dockerignore match: a path is out if it or a parent matches a pattern."""
    parts = Path(rel).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        pattern = pattern.strip("/")
        bare = pattern[3:] if pattern.startswith("**/") else None
        for cand in candidates:
            if fnmatch.fnmatchcase(cand, pattern) or (bare and fnmatch.fnmatchcase(Path(cand).name, bare)):
                return True
    return False


def _effective_launcher_options(config: dict, node_type: str) -> list[str]:
    """docker run options the launcher uses for a node type (ray/autoscaler/_private)."""
    docker = copy.deepcopy(config.get("docker", {}))
    if node_type == config["head_node_type"]:
        # The head is started from the top-level docker block only.
        return docker.get("run_options", []) + docker.get("head_run_options", [])
    # A node type's docker block replaces top-level keys (dict.update), it does not append.
    docker.update(config["available_node_types"][node_type].get("docker", {}))
    return docker.get("run_options", []) + docker.get("worker_run_options", [])


# --- Every YAML file --------------------------------------------------------------------------
def test_deploy_has_the_expected_manifests():
    names = {p.name for p in YAML_FILES}
    for expected in ("cluster.yaml", "rayjob-train.yaml", "rayjob-index.yaml", "raycluster.yaml", "pvc.yaml"):
        assert expected in names, f"deploy/{expected} is missing"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_parses(path):
    docs = _load(path)
    assert docs, f"{path.name}: no YAML documents"
    assert all(isinstance(d, dict) for d in docs), f"{path.name}: every document must be a mapping"


# --- KubeRay RayJob / RayCluster --------------------------------------------------------------
def test_there_are_ray_manifests():
    kinds = {doc["kind"] for _, doc in _ray_docs()}
    assert kinds == {"RayJob", "RayCluster"}, f"expected RayJob and RayCluster manifests, found {kinds}"


@pytest.mark.parametrize("name,doc", _ray_docs(), ids=lambda x: x if isinstance(x, str) else "")
def test_ray_manifest_api_version(name, doc):
    assert doc["apiVersion"] == "ray.io/v1", (
        f"{name}: apiVersion {doc['apiVersion']!r}, KubeRay serves ray.io/v1"
    )


@pytest.mark.parametrize("name,doc", _ray_docs(), ids=lambda x: x if isinstance(x, str) else "")
def test_ray_manifest_has_only_known_fields(name, doc):
    unknown = _unknown_keys(doc, DOCUMENT_SCHEMAS[doc["kind"]], name)
    assert not unknown, "unknown fields (typo, or not a KubeRay v1 / Kubernetes field):\n" + "\n".join(
        unknown
    )


def test_unknown_field_check_reports_the_path():
    # The walk above must be able to fail: a misspelt key deep in a pod template is reported.
    name, doc = _docs("RayJob")[0]
    broken = copy.deepcopy(doc)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "volumeMount"
    ] = []
    unknown = _unknown_keys(broken, DOCUMENT_SCHEMAS["RayJob"], name)
    assert f"{name}.spec.rayClusterSpec.headGroupSpec.rayStartParam" in unknown, unknown
    assert (
        f"{name}.spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].volumeMount" in unknown
    ), unknown


def test_ray_start_params_are_strings():
    # rayStartParams is map[string]string: an unquoted 0 or true is rejected by the API server.
    for name, doc in _ray_docs():
        for group, spec, _ in _groups(doc):
            params = spec.get("rayStartParams")
            assert isinstance(params, dict), f"{name}/{group}: rayStartParams is required (may be {{}})"
            bad = {k: v for k, v in params.items() if not isinstance(v, str)}
            assert not bad, f"{name}/{group}: rayStartParams values must be quoted strings: {bad}"


def test_head_runs_no_tasks():
    # The drivers (RayJob entrypoints, `--address ray://` driver tasks) live on the head and need
    # its memory; a task landing there could OOM-kill the GCS with them.
    for name, doc in _ray_docs():
        params = _cluster_spec(doc)["headGroupSpec"]["rayStartParams"]
        assert params.get("num-cpus") == "0", f'{name}: head rayStartParams needs num-cpus: "0"'


def test_head_has_memory_for_the_driver():
    for where, _, pod, is_head in _pods():
        if is_head:
            memory = _quantity(pod["containers"][0]["resources"]["limits"]["memory"])
            assert memory >= 16 * 2**30, (
                f"{where}: head memory limit below 16Gi leaves no room for the driver"
            )


def test_head_service_is_not_public():
    for name, doc in _ray_docs():
        service_type = _cluster_spec(doc)["headGroupSpec"].get("serviceType", "ClusterIP")
        assert service_type == "ClusterIP", f"{name}: head serviceType {service_type} exposes Ray's ports"


def test_containers_have_cpu_and_memory_limits():
    for where, container, _ in _containers():
        limits = container.get("resources", {}).get("limits", {})
        assert "cpu" in limits and "memory" in limits, f"{where}: needs resources.limits.cpu and .memory"


def test_containers_mount_a_memory_backed_dev_shm():
    # Docker's default /dev/shm is 64 MB; Ray then puts its object store on disk.
    for where, container, pod in _containers():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = [m for m in container.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"]
        assert mounts, f"{where}: no volume mounted at /dev/shm"
        volume = volumes.get(mounts[0]["name"], {})
        empty_dir = volume.get("emptyDir") or {}
        assert empty_dir.get("medium") == "Memory", (
            f"{where}: /dev/shm must be an emptyDir with medium: Memory"
        )
        assert "sizeLimit" in empty_dir, f"{where}: /dev/shm emptyDir needs a sizeLimit"
        # Ray's default object store is 30% of the pod's memory; a smaller /dev/shm makes it use /tmp.
        memory = _quantity(container["resources"]["limits"]["memory"])
        assert _quantity(empty_dir["sizeLimit"]) >= 0.3 * memory, (
            f"{where}: /dev/shm sizeLimit {empty_dir['sizeLimit']} is below 30% of the memory limit"
        )


def test_containers_mount_the_shared_data_volume():
    claims = {doc["metadata"]["name"] for _, doc in _docs("PersistentVolumeClaim")}
    for where, container, pod in _containers():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = [m for m in container.get("volumeMounts", []) if m.get("mountPath") == "/data"]
        assert mounts, f"{where}: every node must see /data"
        claim = (volumes.get(mounts[0]["name"], {}).get("persistentVolumeClaim") or {}).get("claimName")
        assert claim in claims, (
            f"{where}: /data must come from a PVC defined under deploy/ ({claims}), got {claim}"
        )


def test_containers_use_token_auth_from_a_secret():
    for name, doc in _ray_docs():
        auth = _cluster_spec(doc).get("authOptions", {})
        for group, spec, _ in _groups(doc):
            for container in spec["template"]["spec"]["containers"]:
                where = f"{name}/{group}/{container['name']}"
                env = {e["name"]: e for e in container.get("env", [])}
                assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", (
                    f"{where}: needs RAY_AUTH_MODE=token"
                )
                ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
                assert ref and ref.get("name") and ref.get("key"), (
                    f"{where}: RAY_AUTH_TOKEN must come from a Secret (valueFrom.secretKeyRef), never a literal"
                )
                if auth.get("secretName"):
                    # Otherwise the operator hands its containers another token than ours.
                    assert (ref["name"], ref["key"]) == (auth["secretName"], AUTH_SECRET_KEY), (
                        f"{where}: RAY_AUTH_TOKEN must read {auth['secretName']}/{AUTH_SECRET_KEY} like authOptions"
                    )


def test_auth_options_use_token_mode():
    for name, doc in _ray_docs():
        auth = _cluster_spec(doc).get("authOptions")
        if auth is not None:
            assert auth.get("mode") == "token", f"{name}: authOptions.mode must be token"


def test_gpu_groups_request_gpus_and_others_do_not():
    for where, group, pod, _ in _pods():
        for container in pod["containers"]:
            res = container.get("resources", {})
            gpus = {k: res.get(k, {}).get(GPU_RESOURCE) for k in ("limits", "requests")}
            if "gpu" in group.lower():
                assert gpus["limits"] and int(gpus["limits"]) >= 1, (
                    f"{where}: GPU group needs limits.{GPU_RESOURCE}"
                )
            else:
                assert not any(gpus.values()), f"{where}: CPU group or head must not ask for {GPU_RESOURCE}"


def test_images_come_from_a_registry():
    for where, container, _ in _containers():
        image = container["image"]
        assert _has_registry_host(image), f"{where}: image {image!r} is a local tag no node can pull"
        assert ":" in image.rsplit("/", 1)[1], f"{where}: pin an image tag, not latest: {image!r}"


def test_all_manifests_use_one_image():
    cluster = _load(DEPLOY / "cluster.yaml")[0]
    images = {c["image"] for _, c, _ in _containers()} | {cluster["docker"]["image"]}
    assert len(images) == 1, f"head and workers must run the same ctsearch and Ray: {images}"


def test_entrypoints_call_the_installed_script():
    scripts = _pyproject()["project"]["scripts"]
    for name, doc in _docs("RayJob"):
        command = shlex.split(doc["spec"]["entrypoint"])[0]
        assert command in scripts, (
            f"{name}: entrypoint runs {command!r}, the image installs {sorted(scripts)}"
        )


def test_network_policy_selects_the_ray_pods():
    policies = _docs("NetworkPolicy")
    assert policies, "deploy/ needs a NetworkPolicy keeping Ray's ports off untrusted networks"
    selectors = [doc["spec"]["podSelector"].get("matchLabels", {}) for _, doc in policies]
    for name, doc in _ray_docs():
        for group, spec, _ in _groups(doc):
            labels = spec["template"].get("metadata", {}).get("labels", {})
            assert any(sel and sel.items() <= labels.items() for sel in selectors), (
                f"{name}/{group}: pod labels {labels} match no NetworkPolicy podSelector {selectors}"
            )


# --- Shared storage ---------------------------------------------------------------------------
def test_pvc_is_read_write_many():
    claims = _docs("PersistentVolumeClaim")
    assert claims, "deploy/ needs the PersistentVolumeClaim that every pod mounts at /data"
    for name, doc in claims:
        modes = doc["spec"].get("accessModes", [])
        assert "ReadWriteMany" in modes, (
            f"{name}: pods on many nodes mount it at once, needs ReadWriteMany, has {modes}"
        )


# --- Ray cluster launcher (deploy/cluster.yaml) -----------------------------------------------
@pytest.fixture(scope="module")
def launcher() -> dict:
    return _load(DEPLOY / "cluster.yaml")[0]


def test_launcher_fields_are_known(launcher):
    problems = [f"cluster.yaml.{k}" for k in launcher if k not in LAUNCHER_TOP]
    problems += [f"cluster.yaml.docker.{k}" for k in launcher.get("docker", {}) if k not in LAUNCHER_DOCKER]
    for node_type, spec in launcher["available_node_types"].items():
        where = f"cluster.yaml.available_node_types.{node_type}"
        problems += [f"{where}.{k}" for k in spec if k not in LAUNCHER_NODE_TYPE]
        problems += [
            f"{where}.docker.{k}" for k in spec.get("docker", {}) if k not in LAUNCHER_NODE_TYPE_DOCKER
        ]
        for required in ("node_config", "resources"):
            assert required in spec, f"{where}: the launcher requires {required}"
    assert not problems, "fields the Ray cluster launcher does not know:\n" + "\n".join(problems)
    assert launcher["head_node_type"] in launcher["available_node_types"], "head_node_type names no node type"


def test_launcher_config_matches_rays_own_schema(launcher):
    # Belt and braces with the list above: Ray ships the JSON schema `ray up` validates against.
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed")
    schema_path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    if not schema_path.exists():
        pytest.skip("this Ray has no autoscaler/ray-schema.json")
    jsonschema.validate(launcher, json.loads(schema_path.read_text()))


def test_launcher_gives_gpus_only_to_gpu_nodes(launcher):
    for node_type, spec in launcher["available_node_types"].items():
        options = " ".join(_effective_launcher_options(launcher, node_type))
        is_head = node_type == launcher["head_node_type"]
        wants_gpu = not is_head and spec.get("resources", {}).get("GPU", 0) > 0
        if wants_gpu:
            assert "--gpus" in options, (
                f"cluster.yaml node type {node_type}: GPU node without --gpus ({options})"
            )
        else:
            assert "--gpus" not in options, (
                f"cluster.yaml node type {node_type}: CPU node or head gets --gpus, docker run fails without GPUs"
            )


def test_launcher_gpu_option_check_can_fail(launcher):
    # The old config put --gpus in the shared run_options: every node type must then be flagged.
    broken = copy.deepcopy(launcher)
    broken["docker"]["run_options"] = ["--gpus all"]
    cpu_types = [
        t for t, s in broken["available_node_types"].items() if not s.get("resources", {}).get("GPU")
    ]
    assert cpu_types
    for node_type in cpu_types:
        assert "--gpus all" in _effective_launcher_options(broken, node_type)


def test_launcher_head_runs_no_tasks(launcher):
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "cluster.yaml: the head node type needs resources {CPU: 0}"


def test_launcher_image_comes_from_a_registry(launcher):
    image = launcher["docker"]["image"]
    assert _has_registry_host(image), f"cluster.yaml: image {image!r} is a local tag no node can pull"


def test_launcher_containers_use_token_auth(launcher):
    options = " ".join(launcher["docker"].get("run_options", []))
    assert "RAY_AUTH_MODE=token" in options, "cluster.yaml: every container needs RAY_AUTH_MODE=token"
    match = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", options)
    assert match, "cluster.yaml: every container needs RAY_AUTH_TOKEN_PATH (a literal token would leak)"
    assert match.group(1) in launcher.get("file_mounts", {}), (
        f"cluster.yaml: RAY_AUTH_TOKEN_PATH {match.group(1)} is not a file_mounts target"
    )


# --- Image ------------------------------------------------------------------------------------
def test_dockerfile_copy_sources_exist_and_are_in_the_context():
    patterns = _dockerignore_patterns()
    copies = [args for op, args in _dockerfile_instructions() if op in ("COPY", "ADD")]
    assert copies, "Dockerfile copies nothing"
    for args in copies:
        assert "--from" not in args, "COPY --from copies from a build stage, not the repo: extend this test"
        tokens = [t for t in shlex.split(args) if not t.startswith("--")]
        for source in tokens[:-1]:
            assert list(ROOT.glob(source)), f"Dockerfile COPY {source}: no such path in the repo"
            assert not _ignored(source, patterns), f"Dockerfile COPY {source}: excluded by .dockerignore"


def test_dockerfile_checks_the_entrypoints_at_build_time():
    runs = " ".join(args for op, args in _dockerfile_instructions() if op == "RUN")
    scripts = _pyproject()["project"]["scripts"]
    assert "pip install" in runs and re.search(r"pip install[^&]*\s\.(\s|$)", runs), (
        "Dockerfile must pip install ."
    )
    for script in scripts:
        assert f"{script} --help" in runs, (
            f"Dockerfile must run `{script} --help` so a broken install fails the build"
        )
    assert "ray --version" in runs, (
        "Dockerfile must run `ray --version`: KubeRay and the launcher run `ray start`"
    )


def test_ray_dependency_has_client_and_default_extras():
    # ray[default]: dashboard and job API (RayJobs, `ray job submit`); ray[client]: `--address ray://`.
    reqs = [Requirement(d) for d in _pyproject()["project"]["dependencies"]]
    ray = [r for r in reqs if r.name == "ray"]
    assert ray, "pyproject.toml: ray is not a dependency"
    missing = {"client", "default"} - ray[0].extras
    assert not missing, f"pyproject.toml: ray lacks the extras {sorted(missing)} the image's entrypoints need"


def test_dockerignore_keeps_local_state_out_of_the_build():
    path = ROOT / ".dockerignore"
    assert path.exists(), ".dockerignore is missing: docker build would send .venv and .git"
    patterns = _dockerignore_patterns()
    for rel in (".venv", ".git", ".venv/lib/python3.11/site-packages", "demo-out/index", "data/x.parquet"):
        assert _ignored(rel, patterns), f".dockerignore does not exclude {rel}"
