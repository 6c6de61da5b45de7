"""The Serve application built from a medsr config: one :class:`~medsr_dist.serve.model.SRModel` deployment per
model (``model-<name>``) behind one FastAPI :class:`~medsr_dist.serve.ingress.Ingress` (``ingress``).

Entry points:

* :func:`build_app` — the bound application (for ``serve.run`` or tests);
* :func:`app_builder` — the ``import_path`` of ``configs/serve_app.yaml`` (``serve deploy``, KubeRay RayService):
  ``args: {config: configs/serve.yaml, overrides: [...]}``;
* :func:`run_local` — ``medsr serve``: Serve on this Ray (or ``ray.address``), prints the URL, waits for Ctrl-C.

Sizing (all from the ``serve`` section): a model deployment autoscales between ``min_replicas`` and
``max_replicas`` on ``target_ongoing_requests`` (Serve's own autoscaler; a hand-written Serve config that leaves
``max_replicas`` out gets 1, so it is always written here), one GPU per replica when the cluster has GPUs (else
``cpus_per_replica`` CPUs), ``max_ongoing_requests`` (default ``max_batch_size``, never less: otherwise a batch of
single-tile requests never fills), ``max_queued_requests`` per caller beyond which callers get 503 + Retry-After.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from medsr_dist.config import MedsrConfig, ServeConfig, load_config
from medsr_dist.config.serve import is_loopback
from medsr_dist.infer.model_file import choose_backend, read_model_file
from medsr_dist.infer.registry import AUTO_BACKEND, backend_factory
from medsr_dist.infer.replica import EngineSettings, resolve_precision
from medsr_dist.infer.serve_names import model_deployment_name
from medsr_dist.preflight import preflight
from medsr_dist.runtime import cluster_nodes, init_ray, size_replicas
from medsr_dist.serve.auth import build_authenticator
from medsr_dist.serve.ingress import Ingress
from medsr_dist.serve.model import SRModel
from medsr_dist.storage import Storage

log = logging.getLogger(__name__)

INGRESS_NAME = "ingress"


def served_models(cfg: MedsrConfig) -> list[ServeConfig.Model]:
    """``serve.models``, or ``enhance.checkpoint`` as ``default`` when the list is empty."""
    if cfg.serve.models:
        return list(cfg.serve.models)
    sampling = cfg.enhance.sampling if cfg.enhance.sampling.overrides() else None  # as the nightly job samples
    return [ServeConfig.Model(name="default", checkpoint=cfg.enhance.checkpoint, onnx_model=cfg.enhance.onnx_model,
                              sampling=sampling)]


def served_model_file(cfg: MedsrConfig, index: int, entry: ServeConfig.Model):
    """The :class:`~medsr_dist.infer.model_file.ModelFile` a model deployment serves: read (hash, architecture) and,
    for an iterative-sampler family, with the entry's sampling settings.

    Raises:
        FileNotFoundError / ValueError: the file is missing or unusable, a sampling setting does not apply, or the
            model would sample K > 1 times (an answer is one file: its uncertainty map would be dropped).
    """
    where = f"serve.models[{index}].sampling ({entry.name})" if cfg.serve.models else "enhance.sampling"
    model = read_model_file(entry.checkpoint, cfg.storage, onnx_uri=entry.onnx_model)
    model = model.with_sampling(entry.sampling.overrides() if entry.sampling else None, where)
    samples = int((model.sampling or {}).get("samples", 1))
    if samples > 1:
        raise ValueError(f"{where}: model {model.name} samples K = {samples} times per image (its export's or this "
                         f"setting), which asks for an uncertainty map beside each output; an HTTP answer is one "
                         f"file, so set samples: 1 to serve it, and get uncertainty maps from the nightly job "
                         f"(enhance.replicas: local)")
    return model


def _gpus(s: ServeConfig) -> float:
    if s.gpus_per_replica is not None:
        return float(s.gpus_per_replica)
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def autoscaling_config(s: ServeConfig) -> dict[str, Any]:
    """Serve ``autoscaling_config`` of a model deployment (field names of Ray 2.60's ``AutoscalingConfig``)."""
    config = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
              "target_ongoing_requests": s.target_ongoing_requests, "upscale_delay_s": s.upscale_delay_s,
              "downscale_delay_s": s.downscale_delay_s, "metrics_interval_s": 1.0, "look_back_period_s": 5.0}
    if s.initial_replicas is not None:
        config["initial_replicas"] = s.initial_replicas
    return config


