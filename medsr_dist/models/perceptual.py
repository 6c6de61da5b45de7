"""The perceptual loss of the GAN families: basicsr ``PerceptualLoss`` over VGG19 features *before* activation
(basicsr's ``VGGFeatureExtractor`` layer names, e.g. ``conv5_4``), with ImageNet weights that are never
downloaded silently.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from types import SimpleNamespace

import torch

import medsr_dist.compat  # noqa: F401  (makes basicsr importable)
from basicsr.archs import vgg_arch
from basicsr.losses.basic_loss import PerceptualLoss

from medsr_dist.config import MedsrConfig
from medsr_dist.storage import Storage

log = logging.getLogger(__name__)

VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = f"https://download.pytorch.org/models/{VGG19_FILE}"
RANDOM_VGG = "random-init-for-testing"


class VGGWeightsMissing(RuntimeError):
    """The perceptual loss needs ImageNet VGG19 weights that are not available."""


def resolve_vgg19_weights(source: str, storage=None) -> str | None:
    """Local file of ImageNet VGG19 weights for ``source``; None for the explicit random test VGG.

    ``source``: 'torchvision' (the torch hub cache under TORCH_HOME), a local path or a store URI.
    Raises :class:`VGGWeightsMissing` saying how to provide them.
    """
    if source == RANDOM_VGG:
        return None
    if source == "torchvision":
        path = os.path.join(torch.hub.get_dir(), "checkpoints", VGG19_FILE)
        if os.path.isfile(path):
            return path
        raise VGGWeightsMissing(
            f"train.vgg.weights=torchvision: {path} not found. The perceptual loss needs ImageNet VGG19 "
            f"weights: download {VGG19_URL} on a machine with internet access and copy it to {path} "
            f"(or set TORCH_HOME), or set train.vgg.weights to a local path or s3:// URI of that file. "
            f"For tests only, train.vgg.weights={RANDOM_VGG} uses a randomly initialised VGG."
        )
    if "://" in source and not source.startswith("file://"):
        storage = storage or Storage()
        cache = os.path.join(tempfile.gettempdir(), "medsr-vgg", VGG19_FILE)
        if not os.path.isfile(cache):
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            data = storage.read_bytes(source)
            tmp = f"{cache}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, cache)
        return cache
    path = source.removeprefix("file://")
    if not os.path.isfile(path):
        raise VGGWeightsMissing(f"train.vgg.weights: {source} does not exist")
    return path


@contextlib.contextmanager
def _vgg_weights_for_basicsr(path: str | None):
    """Point basicsr's VGGFeatureExtractor at ``path``; for None, at a randomly initialised VGG19.

    basicsr loads ``VGG_PRETRAIN_PATH`` when it exists and otherwise asks torchvision to download
    ImageNet weights, which must never happen silently here.
    """
    saved_path, saved_vgg = vgg_arch.VGG_PRETRAIN_PATH, vgg_arch.vgg
    try:
        if path is None:
            import torchvision.models as tvm

            vgg_arch.VGG_PRETRAIN_PATH = "/nonexistent/medsr-random-vgg"
            vgg_arch.vgg = SimpleNamespace(**{
                name: (lambda pretrained=False, _n=name: getattr(tvm, _n)(weights=None))
                for name in ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")
            })
        else:
            vgg_arch.VGG_PRETRAIN_PATH = path
        yield
    finally:
        vgg_arch.VGG_PRETRAIN_PATH, vgg_arch.vgg = saved_path, saved_vgg


def build_perceptual_loss(cfg: MedsrConfig) -> PerceptualLoss:
    path = resolve_vgg19_weights(cfg.train.vgg.weights)
    if path is None:
        log.warning("perceptual loss uses a RANDOMLY INITIALISED VGG19 (train.vgg.weights=%s): test/demo only", RANDOM_VGG)
    # fork_rng + a fixed seed: the random test VGG is the same on every rank and after a resume
    with _vgg_weights_for_basicsr(path), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return PerceptualLoss(
            layer_weights=dict(cfg.model.losses.perceptual_layers), vgg_type="vgg19", use_input_norm=True,
            range_norm=False, perceptual_weight=cfg.model.losses.perceptual_weight, style_weight=0.0, criterion="l1",
        )
