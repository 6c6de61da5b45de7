"""LPIPS for `medsr eval`: find and load the backbone weights once (:func:`check_lpips`, never raising: the
:class:`LpipsStatus` says what is missing), and score image pairs (:class:`LpipsScorer`).

torch and the lpips package are imported only where a network is built or run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np

from medsr_dist.config import EvalConfig
from medsr_dist.storage import Storage

# torchvision's ImageNet backbone files for LPIPS; torchvision names each file after its sha256 prefix.
LPIPS_BACKBONES = {
    "alex": ("alexnet-owt-7be5be79.pth", "7be5be79"),
    "vgg": ("vgg16-397923af.pth", "397923af"),
    "squeeze": ("squeezenet1_1-b8a52dc0.pth", "b8a52dc0"),
}


@dataclass(frozen=True)
class LpipsStatus:
    """Whether LPIPS can be computed, and with what.

    Attributes:
        available: the lpips package and the backbone weights are there (and load).
        reason: why LPIPS is unavailable, or a note on the weights used.
        net: LPIPS backbone ("alex", "vgg", "squeeze").
        backbone: the backbone weights file used.
        sha256: its sha256.
        imagenet: whether the file is torchvision's ImageNet release (its sha256 starts with the published
            prefix); LPIPS values from other weights are not comparable with published ones.
    """

    available: bool
    reason: str
    net: str = "alex"
    backbone: str = ""
    sha256: str = ""
    imagenet: bool | None = None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("available", "reason", "net", "backbone", "sha256", "imagenet")}


def check_lpips(lp: EvalConfig.Lpips, storage: Storage | None = None) -> LpipsStatus:
    """Find the LPIPS backbone weights and load them once; never raises, the status says what is missing."""
    if not lp.enabled:
        return LpipsStatus(False, "disabled by eval.lpips.enabled=false", lp.net)
    storage = storage or Storage()
    file_name, prefix = LPIPS_BACKBONES[lp.net]
    try:
        import lpips  # noqa: F401
    except ImportError:
        return LpipsStatus(False, "the lpips package is not installed (pip install lpips)", lp.net)
    if lp.backbone == "torchvision":
        import torch

        uri = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
        how = (f"download https://download.pytorch.org/models/{file_name} on a machine with internet access and copy "
               f"it there (or set TORCH_HOME), or set eval.lpips.backbone to a path/URI of that file")
    else:
        uri, how = lp.backbone, "check eval.lpips.backbone"
    try:
        exists = storage.exists(uri)
    except Exception as exc:  # noqa: BLE001 - an unreachable store is a reason, not a crash
        return LpipsStatus(False, f"cannot check the {lp.net} backbone weights {uri}: {exc}", lp.net, uri)
    if not exists:
        return LpipsStatus(False, f"the ImageNet {lp.net} backbone weights LPIPS needs are not at {uri}: {how}",
                           lp.net, uri)
    try:
        data = storage.read_bytes(uri)
        digest = hashlib.sha256(data).hexdigest()
        build_lpips(lp.net, data, uri)
    except Exception as exc:  # noqa: BLE001
        return LpipsStatus(False, f"the {lp.net} backbone weights at {uri} do not load: {exc}", lp.net, uri)
    imagenet = digest.startswith(prefix)
    note = (f"LPIPS v0.1 ({lp.net}; linear layers shipped in the lpips package; backbone {uri})" if imagenet else
            f"LPIPS computed with backbone weights {uri} (sha256 {digest[:12]}…) that are NOT torchvision's ImageNet "
            f"{lp.net} ({file_name}): values are not comparable with published LPIPS")
    return LpipsStatus(True, note, lp.net, uri, digest, imagenet)


def build_lpips(net: str, backbone_bytes: bytes, source: str = "<backbone>"):
    """LPIPS v0.1 with the package's linear layers and the given torchvision backbone state dict (CPU, eval).

    Only the ``features.*`` tensors of the torchvision file are used (a file holding just those is enough).

    Raises:
        ValueError: the file lacks backbone tensors or their shapes differ.
    """
    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation inside lpips
        import lpips

        model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    state = torch.load(io.BytesIO(backbone_bytes), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    wanted = {name: re.sub(r"^slice\d+\.", "features.", name) for name in model.net.state_dict()}
    missing = sorted(src for src in wanted.values() if src not in state)
    if missing:
        raise ValueError(f"{source}: not a torchvision {net} state dict (missing {', '.join(missing[:4])})")
    model.net.load_state_dict({name: state[src] for name, src in wanted.items()}, strict=True)
    return model.eval().requires_grad_(False)


class LpipsScorer:
    """LPIPS distance (lower is closer) of two images, as the lpips package computes it."""

    def __init__(self, status: LpipsStatus, storage: Storage):
        self.model = build_lpips(status.net, storage.read_bytes(status.backbone), status.backbone)

    def __call__(self, image: np.ndarray, reference: np.ndarray, crop_border: int = 0) -> float:
        """Args: (H, W, C) float in [0, 1], C in {1, 3} (gray is replicated to RGB); same shapes."""
        import torch

        if crop_border:
            image = image[crop_border:-crop_border, crop_border:-crop_border]
            reference = reference[crop_border:-crop_border, crop_border:-crop_border]

        def tensor(x: np.ndarray) -> torch.Tensor:
            x = np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x
            return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))[None] * 2 - 1

        with torch.inference_mode():
            return float(self.model(tensor(image), tensor(reference)).item())
