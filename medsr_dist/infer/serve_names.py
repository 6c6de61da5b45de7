"""Names of Serve deployments that the Serve app and its clients (the nightly job) must agree on.

Contract: a model's deployment is named :func:`model_deployment_name` (``model-<name>``); :func:`is_model_deployment`
recognises one among an application's deployments (the ingress is not one).
"""
from __future__ import annotations

MODEL_DEPLOYMENT_PREFIX = "model-"


def model_deployment_name(name: str) -> str:
    return f"{MODEL_DEPLOYMENT_PREFIX}{name}"


def is_model_deployment(deployment: str) -> bool:
    """Whether an application's deployment ``deployment`` serves a model (see :func:`model_deployment_name`)."""
    return deployment.startswith(MODEL_DEPLOYMENT_PREFIX)
