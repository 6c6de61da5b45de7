"""Validate medsr-dist's k8s/ manifests without a Kubernetes API server.

    python k8s/validate.py k8s/overlays/prod --crds ../shared/kuberay-crds      # build with kubectl kustomize
    python k8s/validate.py built.yaml --crds DIR                                # an already built stream

Three layers, each returning a list of error strings ("<Kind>/<name>: <where>: <what>"):

- ``crd_errors``: KubeRay's custom resources against the CRDs' ``openAPIV3Schema`` (the file KubeRay ships, e.g.
  ray.io_rayjobs.yaml), strict like kubeconform's ``-strict``: every object that lists its properties accepts no
  other field (the API server would prune or reject them); plus the CRDs' CEL rules (x-kubernetes-validations)
  that bear on a new object, written out here.
- ``builtin_errors``: built-in kinds (CronJob, Role, ...) with kubernetes-validate's strict schemas.
- ``controller_errors``: the KubeRay operator's own checks (ray-operator/controllers/ray/utils/validation.go,
  KubeRay v1.7) that no schema carries: name lengths and DNS-1035, replica bounds, TTL only with
  shutdownAfterJobFinishes, submission modes, token auth needing Ray >= 2.52, deletion rules, autoscaler v2,
  RayService upgrade types, RayCronJob schedules.
- ``policy_errors``: this project's rules: requests and limits on every container, the restricted Pod Security
  profile, credentials only through secretKeyRef (never in runtimeEnvYAML), token auth on every cluster, no
  image left at the base's placeholder; least privilege (docs/CLUSTER.md): no ServiceAccount token in a Ray pod
  (only the autoscaler sidecar gets one), a read-only root filesystem with writable emptyDirs for Ray, no PACS
  secret in the Serve or training clusters, NetworkPolicy rules that open no Ray port beyond the namespace (but
  Serve's 8000 to a named gateway namespace and the dashboard to the KubeRay operator).
- ``build_policy_errors``: rules over a whole overlay (a build holding its Namespace): a default-deny ingress
  NetworkPolicy, one Ray token and one S3 credential per cluster, image digests where the Namespace is labelled
  ``medsr-dist/environment: prod``.

Exit status 0 when nothing is found, 1 otherwise (each error printed), 2 on unusable input.
"""
# Long module: four validation layers over one manifest stream, each a page of rules; split by layer if it grows.
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zoneinfo
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import yaml

RAY_KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
#: Name limits of KubeRay v1.7 (utils/constant.go): RayCluster 53; RayJob/RayService 47 (their cluster's name
#: gets a 6-character suffix); RayCronJob 36 (each RayJob it creates gets an 11-character suffix).
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47, "RayCronJob": 36}
GENERATE_NAME_SUFFIX = 5  # the API server appends 5 random characters to metadata.generateName
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
SERVICE_UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
TOKEN_AUTH_MIN_RAY = (2, 52, 0)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
BASE_IMAGE_PLACEHOLDER = "medsr-dist"
SECRET_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", re.I)
PACS_SECRET = re.compile(r"pacs", re.I)          # a Secret named like the PACS credentials (medsr-pacs)
PACS_ENV = re.compile(r"^MEDSR_PACS_")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
ENVIRONMENT_LABEL = "medsr-dist/environment"
#: Ray's ports by number and by the names the manifests give them.
SERVE_PORT, DASHBOARD_PORT, METRICS_PORT = 8000, 8265, 8080
PORT_NAMES = {"serve": 8000, "dashboard": 8265, "gcs-server": 6379, "client": 10001, "metrics": 8080}
#: Ports another namespace may reach when the rule also names its pods (the KubeRay operator, a Prometheus).
NAMED_PODS_PORTS = (DASHBOARD_PORT, METRICS_PORT)
#: Where the Ray containers write, given a read-only root filesystem.
RAY_WRITABLE = ("/tmp/ray", "/tmp")
SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
# A top-level ObjectMeta as written in a manifest (the CRD schemas leave metadata open; the API server checks it).
OBJECT_META = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "name": {"type": "string"}, "generateName": {"type": "string"}, "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}


def ident(doc: dict) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{meta.get('name') or meta.get('generateName') or '?'}"


