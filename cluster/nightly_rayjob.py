"""Create tonight's enhancement RayJob from its template and wait for it: what the nightly CronJob's pod runs
(k8s/base/nightly/cronjob.yaml).

    python cluster/nightly_rayjob.py --template /etc/medsr/nightly-rayjob.yaml --cluster medsr
    python cluster/nightly_rayjob.py --template k8s/base/nightly/nightly-rayjob.yaml --image reg/medsr-dist:0.1.0 --dry-run

The template is a RayJob with ``metadata.generateName`` (one new RayJob per night) that selects the long-lived
RayCluster. Its submitter container gets the RayCluster's head image (``kubectl get raycluster``), as KubeRay's
default submitter would, because kustomize's image rewriting does not reach into the ConfigMap that holds the
template. The pod then polls the RayJob until KubeRay reports it ``Complete`` or ``Failed``, so the CronJob's
``concurrencyPolicy: Forbid`` really keeps two nights apart.

Exit status: 0 the Ray job SUCCEEDED; 1 it failed, stopped, or its deployment failed (reason and message printed);
2 bad arguments or template; 3 kubectl failed (message printed). Only kubectl is called: the pod's ServiceAccount
needs create/get on rayjobs and get on rayclusters in its namespace.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import yaml

#: RayJob .status.jobDeploymentStatus values after which KubeRay does nothing more for the job.
FINAL_DEPLOYMENT = {"Complete", "Failed", "ValidationFailed"}


class KubectlError(RuntimeError):
    """kubectl exited non-zero; the message holds its stderr."""


def render(template: dict[str, Any], image: str) -> dict[str, Any]:
    """The RayJob to create: ``template`` (not modified) with its submitter container's image set to ``image``.

    Raises ValueError naming the field when the template is not a RayJob with ``metadata.generateName``, a
    ``clusterSelector`` and a ``submitterPodTemplate`` with one container.
    """
    if not isinstance(template, dict) or template.get("kind") != "RayJob":
        raise ValueError(f"template: kind must be RayJob, got {template.get('kind') if isinstance(template, dict) else type(template).__name__}")
    job = json.loads(json.dumps(template))  # deep copy; the template's values are YAML scalars only
    meta, spec = job.get("metadata") or {}, job.get("spec") or {}
    if not meta.get("generateName") or meta.get("name"):
        raise ValueError("template: metadata.generateName must be set and metadata.name unset (one new RayJob per night)")
    if not spec.get("clusterSelector"):
        raise ValueError("template: spec.clusterSelector must name the RayCluster the job runs on")
    containers = (((spec.get("submitterPodTemplate") or {}).get("spec") or {}).get("containers")) or []
    if len(containers) != 1:
        raise ValueError("template: spec.submitterPodTemplate.spec.containers must hold exactly one container")
    if not image:
        raise ValueError("image: empty")
    containers[0]["image"] = image
    return job


def kubectl(kubectl_bin: str, *args: str, stdin: str | None = None) -> str:
    """Run kubectl and return its stdout; raises KubectlError with its stderr on a non-zero exit."""
    proc = subprocess.run([kubectl_bin, *args], input=stdin, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise KubectlError(f"kubectl {' '.join(args[:2])}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def cluster_image(kubectl_bin: str, cluster: str) -> str:
    """The image of the RayCluster's head container (container 0, the Ray container)."""
    return kubectl(kubectl_bin, "get", "raycluster", cluster, "-o",
                   "jsonpath={.spec.headGroupSpec.template.spec.containers[0].image}").strip()


def wait(kubectl_bin: str, name: str, poll_s: float, echo=print, max_errors: int = 10) -> int:
    """Poll RayJob ``name`` until its deployment status is final; 0 if its Ray job SUCCEEDED, else 1.

    A failed ``kubectl get`` (an API server restart during the night) is retried; ``max_errors`` in a row raise
    KubectlError.
    """
    last, errors = None, 0
    while True:
        try:
            status = json.loads(kubectl(kubectl_bin, "get", "rayjob", name, "-o", "json")).get("status") or {}
            errors = 0
        except KubectlError as e:
            errors += 1
            if errors >= max_errors:
                raise
            echo(f"rayjob/{name}: {e} (retrying)")
            time.sleep(poll_s)
            continue
        deployment, job_status = status.get("jobDeploymentStatus", ""), status.get("jobStatus", "")
        if (deployment, job_status) != last:
            echo(f"rayjob/{name}: {deployment or 'New'} {job_status}".rstrip())
            last = (deployment, job_status)
        if deployment in FINAL_DEPLOYMENT:
            if deployment == "Complete" and job_status == "SUCCEEDED":
                return 0
            echo(f"rayjob/{name} did not succeed: {status.get('reason', '')} {status.get('message', '')}".strip())
            return 1
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--template", required=True, help="RayJob template (YAML)")
    p.add_argument("--cluster", default="medsr", help="RayCluster whose head image the submitter uses")
    p.add_argument("--image", help="submitter image (default: the RayCluster's head image)")
    p.add_argument("--kubectl", default="kubectl", help="kubectl executable")
    p.add_argument("--poll-s", type=float, default=30.0, help="seconds between status checks")
    p.add_argument("--dry-run", action="store_true", help="print the RayJob instead of creating it")
    a = p.parse_args(argv)
    try:
        with open(a.template, encoding="utf-8") as f:
            template = yaml.safe_load(f)
        image = a.image or ("medsr-dist:dry-run" if a.dry_run else cluster_image(a.kubectl, a.cluster))
        job = render(template, image)
    except (OSError, yaml.YAMLError, ValueError) as e:
        print(f"nightly_rayjob: {a.template}: {e}", file=sys.stderr)
        return 2
    except KubectlError as e:
        print(f"nightly_rayjob: {e}", file=sys.stderr)
        return 3
    if a.dry_run:
        print(yaml.safe_dump(job, sort_keys=False), end="")
        return 0
    try:
        name = kubectl(a.kubectl, "create", "-f", "-", "-o", "jsonpath={.metadata.name}", stdin=json.dumps(job)).strip()
        print(f"created rayjob/{name} (submitter image {image})", flush=True)
        return wait(a.kubectl, name, a.poll_s, echo=lambda s: print(s, flush=True))
    except KubectlError as e:
        print(f"nightly_rayjob: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
