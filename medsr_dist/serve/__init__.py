"""The on-demand endpoint: a Ray Serve application on the one inference engine (``medsr serve``).

* :mod:`medsr_dist.serve.model` — :class:`~medsr_dist.serve.model.SRModel`, one deployment per model: a
  :class:`~medsr_dist.infer.replica.ModelReplica` per Serve replica whose tiles, from all concurrent requests, meet
  in one ``@serve.batch`` queue (so a model call holds tiles of several requests).
* :mod:`medsr_dist.serve.ingress` — the FastAPI ingress (``/v1/enhance``, ``/v1/models``, ``/healthz``, ``/docs``):
  body limits, header probe and pixel limits before anything is decoded, routing by model name, error mapping.
* :mod:`medsr_dist.serve.admission` — header probe and limits before decoding, in the ingress's probe processes.
* :mod:`medsr_dist.serve.auth` — ``serve.auth`` (oidc / tokens / none) and ``serve.rate_limit``.
* :mod:`medsr_dist.serve.app` — the application built from a medsr config (``build_app``; ``app_builder`` is the
  ``import_path`` of ``configs/serve_app.yaml`` for ``serve deploy`` and KubeRay's RayService), ``run_local``.
"""