# --------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------
def kustomize_build(path: Path, kubectl: str = "kubectl") -> list[dict]:
    """``kubectl kustomize path`` parsed into documents; raises RuntimeError with kubectl's message on failure."""
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path}: {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def embedded_manifests(docs: list[dict]) -> Iterator[tuple[str, dict]]:
    """Manifests held as ConfigMap data (the nightly RayJob template), as (where, document)."""
    for doc in docs:
        if doc.get("kind") != "ConfigMap":
            continue
        for key, text in (doc.get("data") or {}).items():
            if key.endswith((".yaml", ".yml")):
                for sub in yaml.safe_load_all(text):
                    if isinstance(sub, dict) and "apiVersion" in sub and "kind" in sub:
                        yield f"{ident(doc)} data[{key}]", sub


# --------------------------------------------------------------------------------------------------------------
# CRD schemas
# --------------------------------------------------------------------------------------------------------------
def strict_schema(schema: Any) -> Any:
    """An OpenAPI v3 structural schema as a JSON Schema that refuses unknown fields (kubeconform -strict).

    Objects that list ``properties`` get ``additionalProperties: false`` unless they say otherwise or preserve
    unknown fields; ``nullable`` admits null. The input is not modified.
    """
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items() if k != "description"}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@lru_cache(maxsize=None)
def _crd_validators(crd_dir: str) -> dict[tuple[str, str], Any]:
    import jsonschema

    validators = {}
    for kind, filename in RAY_KINDS.items():
        path = Path(crd_dir) / filename
        # 4 MB of YAML: libyaml's loader when PyYAML has it (ten times faster than the pure-Python one)
        crd = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group = crd["spec"]["group"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = OBJECT_META
            schema.setdefault("required", [])
            for field in ("apiVersion", "kind", "metadata", "spec"):
                if field not in schema["required"]:
                    schema["required"].append(field)
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def _deletion_cel(spec: dict, where: str) -> list[str]:
    """The RayJob CRD's CEL rules (x-kubernetes-validations) on deletionStrategy."""
    errors = []
    ds = spec.get("deletionStrategy")
    if ds is None:
        return errors
    legacy, rules = "onSuccess" in ds or "onFailure" in ds, "deletionRules" in ds
    if legacy and rules:
        errors.append(f"{where}.deletionStrategy: legacy policies (onSuccess/onFailure) and deletionRules cannot be "
                      "used together")
    if not (("onSuccess" in ds and "onFailure" in ds) or rules):
        errors.append(f"{where}.deletionStrategy: requires either BOTH onSuccess and onFailure, OR deletionRules")
    for i, rule in enumerate(ds.get("deletionRules") or []):
        cond = rule.get("condition") or {}
        if ("jobStatus" in cond) == ("jobDeploymentStatus" in cond):
            errors.append(f"{where}.deletionStrategy.deletionRules[{i}].condition: exactly one of jobStatus and "
                          "jobDeploymentStatus")
    return errors


def crd_errors(doc: dict, crd_dir: Path) -> list[str]:
    """Schema errors of one KubeRay object against its CRD (strict), plus the CRDs' CEL rules on deletion."""
    validators = _crd_validators(str(crd_dir))
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in validators:
        return [f"{ident(doc)}: no served CRD version for apiVersion {key[0]} kind {key[1]}"]
    errors = []
    for e in sorted(validators[key].iter_errors(doc), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in e.absolute_path) or "<root>"
        errors.append(f"{ident(doc)}: {path}: {e.message}")
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob":
        errors += [f"{ident(doc)}: {m}" for m in _deletion_cel(spec, "spec")]
    if doc.get("kind") == "RayCronJob":
        errors += [f"{ident(doc)}: {m}" for m in _deletion_cel(spec.get("jobTemplate") or {}, "spec.jobTemplate")]
    return errors


def builtin_errors(doc: dict, k8s_version: str = "1.37.0") -> list[str]:
    """Strict schema errors of a built-in kind (kubernetes-validate's schemas for ``k8s_version``)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path) or "<root>"
        return [f"{ident(doc)}: {path}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{ident(doc)}: no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes {k8s_version}"]
    return []


# --------------------------------------------------------------------------------------------------------------
# KubeRay controller rules (validation.go)
# --------------------------------------------------------------------------------------------------------------
def _version(text: str) -> tuple[int, ...] | None:
    m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    return tuple(int(g or 0) for g in m.groups()) if m else None


def _name_errors(doc: dict) -> list[str]:
    kind, meta = doc["kind"], doc.get("metadata") or {}
    limit = MAX_NAME[kind]
    name, generate = meta.get("name"), meta.get("generateName")
    if not name and not generate:
        return [f"{ident(doc)}: metadata.name or metadata.generateName is required"]
    if name:
        longest, label = name, name
    else:
        longest, label = generate + "x" * GENERATE_NAME_SUFFIX, generate + "x"
    errors = []
    if len(longest) > limit:
        errors.append(f"{ident(doc)}: metadata.name: {kind} names are at most {limit} characters, "
                      f"got {len(longest)}{' with the generated suffix' if not name else ''}")
    if not DNS1035.match(label):
        errors.append(f"{ident(doc)}: metadata.name: must be a DNS-1035 label (lower case letters, digits and '-', "
                      f"starting with a letter, ending alphanumeric)")
    return errors


def cluster_spec_errors(spec: dict, where: str) -> list[str]:
    """ValidateRayClusterSpec: containers, replica bounds, rayStartParams, autoscaler v2, token auth."""
    errors = []
    head = spec.get("headGroupSpec") or {}
    head_pod = (head.get("template") or {}).get("spec") or {}
    if not head_pod.get("containers"):
        errors.append(f"{where}.headGroupSpec: at least one container")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    v2 = autoscaling and (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    groups = [("headGroupSpec", "Head", head)] + [
        (f"workerGroupSpecs[{i}]", g.get("groupName", str(i)), g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    for path, name, group in groups:
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            errors.append(f"{where}.{path}: resources set in both rayStartParams and resources (group {name})")
        if "labels" in params:
            errors.append(f"{where}.{path}.rayStartParams: 'labels' is not supported; use the group's labels field")
        pod = (group.get("template") or {}).get("spec") or {}
        if v2 and pod.get("restartPolicy") not in (None, "", "Never"):
            errors.append(f"{where}.{path}.template.spec.restartPolicy: must be Never or unset with autoscaler v2")
        if path == "headGroupSpec":
            continue
        if not pod.get("containers"):
            errors.append(f"{where}.{path}: at least one container")
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"{where}.{path}: minReplicas and maxReplicas are both required without autoscaling")
        for field, value in (("minReplicas", lo), ("maxReplicas", hi)):
            if value is not None and value < 0:
                errors.append(f"{where}.{path}.{field}: negative ({value})")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"{where}.{path}: minReplicas {lo} greater than maxReplicas {hi}")
        if group.get("idleTimeoutSeconds") is not None and not v2:
            errors.append(f"{where}.{path}.idleTimeoutSeconds: needs autoscalerOptions.version v2")
        if group.get("suspend") and autoscaling:
            errors.append(f"{where}.{path}.suspend: a worker group cannot be suspended with the autoscaler on")
    idle = (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds")
    if idle is not None and idle < 0:
        errors.append(f"{where}.autoscalerOptions.idleTimeoutSeconds: must be non-negative")
    auth = spec.get("authOptions") or {}
    if auth and auth.get("mode", "token") == "token":
        version = _version(spec.get("rayVersion", "")) if spec.get("rayVersion") else None
        if not spec.get("rayVersion"):
            errors.append(f"{where}.rayVersion: authOptions.mode is 'token' but rayVersion is not set "
                          f"(Ray >= 2.52.0 required)")
        elif version is None:
            errors.append(f"{where}.rayVersion: {spec['rayVersion']!r} is not a version")
        elif version < TOKEN_AUTH_MIN_RAY:
            errors.append(f"{where}.rayVersion: authOptions.mode is 'token' but token auth needs Ray >= 2.52.0, "
                          f"got {spec['rayVersion']}")
    return errors


def rayjob_spec_errors(spec: dict, where: str) -> list[str]:
    """ValidateRayJobSpec (and validateDeletionConfiguration) for a RayJob spec or a RayCronJob's jobTemplate."""
    errors = []
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        errors.append(f"{where}.submissionMode: {mode!r} is not one of {', '.join(SUBMISSION_MODES)}")
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0:
        errors.append(f"{where}.ttlSecondsAfterFinished: must be non-negative")
    if ttl > 0 and not shutdown:
        errors.append(f"{where}.ttlSecondsAfterFinished: only with shutdownAfterJobFinishes: true")
    if spec.get("suspend") and not shutdown:
        errors.append(f"{where}.suspend: a RayJob without shutdownAfterJobFinishes cannot be suspended")
    selector = spec.get("clusterSelector") or {}
    if not spec.get("rayClusterSpec") and not selector:
        errors.append(f"{where}: one of rayClusterSpec or clusterSelector is required")
    backoff = spec.get("backoffLimit")
    if selector:
        if not selector.get("ray.io/cluster"):
            errors.append(f"{where}.clusterSelector: ray.io/cluster must name the cluster")
        if mode == "SidecarMode":
            errors.append(f"{where}.clusterSelector: not supported in SidecarMode")
        if backoff is not None and backoff > 0:
            errors.append(f"{where}.backoffLimit: must be 0 with clusterSelector")
        if spec.get("suspend"):
            errors.append(f"{where}.suspend: not supported with clusterSelector")
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        errors.append(f"{where}.backoffLimit: must be 0 in InteractiveMode")
    if mode == "SidecarMode" and (spec.get("submitterPodTemplate") or spec.get("submitterConfig")):
        errors.append(f"{where}: SidecarMode supports neither submitterPodTemplate nor submitterConfig")
    if backoff is not None and backoff < 0:
        errors.append(f"{where}.backoffLimit: must be non-negative")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(field) is not None and spec[field] <= 0:
            errors.append(f"{where}.{field}: must be a positive integer")
    runtime_env = spec.get("runtimeEnvYAML")
    if runtime_env:
        try:
            yaml.safe_load(runtime_env)
        except yaml.YAMLError as e:
            errors.append(f"{where}.runtimeEnvYAML: not valid YAML ({e.__class__.__name__})")
    autoscaling = bool((spec.get("rayClusterSpec") or {}).get("enableInTreeAutoscaling"))
    ds = spec.get("deletionStrategy")
    if ds is not None:
        rules = ds.get("deletionRules") or []
        if rules and shutdown:
            errors.append(f"{where}: shutdownAfterJobFinishes and deletionStrategy.deletionRules are mutually exclusive")
        seen: dict[tuple[str, str], dict[str, int]] = {}
        for i, rule in enumerate(rules):
            policy, cond = rule.get("policy"), rule.get("condition") or {}
            if selector and policy in ("DeleteCluster", "DeleteWorkers"):
                errors.append(f"{where}.deletionStrategy.deletionRules[{i}]: {policy} is not supported with clusterSelector")
            if autoscaling and policy == "DeleteWorkers":
                errors.append(f"{where}.deletionStrategy.deletionRules[{i}]: DeleteWorkers is not supported with autoscaling")
            key = ("jobStatus", cond["jobStatus"]) if "jobStatus" in cond else ("jobDeploymentStatus", cond.get("jobDeploymentStatus"))
            policies = seen.setdefault(key, {})
            if policy in policies:
                errors.append(f"{where}.deletionStrategy.deletionRules[{i}]: duplicate rule for {policy} and {key[0]} {key[1]}")
            policies[policy] = cond.get("ttlSeconds", 0)
        for (field, value), ttls in seen.items():
            order = [p for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in ttls]
            for earlier, later in zip(order, order[1:]):
                if ttls[later] < ttls[earlier]:
                    errors.append(f"{where}.deletionStrategy: for {field} {value}, {later} TTL ({ttls[later]}) must be "
                                  f">= {earlier} TTL ({ttls[earlier]})")
        for side in ("onSuccess", "onFailure"):
            if side in ds and shutdown and (ds[side] or {}).get("policy") == "DeleteNone":
                errors.append(f"{where}.deletionStrategy.{side}: DeleteNone contradicts shutdownAfterJobFinishes")
    if spec.get("rayClusterSpec"):
        errors += cluster_spec_errors(spec["rayClusterSpec"], f"{where}.rayClusterSpec")
    return errors


def _cron_field_ok(field: str, lo: int, hi: int, names: dict[str, int] | None = None) -> bool:
    for part in field.split(","):
        rng, _, step = part.partition("/")
        if step and not (step.isdigit() and int(step) > 0):
            return False
        if rng == "*":
            continue
        bounds = rng.split("-")
        if len(bounds) > 2:
            return False
        for b in bounds:
            value = (names or {}).get(b.lower(), b)
            if not str(value).isdigit() or not lo <= int(value) <= hi:
                return False
    return True


def cron_errors(schedule: str, time_zone: str | None, where: str) -> list[str]:
    """The standard 5-field cron syntax KubeRay (robfig/cron ParseStandard) accepts, and an IANA time zone."""
    errors = []
    if "TZ" in schedule:
        errors.append(f"{where}.schedule: TZ/CRON_TZ in the schedule is not allowed; use timeZone")
    fields = schedule.split()
    months = {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}
    days = {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}
    spec = [(0, 59, None), (0, 23, None), (1, 31, None), (1, 12, months), (0, 6, days)]
    if not schedule.startswith("@") and (len(fields) != 5 or not all(
            _cron_field_ok(f, lo, hi, names) for f, (lo, hi, names) in zip(fields, spec))):
        errors.append(f"{where}.schedule: {schedule!r} is not a 5-field cron schedule")
    if time_zone is not None:
        try:
            zoneinfo.ZoneInfo(time_zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            errors.append(f"{where}.timeZone: unknown time zone {time_zone!r}")
    return errors


def controller_errors(doc: dict) -> list[str]:
    """The KubeRay operator's admission-time checks of one RayCluster/RayJob/RayService/RayCronJob."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind not in RAY_KINDS:
        return []
    errors = _name_errors(doc)
    if kind == "RayCluster":
        errors += cluster_spec_errors(spec, "spec")
        kind_up = (spec.get("upgradeStrategy") or {}).get("type")
        if kind_up not in (None, "Recreate", "None"):
            errors.append(f"spec.upgradeStrategy.type: {kind_up!r} is not Recreate or None")
    elif kind == "RayJob":
        errors += rayjob_spec_errors(spec, "spec")
    elif kind == "RayService":
        cluster = spec.get("rayClusterConfig") or {}
        errors += cluster_spec_errors(cluster, "spec.rayClusterConfig")
        up = spec.get("upgradeStrategy") or {}
        if up.get("type") is not None and up["type"] not in SERVICE_UPGRADE_TYPES:
            errors.append(f"spec.upgradeStrategy.type: {up['type']!r} is not one of {', '.join(SERVICE_UPGRADE_TYPES)}")
        if up.get("type") == "NewClusterWithIncrementalUpgrade":
            if not cluster.get("enableInTreeAutoscaling"):
                errors.append("spec.upgradeStrategy: NewClusterWithIncrementalUpgrade needs the Ray autoscaler")
            if not up.get("clusterUpgradeOptions"):
                errors.append("spec.upgradeStrategy.clusterUpgradeOptions: required for NewClusterWithIncrementalUpgrade")
        if (spec.get("rayClusterDeletionDelaySeconds") or 0) < 0:
            errors.append("spec.rayClusterDeletionDelaySeconds: must be non-negative")
        if spec.get("serveConfigV2"):
            try:
                yaml.safe_load(spec["serveConfigV2"])
            except yaml.YAMLError:
                errors.append("spec.serveConfigV2: not valid YAML")
    elif kind == "RayCronJob":
        errors += cron_errors(str(spec.get("schedule", "")), spec.get("timeZone"), "spec")
        errors += rayjob_spec_errors(spec.get("jobTemplate") or {}, "spec.jobTemplate")
    return [e if e.startswith(f"{kind}/") else f"{ident(doc)}: {e}" for e in errors]


# --------------------------------------------------------------------------------------------------------------
# Project policy
# --------------------------------------------------------------------------------------------------------------
def pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """Every pod spec an object defines (Ray head/workers, submitters, CronJob pods), as (where, spec)."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}

    def cluster(c: dict, where: str) -> Iterator[tuple[str, dict]]:
        yield f"{where}.headGroupSpec", ((c.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}
        for i, g in enumerate(c.get("workerGroupSpecs") or []):
            yield f"{where}.workerGroupSpecs[{i}]", (g.get("template") or {}).get("spec") or {}

    def job(j: dict, where: str) -> Iterator[tuple[str, dict]]:
        if j.get("rayClusterSpec"):
            yield from cluster(j["rayClusterSpec"], f"{where}.rayClusterSpec")
        if j.get("submitterPodTemplate"):
            yield f"{where}.submitterPodTemplate", j["submitterPodTemplate"].get("spec") or {}

    if kind == "RayCluster":
        yield from cluster(spec, "spec")
    elif kind == "RayService":
        yield from cluster(spec.get("rayClusterConfig") or {}, "spec.rayClusterConfig")
    elif kind == "RayJob":
        yield from job(spec, "spec")
    elif kind == "RayCronJob":
        yield from job(spec.get("jobTemplate") or {}, "spec.jobTemplate")
    elif kind == "CronJob":
        yield "spec.jobTemplate.spec.template", (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
    elif kind in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        yield "spec.template", (spec.get("template") or {}).get("spec") or {}


def cluster_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "RayCluster":
        yield "spec", spec
    elif kind == "RayService":
        yield "spec.rayClusterConfig", spec.get("rayClusterConfig") or {}
    elif kind == "RayJob" and spec.get("rayClusterSpec"):
        yield "spec.rayClusterSpec", spec["rayClusterSpec"]
    elif kind == "RayCronJob" and (spec.get("jobTemplate") or {}).get("rayClusterSpec"):
        yield "spec.jobTemplate.rayClusterSpec", spec["jobTemplate"]["rayClusterSpec"]


def _resources_errors(res: dict | None, where: str, gpu: bool = False) -> list[str]:
    res = res or {}
    errors = []
    for side in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in (res.get(side) or {}):
                errors.append(f"{where}.resources.{side}.{r}: missing (requests and limits on every container)")
    if gpu:
        req, lim = (res.get("requests") or {}).get("nvidia.com/gpu"), (res.get("limits") or {}).get("nvidia.com/gpu")
        if req is None or lim is None or str(req) != str(lim):
            errors.append(f"{where}.resources: nvidia.com/gpu must be in requests and limits, equal (got {req}, {lim})")
    return errors


def _container_security_errors(sc: dict | None, where: str) -> list[str]:
    sc = sc or {}
    errors = []
    if sc.get("allowPrivilegeEscalation") is not False:
        errors.append(f"{where}.securityContext.allowPrivilegeEscalation: must be false")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        errors.append(f"{where}.securityContext.capabilities.drop: must include ALL")
    if sc.get("privileged"):
        errors.append(f"{where}.securityContext.privileged: must not be true")
    if sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False:
        errors.append(f"{where}.securityContext: must not run as root")
    return errors


def policy_errors(doc: dict) -> list[str]:
    """medsr-dist's deployment rules for one object (see the module docstring)."""
    errors = []
    for where, pod in pod_specs(doc):
        psc = pod.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True or psc.get("runAsUser") in (None, 0):
            errors.append(f"{where}.securityContext: runAsNonRoot true and a non-zero runAsUser")
        if (psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            errors.append(f"{where}.securityContext.seccompProfile.type: RuntimeDefault (restricted profile)")
        if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
            errors.append(f"{where}: host namespaces are not allowed")
        gpu_pod = False
        for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            cw = f"{where}.containers[{c.get('name')}]"
            gpu = any("nvidia.com/gpu" in ((c.get("resources") or {}).get(s) or {}) for s in ("requests", "limits"))
            gpu_pod |= gpu
            errors += _resources_errors(c.get("resources"), cw, gpu=gpu)
            errors += _container_security_errors(c.get("securityContext"), cw)
            image = str(c.get("image", ""))
            if image.split(":")[0] == BASE_IMAGE_PLACEHOLDER:
                errors.append(f"{cw}.image: still the base's placeholder {image} (set images: in the overlay)")
            for env in c.get("env") or []:
                if SECRET_ENV.search(env.get("name", "")) and "value" in env:
                    errors.append(f"{cw}.env[{env['name']}]: a credential as a literal value; use valueFrom.secretKeyRef")
        if gpu_pod and not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations") or []):
            errors.append(f"{where}.tolerations: a GPU pod needs the nvidia.com/gpu toleration")
    errors += least_privilege_errors(doc)
    for where, c in cluster_specs(doc):
        auth = c.get("authOptions") or {}
        if auth.get("mode") != "token" or not auth.get("secretName"):
            errors.append(f"{where}.authOptions: mode token with a secretName (Ray token auth on every cluster)")
        if str(((c.get("headGroupSpec") or {}).get("rayStartParams") or {}).get("num-cpus")) != "0":
            errors.append(f"{where}.headGroupSpec.rayStartParams.num-cpus: \"0\" (no work on the head)")
        if not c.get("enableInTreeAutoscaling") or (c.get("autoscalerOptions") or {}).get("version") != "v2":
            errors.append(f"{where}: enableInTreeAutoscaling with autoscalerOptions.version v2")
        opts = c.get("autoscalerOptions") or {}
        errors += _resources_errors(opts.get("resources"), f"{where}.autoscalerOptions")
        errors += _container_security_errors(opts.get("securityContext"), f"{where}.autoscalerOptions")
        ray_pods = [("headGroupSpec", (c.get("headGroupSpec") or {}))] + [
            (f"workerGroupSpecs[{i}]", g) for i, g in enumerate(c.get("workerGroupSpecs") or [])]
        for path, group in ray_pods:
            containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
            env = {e.get("name"): e for e in containers[0].get("env") or []}
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                if "secretKeyRef" not in ((env.get(var) or {}).get("valueFrom") or {}):
                    errors.append(f"{where}.{path}: env {var} must come from a Secret (valueFrom.secretKeyRef)")
    for where, job in ([("spec", doc.get("spec") or {})] if doc.get("kind") == "RayJob" else
                       [("spec.jobTemplate", (doc.get("spec") or {}).get("jobTemplate") or {})]
                       if doc.get("kind") == "RayCronJob" else []):
        runtime_env = yaml.safe_load(job.get("runtimeEnvYAML") or "") or {}
        env_vars = runtime_env.get("env_vars") or {} if isinstance(runtime_env, dict) else {}
        secret_like = [k for k in env_vars if SECRET_ENV.search(k)]
        if secret_like:
            errors.append(f"{where}.runtimeEnvYAML: credentials {secret_like} in runtimeEnvYAML, which is stored in "
                          "plain text in the resource; use secretKeyRef in the pod templates")
    return [f"{ident(doc)}: {e}" for e in errors]


# --------------------------------------------------------------------------------------------------------------
# Least privilege (docs/CLUSTER.md, "Least privilege")
# --------------------------------------------------------------------------------------------------------------
def _ray_pods(doc: dict) -> Iterator[tuple[str, dict, bool]]:
    """(where, pod spec, is a Ray node) for the pods of a KubeRay object: heads, workers, submitters."""
    if doc.get("kind") not in RAY_KINDS:
        return
    for where, pod in pod_specs(doc):
        yield where, pod, "submitterPodTemplate" not in where


def secret_refs(pod: dict) -> Iterator[tuple[str, str]]:
    """(where, Secret name) for every Secret a pod spec reads: env, envFrom, volumes (projected included)."""
    for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        for env in c.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                yield f"containers[{c.get('name')}].env[{env.get('name')}]", str(ref.get("name"))
        for src in c.get("envFrom") or []:
            if src.get("secretRef"):
                yield f"containers[{c.get('name')}].envFrom", str(src["secretRef"].get("name"))
    for vol in pod.get("volumes") or []:
        if vol.get("secret"):
            yield f"volumes[{vol.get('name')}]", str(vol["secret"].get("secretName"))
        for src in (vol.get("projected") or {}).get("sources") or []:
            if src.get("secret"):
                yield f"volumes[{vol.get('name')}]", str(src["secret"].get("name"))


def _workload(doc: dict) -> str | None:
    """Which least-privilege workload a Ray object runs: "serve", "train" (a RayJob with its own cluster), or None
    (the shared RayCluster and the nightly job on it, which hold what the nightly run needs: the PACS too)."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "RayService":
        return "serve"
    if kind == "RayJob" and spec.get("rayClusterSpec"):
        return "train"
    return None


def least_privilege_errors(doc: dict) -> list[str]:
    """Per-object least-privilege rules: ServiceAccount tokens, read-only root filesystems, PACS credentials only
    where the nightly job runs, Secret volumes read-only, NetworkPolicy rules."""
    errors = []
    for where, pod, ray_node in _ray_pods(doc):
        if pod.get("automountServiceAccountToken") is not False:
            errors.append(f"{where}.automountServiceAccountToken: must be false in a Ray pod (Ray needs no "
                          "Kubernetes API; a token in a pod that parses untrusted files is a foothold)")
        for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            cw = f"{where}.containers[{c.get('name')}]"
            mounts = {m.get("mountPath") for m in c.get("volumeMounts") or []}
            if SA_TOKEN_PATH in mounts:
                errors.append(f"{cw}.volumeMounts: a ServiceAccount token at {SA_TOKEN_PATH} in a Ray container")
            if ray_node:
                missing = [path for path in RAY_WRITABLE if path not in mounts]
                if missing:
                    errors.append(f"{cw}.volumeMounts: Ray writes to {', '.join(missing)}: mount an emptyDir there "
                                  "(the root filesystem is read-only)")
        workload = _workload(doc)
        if workload:
            for ref_where, name in secret_refs(pod):
                if PACS_SECRET.search(name):
                    errors.append(f"{where}.{ref_where}: the PACS secret {name} in the "
                                  f"{'Serve' if workload == 'serve' else 'training'} cluster (only the nightly job's "
                                  "cluster holds PACS credentials)")
            for c in pod.get("containers") or []:
                for env in c.get("env") or []:
                    if PACS_ENV.match(str(env.get("name", ""))):
                        errors.append(f"{where}.containers[{c.get('name')}].env[{env['name']}]: PACS credentials in "
                                      f"the {'Serve' if workload == 'serve' else 'training'} cluster")
    for where, pod in pod_specs(doc):
        if doc.get("kind") not in RAY_KINDS and pod.get("automountServiceAccountToken") is not False \
                and pod.get("serviceAccountName") in (None, "", "default"):
            errors.append(f"{where}: the default ServiceAccount's token is mounted; set automountServiceAccountToken: "
                          "false or a ServiceAccount with a narrow Role")
        for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            if (c.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True:
                errors.append(f"{where}.containers[{c.get('name')}].securityContext.readOnlyRootFilesystem: must be "
                              "true (writable emptyDir volumes where the program writes)")
            secret_volumes = {v.get("name") for v in pod.get("volumes") or [] if v.get("secret") or v.get("projected")}
            for m in c.get("volumeMounts") or []:
                if m.get("name") in secret_volumes and m.get("readOnly") is not True:
                    errors.append(f"{where}.containers[{c.get('name')}].volumeMounts[{m.get('name')}]: a Secret "
                                  "volume must be mounted readOnly")
    for where, c in cluster_specs(doc):
        head = ((c.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}
        opts = c.get("autoscalerOptions") or {}
        if c.get("enableInTreeAutoscaling") and (opts.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True:
            errors.append(f"{where}.autoscalerOptions.securityContext.readOnlyRootFilesystem: must be true (it writes to "
                          "/tmp/ray, the ray-logs volume KubeRay mounts, and to a /tmp emptyDir)")
        if c.get("enableInTreeAutoscaling") and head.get("automountServiceAccountToken") is False:
            mounts = {m.get("mountPath"): m.get("name") for m in opts.get("volumeMounts") or []}
            volume = next((v for v in head.get("volumes") or [] if v.get("name") == mounts.get(SA_TOKEN_PATH)), {})
            if not any("serviceAccountToken" in s for s in (volume.get("projected") or {}).get("sources") or []):
                errors.append(f"{where}.autoscalerOptions.volumeMounts: the autoscaler needs the Kubernetes API: mount "
                              f"a projected serviceAccountToken volume of the head pod at {SA_TOKEN_PATH}")
    if doc.get("kind") == "NetworkPolicy":
        errors += network_policy_errors(doc)
    return errors


def _port(port: Any) -> int | None:
    return PORT_NAMES.get(port) if isinstance(port, str) else port


def network_policy_errors(doc: dict) -> list[str]:
    """Ingress rules may admit: any pod of this namespace (a bare podSelector); from another namespace, named by a
    non-empty namespaceSelector, only Serve's 8000, or the dashboard's 8265 and Ray's metrics 8080 to pods a
    podSelector also names (the KubeRay operator, a Prometheus). Never every source, every namespace, or an
    ipBlock."""
    errors = []
    for i, rule in enumerate((doc.get("spec") or {}).get("ingress") or []):
        where = f"spec.ingress[{i}]"
        peers = rule.get("from")
        if not peers:
            errors.append(f"{where}: no 'from': admits every source, in every namespace and outside the cluster")
            continue
        ports = [_port(p.get("port")) for p in rule.get("ports") or []]
        for j, peer in enumerate(peers):
            pw = f"{where}.from[{j}]"
            if "ipBlock" in peer:
                errors.append(f"{pw}.ipBlock: addresses are not a workload; name the gateway's namespace instead")
                continue
            if "namespaceSelector" not in peer:
                continue  # this namespace's pods
            selector = peer["namespaceSelector"] or {}
            if not selector.get("matchLabels") and not selector.get("matchExpressions"):
                errors.append(f"{pw}.namespaceSelector: empty: admits every namespace")
                continue
            if any(str(v).isupper() or "NAMESPACE" in str(v) for v in (selector.get("matchLabels") or {}).values()):
                errors.append(f"{pw}.namespaceSelector: still the base's placeholder (name the namespace in the overlay)")
            if not ports:
                errors.append(f"{pw}: another namespace on every port (Ray's GCS 6379, client 10001, dashboard 8265 "
                              "are for this namespace's pods); list the ports")
            for port in ports:
                if port == SERVE_PORT:
                    continue
                if port in NAMED_PODS_PORTS and peer.get("podSelector"):
                    continue
                errors.append(f"{pw}: port {port} open to another namespace (only Serve's {SERVE_PORT}, and the "
                              f"dashboard's {DASHBOARD_PORT} or metrics' {METRICS_PORT} to pods a podSelector names, "
                              "e.g. the KubeRay operator)")
    return errors


def build_policy_errors(docs: list[dict]) -> list[str]:
    """Rules over a whole overlay: a default-deny ingress NetworkPolicy; one Ray token and one S3 credential per
    cluster; image digests in a Namespace labelled ``medsr-dist/environment: prod``."""
    errors = []
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    if not any((d.get("spec") or {}).get("podSelector") == {} and "Ingress" in ((d.get("spec") or {}).get("policyTypes") or [])
               and not (d.get("spec") or {}).get("ingress") for d in policies):
        errors.append("NetworkPolicy: no default-deny ingress policy (podSelector {}, policyTypes [Ingress], no "
                      "ingress rules): every pod would accept connections from anywhere")
    tokens: dict[str, str] = {}
    s3: dict[str, str] = {}
    for doc in docs:
        for where, c in cluster_specs(doc):
            name = (c.get("authOptions") or {}).get("secretName")
            if name in tokens:
                errors.append(f"{ident(doc)}: {where}.authOptions.secretName: {name} is also {tokens[name]}'s Ray "
                              "token; one token per cluster")
            elif name:
                tokens[name] = ident(doc)
        for name in {n for where, pod in pod_specs(doc) if "submitterPodTemplate" not in where
                     for w, n in secret_refs(pod) if "AWS_" in w}:
            if name in s3 and s3[name] != ident(doc):
                errors.append(f"{ident(doc)}: the S3 credential {name} is also {s3[name]}'s; each workload gets its "
                              "own (Serve a read-only one for the model prefix)")
            s3.setdefault(name, ident(doc))
    namespaces = [d for d in docs if d.get("kind") == "Namespace"]
    if any(((d.get("metadata") or {}).get("labels") or {}).get(ENVIRONMENT_LABEL) == "prod" for d in namespaces):
        for doc in docs:
            for where, pod in pod_specs(doc):
                for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
                    if not DIGEST.search(str(c.get("image", ""))):
                        errors.append(f"{ident(doc)}: {where}.containers[{c.get('name')}].image: {c.get('image')} is a "
                                      "tag; production pins images by digest (image@sha256:...)")
    return errors


def reference_errors(doc: dict, config_maps: dict[str, set[str]]) -> list[str]:
    """ConfigMaps a pod reads (env configMapKeyRef, envFrom, volumes) that the build does not hold, or keys they
    lack; ``optional`` references are allowed to be missing. ``config_maps``: name -> data keys of the build."""
    errors = []
    for where, pod in pod_specs(doc):
        for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            for env in c.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                if ref and not ref.get("optional") and ref.get("key") not in config_maps.get(ref.get("name"), set()):
                    errors.append(f"{where}.containers[{c.get('name')}].env[{env.get('name')}]: ConfigMap "
                                  f"{ref.get('name')} with key {ref.get('key')} is not in the build")
            for src in c.get("envFrom") or []:
                ref = src.get("configMapRef")
                if ref and not ref.get("optional") and ref.get("name") not in config_maps:
                    errors.append(f"{where}.containers[{c.get('name')}].envFrom: ConfigMap {ref.get('name')} is not in the build")
        for vol in pod.get("volumes") or []:
            ref = vol.get("configMap")
            if ref and not ref.get("optional") and ref.get("name") not in config_maps:
                errors.append(f"{where}.volumes[{vol.get('name')}]: ConfigMap {ref.get('name')} is not in the build")
    return [f"{ident(doc)}: {e}" for e in errors]


# --------------------------------------------------------------------------------------------------------------
def all_errors(docs: list[dict], crd_dir: Path, k8s_version: str = "1.37.0",
               check_references: bool = True) -> list[str]:
    """Every layer's errors for a built manifest stream, including manifests embedded in ConfigMaps.

    ``check_references``: also require every ConfigMap a pod reads to be in ``docs`` (off for a lone object).
    The whole-overlay rules (:func:`build_policy_errors`) apply to a build holding its Namespace.
    """
    errors = build_policy_errors(docs) if any(d.get("kind") == "Namespace" for d in docs) else []
    items = [("", d) for d in docs] + list(embedded_manifests(docs))
    config_maps = {d["metadata"]["name"]: set(d.get("data") or {}) for d in docs
                   if d.get("kind") == "ConfigMap" and (d.get("metadata") or {}).get("name")}
    for where, doc in items:
        prefix = f"{where}: " if where else ""
        # The API server refuses an object that fails its schema before any controller sees it: the later layers
        # (which assume the schema's types) run only on schema-valid objects.
        if doc.get("kind") in RAY_KINDS:
            layer = crd_errors(doc, crd_dir)
            if not layer:
                layer = controller_errors(doc) + [
                    # an embedded template's submitter image is set when the RayJob is created
                    e for e in policy_errors(doc) if not (where and "placeholder" in e)]
        else:
            layer = builtin_errors(doc, k8s_version)
            if not layer:
                layer = policy_errors(doc)
        if check_references and not layer:
            layer = reference_errors(doc, config_maps)
        errors += [prefix + e for e in layer]
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="a kustomization directory, or a built YAML stream")
    p.add_argument("--crds", required=True, help="folder holding KubeRay's ray.io_*.yaml CRDs")
    p.add_argument("--kubectl", default="kubectl")
    p.add_argument("--k8s-version", default="1.37.0")
    a = p.parse_args(argv)
    target = Path(a.target)
    try:
        docs = (kustomize_build(target, a.kubectl) if target.is_dir()
                else [d for d in yaml.safe_load_all(target.read_text(encoding="utf-8")) if d])
        errors = all_errors(docs, Path(a.crds), a.k8s_version)
    except (OSError, RuntimeError, yaml.YAMLError) as e:
        print(f"validate: {e}", file=sys.stderr)
        return 2
    for e in errors:
        print(e)
    print(f"{len(docs)} manifests, {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
