"""The checks of a run config that need files, models or the plug-in registries, run by every command before Ray
starts (``medsr_dist.cli``'s config loading): a stage's local inputs exist, a VAE export fits ``model.vae_arch``,
``enhance.sampling`` fits its checkpoint, ``backend:`` names a registered inference backend, and PACS credentials
are not about to cross a network in clear text (a ``dicomweb+http://`` endpoint on another host). The config itself
(:mod:`medsr_dist.config`) stays declarative; a failed check raises :class:`~medsr_dist.config.ConfigError` in the
config's own message format (``invalid config <source>:`` and the key), which the CLI prints, exiting 2.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from medsr_dist.config import ConfigError, MedsrConfig
from medsr_dist.infer.model_file import read_model_file
from medsr_dist.infer.registry import AUTO_BACKEND, offered_backend_names
from medsr_dist.pacs.dicomweb import Credentials, PacsAuthError
from medsr_dist.pacs.transport import plain_http_to_remote
from medsr_dist.uris import Endpoint, is_dicomweb


def preflight(cfg: MedsrConfig, stage: str | None = None) -> MedsrConfig:
    """Every check of ``cfg`` that needs more than the config: the registered backends, and with ``stage``
    (``prepare``, ``train``, ``enhance``) that stage's local inputs (:func:`check_local_inputs`). Returns ``cfg``.

    Raises:
        ConfigError: naming the config's source and the key.
    """
    check_backends(cfg)
    if stage:
        check_local_inputs(cfg, stage)
    if stage == "enhance":
        check_pacs_transport(cfg)
    return cfg


def check_pacs_transport(cfg: MedsrConfig) -> None:
    """``enhance.input`` / ``enhance.output``: no PACS credentials (``pacs.*``, read here from this process's
    environment and secret files) over ``dicomweb+http://`` to a host that is not this machine. The client refuses
    the same when it connects (:func:`~medsr_dist.pacs.dicomweb.refuse_plain_http`), in every Ray worker."""
    endpoints = [(key, uri) for key, uri in (("enhance.input", cfg.enhance.input), ("enhance.output", cfg.enhance.output))
                 if uri and is_dicomweb(uri) and plain_http_to_remote(Endpoint.parse(uri)[0].url)]
    if not endpoints:
        return
    try:
        creds = Credentials.resolve(cfg.pacs)
    except PacsAuthError as exc:
        raise ConfigError(f"invalid config {cfg.source}:\n  pacs: {exc}") from None
    if creds.kind != "none":
        key, uri = endpoints[0]
        raise ConfigError(f"invalid config {cfg.source}:\n  {key}: {Endpoint.parse(uri)[0]}: PACS credentials "
                          f"({creds.source}) are sent over https only, or plain http to a loopback host; use "
                          f"dicomweb+https://")


def check_backends(cfg: MedsrConfig) -> None:
    """``enhance.backend``, ``eval.backend`` and ``serve.backend`` name registered backends that are offered
    (``enhance``/``serve``: or ``auto``)."""
    names = offered_backend_names()
    for key, value in (("enhance.backend", cfg.enhance.backend), ("eval.backend", cfg.eval.backend),
                       ("serve.backend", cfg.serve.backend)):
        allowed = names + ([AUTO_BACKEND] if key != "eval.backend" else [])
        if value not in allowed:
            quoted = [repr(n) for n in allowed]
            choices = f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else quoted[0]
            raise ConfigError(f"invalid config {cfg.source}:\n  {key}: Input should be {choices} (got {value!r})")


def check_local_inputs(cfg: MedsrConfig, stage: str) -> None:
    """Fail early when a stage's input is a local path that does not exist (remote inputs are checked by the stage)."""
    inputs = {
        "prepare": [("prepare.input", cfg.prepare.input)],
        "train": [("train.dataset", cfg.train.dataset)]
        + ([("model.pretrained_g", cfg.model.pretrained_g)] if getattr(cfg.model, "pretrained_g", None) else [])
        + ([("model.vae", cfg.model.vae)] if getattr(cfg.model, "vae", None) else []),
        "enhance": [("enhance.input", cfg.enhance.input), ("enhance.checkpoint", cfg.enhance.checkpoint)],
    }[stage]
    for key, uri in inputs:
        if uri is None or "://" in uri and not uri.startswith("file://"):
            continue
        local = uri[len("file://"):] if uri.startswith("file://") else uri
        if key in ("model.pretrained_g", "model.pretrained_d", "enhance.checkpoint") and not (
            "/" in local or local.endswith((".pth", ".pt", ".safetensors"))
        ):
            continue  # a model-zoo name, resolved by the zoo
        if not os.path.exists(local):
            raise ConfigError(f"invalid config {cfg.source}:\n  {key}: path {uri} does not exist")
        if key == "model.vae":
            _check_vae_export(cfg, local)
        if key == "enhance.checkpoint" and cfg.enhance.sampling.overrides():
            _check_sampling(cfg, uri)


def _check_sampling(cfg: MedsrConfig, checkpoint: str) -> None:
    """``enhance.sampling`` must fit the model it overrides (an ldm export; steps within its schedule)."""
    try:
        read_model_file(checkpoint, cfg.storage).with_sampling(cfg.enhance.sampling.overrides(), "enhance.sampling")
    except ValueError as exc:
        raise ConfigError(f"invalid config {cfg.source}:\n  {exc}") from None


def _check_vae_export(cfg: MedsrConfig, local: str) -> None:
    """A `vae` export named by ``model.vae`` must have the architecture of ``model.vae_arch`` (read from its meta.json)."""
    meta_path = os.path.join(os.path.dirname(local), "meta.json") if os.path.isfile(local) else None
    if meta_path is None or not os.path.isfile(meta_path):
        return  # a diffusers folder: its config.json is checked when it is loaded
    meta = json.loads(Path(meta_path).read_text())
    if meta.get("family") != "vae":
        raise ConfigError(f"invalid config {cfg.source}:\n  model.vae: {local} is a {meta.get('family')!r} export, "
                          "not a `vae` stage's")
    arch = meta.get("generator", {}).get("vae_arch")
    want = cfg.model.vae_arch.model_dump(mode="json")
    if arch != want:
        raise ConfigError(f"invalid config {cfg.source}:\n  model.vae_arch: {want} does not match the VAE export "
                          f"{local} ({arch}); latents would not have the shape the U-Net expects")