def build_app(cfg: MedsrConfig):
    """The bound Serve application for ``cfg`` (Ray must be initialised when ``serve.gpus_per_replica`` is empty:
    the cluster's GPUs decide). Models are read (hash, architecture) and their precision resolved here, before
    any replica starts: a missing model file fails now with its name.

    Raises:
        FileNotFoundError / ValueError: a model file or its export is missing or unusable.
    """
    from ray import serve
    from ray.serve.config import BackpressureConfig

    s = cfg.serve
    gpus = _gpus(s)
    if s.backend != AUTO_BACKEND:
        backend_factory(s.backend)  # an unusable backend (runtime not installed) fails here
    models = served_models(cfg)
    sizing = size_replicas(cluster_nodes(), cpus_per_replica=s.cpus_per_replica, min_replicas=1,
                           max_replicas=s.max_replicas * max(1, len(models)), section="serve")
    cpus = 0 if gpus else sizing.cpus
    log.info("serve model replicas: %s each, %d intra-op thread(s) (%s)", "GPU" if gpus else f"{cpus:g} CPU",
             sizing.threads, sizing.how)
    settings = EngineSettings.of(s, outscale=None, threads=None if gpus else sizing.threads)
    storage = Storage(cfg.storage)
    limits = {"max_input_pixels": s.max_input_pixels, "max_output_pixels": s.max_output_pixels,
              "max_body_bytes": s.max_body_bytes, "max_input_bytes": s.max_input_bytes,
              "max_outscale": s.max_outscale, "probe_timeout_s": s.probe_timeout_s, "probe_workers": s.probe_workers,
              "probe_memory_mb": s.probe_memory_mb, "decode_memory_bytes": s.decode_memory_bytes,
              "decode_timeout_s": s.decode_timeout_s}
    build_authenticator(s.auth)  # a tokens file that is missing or malformed fails now, naming the key
    ongoing = s.max_ongoing_requests or s.max_batch_size
    backpressure = BackpressureConfig(status_code=503, retry_after_s=s.retry_after_s)
    handles, catalogue = {}, {}
    for index, entry in enumerate(models):
        model = served_model_file(cfg, index, entry)
        choice = choose_backend(s.backend, model, storage, gpu=gpus > 0)  # per model: its own ONNX export or none
        if choice.reason != "configured":
            log.info("serve.backend auto for %s: %s; %s", entry.name, choice.name, choice.reason)
        precision = resolve_precision(choice.name, s.precision, gpu=gpus > 0)
        if precision != s.precision:
            log.warning("serve.precision %s: %s replicas run %s; responses record %s", s.precision, entry.name,
                        precision, precision)
        own = replace(settings, backend=choice.name, precision=precision)
        deployment = serve.deployment(SRModel).options(
            name=model_deployment_name(entry.name),
            max_ongoing_requests=ongoing,
            max_queued_requests=s.max_queued_requests,
            backpressure_config=backpressure,
            autoscaling_config=autoscaling_config(s),
            ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
            health_check_period_s=5.0,
            health_check_timeout_s=30.0,
        )
        handles[entry.name] = deployment.bind(
            model, cfg.storage.model_dump(), {k: getattr(own, k) for k in own.__dataclass_fields__},
            limits, s.max_batch_size, s.batch_wait_timeout_s, s.dicom_compression, ongoing)
        catalogue[entry.name] = {"model": model.name, "model_sha256": model.sha256, "scale": model.scale,
                                 "family": model.family, "backend": choice.name, "backend_reason": choice.reason,
                                 "precision": precision,
                                 "sampling": model.sampling}
    default = served_models(cfg)[0].name
    # The ingress only parses and forwards (async): many requests at once are cheap there; the queue bound that
    # matters is the model deployments'. Its own bound keeps a flood from piling up in the proxy.
    per_model = s.max_replicas * (ongoing + s.max_queued_requests)
    ingress = serve.deployment(Ingress).options(
        name=INGRESS_NAME, num_replicas=s.ingress_replicas, max_ongoing_requests=max(64, 2 * per_model),
        max_queued_requests=max(64, 2 * per_model), backpressure_config=backpressure,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(handles, catalogue, default, limits, s.retry_after_s, s.auth.model_dump(),
                        s.rate_limit.model_dump())


def http_options(s: ServeConfig) -> dict[str, Any]:
    """``serve.start(http_options=...)``: host, port and the end-to-end ``request_timeout_s`` (408 past it)."""
    options: dict[str, Any] = {"host": s.host, "port": s.port}
    if s.request_timeout_s is not None:
        options["request_timeout_s"] = s.request_timeout_s
    return options


def app_builder(args: dict[str, Any]):
    """Application builder for ``import_path: medsr_dist.serve.app:app_builder`` (``configs/serve_app.yaml``).

    ``args``: ``config`` (path of a medsr YAML config, relative to the working directory) and optional
    ``overrides`` (list of ``key=value``). HTTP options (host, port, request_timeout_s) belong to the Serve config
    file's ``http_options`` there, not to this builder.
    """
    import ray

    cfg = preflight(load_config(args.get("config"), list(args.get("overrides") or [])))
    if not ray.is_initialized():  # the builder runs inside the cluster: join it
        ray.init(address="auto", ignore_reinit_error=True)
    check_bind(cfg.serve, proxy_host())
    return build_app(cfg)


def proxy_host() -> str | None:
    """The host Serve's HTTP proxies bind (the Serve config file's ``http_options.host``), or None when it cannot be
    read. Uses the controller's ``get_http_config``: Serve has no public call for it."""
    try:
        from ray.serve.context import _get_global_client  # lazy: private Serve API, only in a running cluster

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is None:
            return None
        import ray

        return str(ray.get(client._controller.get_http_config.remote(), timeout=10).host)
    except Exception:  # noqa: BLE001 - an API that moved: the caller decides without it
        return None


def check_bind(s: ServeConfig, host: str | None) -> None:
    """Refuse ``serve.auth.mode: none`` unless the proxies bind loopback. The medsr config's ``serve.host`` is
    checked when the config is read; a Serve config file (``serve deploy``, KubeRay) sets the real bind in its
    ``http_options``, which ``host`` is (None: unknown, taken as not loopback).

    Raises:
        ValueError: naming ``serve.auth.mode`` and the bind.
    """
    if s.auth.mode == "none" and not (host is not None and is_loopback(host)):
        raise ValueError(f"serve.auth.mode is none but the Serve HTTP proxies bind {host or 'an unknown host'!r} "
                         f"(http_options.host), not a loopback address: set serve.auth.mode (tokens or oidc) in the "
                         f"application's config or overrides, or bind 127.0.0.1")


def start(cfg: MedsrConfig, *, blocking: bool = False) -> str:
    """Start Serve (HTTP options from ``serve``) and the application on the current Ray; returns its URL."""
    from ray import serve

    s = cfg.serve
    serve.start(http_options=http_options(s))
    serve.run(build_app(cfg), name=s.app_name, route_prefix=s.route_prefix, blocking=blocking)
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    return f"http://{host}:{s.port}{s.route_prefix.rstrip('/')}"


def run_local(cfg: MedsrConfig, echo=print) -> None:  # pragma: no cover - waits for Ctrl-C
    """``medsr serve``: start the app on ``ray.address`` (or a local Ray), print the URL, serve until Ctrl-C."""
    from ray import serve

    init_ray(cfg)
    url = start(cfg)
    echo(f"serving {', '.join(m.name for m in served_models(cfg))} at {url}/v1/enhance (docs: {url}/docs); "
         f"Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(cfg.serve.app_name)
