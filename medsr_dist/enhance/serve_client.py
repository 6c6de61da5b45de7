"""Stage 2 with ``enhance.replicas: serve:<app>``: the job's items computed by a running Serve application.

Contract: :func:`serve_deployment` finds the app's model deployment that serves the job's model with the job's
parameters (or raises ValueError naming the difference, before any item); :class:`ServeReplica` keeps
:class:`~medsr_dist.enhance.replicas.EnhanceReplica`'s row contract, sending each 2-D item to that deployment
(``SRModel.enhance_item``). Items of another kind (volumes) become error rows: only the job's own replicas run them.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from medsr_dist.config import EnhanceConfig
from medsr_dist.enhance.spec import IMAGE_KIND
from medsr_dist.infer.model_file import ModelFile
from medsr_dist.infer.rows import NO_OUTPUT, NO_PIXELS, batch_rows, columns
from medsr_dist.infer.serve_names import is_model_deployment
from medsr_dist.io.phi import item_label, sanitize_reason

log = logging.getLogger(__name__)

#: How long a job item waits, all retries together, on a Serve application at capacity or without a healthy
#: replica before it becomes an error row (the next run tries it again).
SERVE_WAIT_S = 600.0
#: The app's deployment-info keys held against the job's parameters (label, param key).
_SERVE_PARAMS = (("enhance.tile", "tile"), ("enhance.tile_overlap", "tile_overlap"),
                 ("enhance.tile_blend", "tile_blend"), ("enhance.backend", "backend"),
                 ("enhance.precision (as run)", "precision"), ("engine revision (medsr-dist version)", "engine"))


def serve_deployment(e: EnhanceConfig, model: ModelFile, params: dict) -> tuple[str, str]:
    """``enhance.replicas: serve:<app>``: ``(app, deployment)`` of the running Serve application's model deployment
    that serves ``model`` (same sha256) with the job's ``params`` (:func:`~medsr_dist.infer.provenance.enhance_params`).

    Outputs are keyed and labelled by the model's hash and these parameters, so they must be what computes them.

    Raises:
        ValueError: Ray is not initialised; no application of that name is running; it serves no model with this
            sha256 (the message lists what it serves); its deployment runs other parameters (each key with both
            values) or is unhealthy.
    """
    import ray
    from ray import serve

    app = e.replicas.split(":", 1)[1]
    where = f"enhance.replicas serve:{app}"
    if not ray.is_initialized():
        raise ValueError(f"{where}: needs the Ray cluster the application runs on (ray.address)")
    apps = serve.status().applications
    if app not in apps:
        raise ValueError(f"{where}: no Serve application {app!r} is running on this Ray cluster (running: "
                         f"{sorted(apps) or 'none'}); start it with `medsr serve` or `serve deploy`")
    state = apps[app]
    if state.status != "RUNNING":
        raise ValueError(f"{where}: the application is {state.status}, not RUNNING ({state.message[:200]})")
    served = []
    for name in sorted(state.deployments):
        if not is_model_deployment(name):
            continue
        try:
            served.append((name, serve.get_deployment_handle(name, app_name=app).info.remote().result(timeout_s=60)))
        except Exception as exc:  # noqa: BLE001 - the reason is the error
            raise ValueError(f"{where}: deployment {name} does not answer ({type(exc).__name__})") from None
    match = [(name, info) for name, info in served if info.get("model_sha256") == model.sha256]
    if not match:
        listed = ", ".join(f"{info.get('model')} (sha256 {str(info.get('model_sha256'))[:12]})" for _, info in served)
        raise ValueError(f"{where}: the application serves {listed or 'no model'}, not enhance.checkpoint "
                         f"{model.name} (sha256 {model.sha256[:12]}); outputs are keyed by the model's sha256")
    name, info = match[0]
    if int((model.sampling or {}).get("samples", 1)) > 1:
        raise ValueError(f"{where}: enhance.sampling.samples > 1 asks for an uncertainty map beside each output, "
                         f"which only the job's own replicas compute (enhance.replicas: local)")
    checks = list(_SERVE_PARAMS)
    if params.get("sampling") is not None or info.get("sampling") is not None:
        checks.append(("enhance.sampling", "sampling"))
    diff = [f"{label}: the job {params.get(key)!r}, the app {info.get(key)!r}" for label, key in checks
            if params.get(key) != info.get(key)]
    if diff:
        raise ValueError(f"{where}: deployment {name} runs other parameters than the job's outputs would be keyed "
                         f"by ({'; '.join(diff)}); set them equal")
    if not info.get("healthy", True):
        raise ValueError(f"{where}: deployment {name} is unhealthy: {info.get('unhealthy_reason')}")
    return app, name


class ServeReplica:
    """Stage 2 with ``enhance.replicas: serve:<app>``: :class:`EnhanceReplica`'s row contract, computed by a running
    Serve application's model deployment (:meth:`medsr_dist.serve.model.SRModel.enhance_item`, the same
    :func:`~medsr_dist.infer.rows.enhance_rows`) through a DeploymentHandle; tiles of the job's images and of on-demand requests share the
    app's model calls. This actor holds no model: it sends and waits.

    Every todo row of a batch is sent at once; rows come back in order. A row whose call died with its Serve
    replica (or met a fatal device error there) is not yielded: the job retries it alone and counts it, exactly as
    when one of its own replicas dies. A full queue or an unhealthy replica is waited out (at most
    :data:`SERVE_WAIT_S`, then an error row).
    """

    def __init__(self, app: str, deployment: str, outscale: float | None, log_keys: bool = False):
        from ray import serve

        self.app, self.deployment, self.outscale, self.log_keys = app, deployment, outscale, log_keys
        self.handle = serve.get_deployment_handle(deployment, app_name=app)

    def _send(self, row: dict):
        return self.handle.enhance_item.remote(row["pixels"], str(row["meta"]), str(row.get("item_id", "")),
                                               self.outscale)

    def __call__(self, batch: dict) -> Iterator[dict]:
        rows = batch_rows(batch)
        for row in rows:
            row["output"] = NO_OUTPUT
            row["fp32_fallbacks"] = 0
        todo = [row for row in rows if row["status"] == "todo"]
        passing = [row for row in rows if row["status"] != "todo"]
        if passing:
            yield columns([{**r, "pixels": NO_PIXELS, "header": b""} for r in passing])
        for row in [r for r in todo if (r.get("kind") or IMAGE_KIND) != IMAGE_KIND]:  # the app runs 2-D images only
            yield columns([{**row, "status": "error", "pixels": NO_PIXELS, "header": b"", "error": (
                "volumes are reconstructed only by the job's own replicas (enhance.replicas: local), not through "
                f"serve:{self.app}")}])
        todo = [row for row in todo if (row.get("kind") or IMAGE_KIND) == IMAGE_KIND]
        for row, response in [(row, self._send(row)) for row in todo]:
            answer = self._answer(row, response)
            if answer is None:
                continue  # lost with its replica
            row["seconds"] = float(row["seconds"]) + float(answer.get("seconds", 0.0))
            if answer["status"] == "todo":
                row["output"] = answer["output"]
                row["fp32_fallbacks"] = int(answer.get("fp32_fallbacks", 0))
            else:
                row = {**row, "status": "error", "error": sanitize_reason(str(answer["error"]), key=str(row["key"])),
                       "pixels": NO_PIXELS, "header": b"", "output": NO_OUTPUT}
            yield columns([row])

    def _answer(self, row: dict, response) -> dict | None:
        """The deployment's answer for ``row`` (resent while the app is at capacity); None: lost with a replica."""
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

        label = item_label(row, self.log_keys)
        deadline = time.monotonic() + SERVE_WAIT_S
        while True:
            try:
                answer = response.result()
            except BackPressureError as exc:
                wait = float(exc.retry_after_s or 1.0)
            except (RayActorError, ActorUnavailableError, ReplicaUnavailableError) as exc:
                log.warning("%s: lost with its Serve replica (%s); retried alone", label, type(exc).__name__)
                return None
            except Exception as exc:  # noqa: BLE001 - the app failed this item: its error row
                return {"status": "error", "error": f"Serve application {self.app}: {type(exc).__name__}: {exc}"}
            else:
                if answer["status"] == "lost":
                    log.warning("%s: %s on its Serve replica; retried alone", label, answer["error"])
                    return None
                if answer["status"] != "unavailable":
                    return answer
                wait = 1.0
            if time.monotonic() + wait > deadline:
                return {"status": "error", "error": f"Serve application {self.app} ({self.deployment}) was at "
                                                    f"capacity or unavailable for {SERVE_WAIT_S:.0f} s; not enhanced"}
            time.sleep(wait)
            response = self._send(row)
