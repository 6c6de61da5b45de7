"""Loading and saving network weights safely.

Checkpoints are read with ``torch.load(weights_only=True)`` (or safetensors): never by unpickling
arbitrary objects. BasicSR's layout is understood: a dict holding ``params_ema`` and/or ``params``.
A weights *source* is a model-zoo name (:mod:`medsr_dist.models.zoo`, e.g. ``RealESRGAN_x4plus``), a local
path, a ``file://`` URI or a store URI (``s3://bucket/key``); :func:`resolve_weights` turns any of them into bytes.
"""
from __future__ import annotations

import io
import os

import torch
from torch import nn

from safetensors.torch import load as load_safetensors

from medsr_dist.config import StorageConfig
from medsr_dist.models import zoo
from medsr_dist.models.weights_error import WeightsError
from medsr_dist.storage import Storage, StorageError


def read_weights_bytes(source: str, storage_cfg: StorageConfig | None = None) -> bytes:
    """The bytes of a path or store URI (no zoo lookup; see :func:`resolve_weights`)."""
    return Storage(storage_cfg).read_bytes(source)


def resolve_weights(source: str, storage_cfg: StorageConfig | None = None, *, allow_unverified: bool = False) -> bytes:
    """The checkpoint bytes for a zoo name, path or URI.

    A zoo name is served from the local weights cache, downloaded and sha256-checked on first use (see
    :func:`medsr_dist.models.zoo.fetch`; ``allow_unverified`` is passed on). Anything else is read through
    :class:`~medsr_dist.storage.Storage`.

    Raises:
        WeightsError: the file does not exist or cannot be read (zoo subclasses: download/checksum failures).
    """
    if zoo.is_zoo_name(source):
        with open(zoo.fetch(source, allow_unverified=allow_unverified), "rb") as f:
            return f.read()
    try:
        return read_weights_bytes(source, storage_cfg)
    except StorageError as exc:
        raise WeightsError(f"{exc} (not a model zoo name either; known names: {', '.join(zoo.ZOO)})") from None


def load_state_dict_bytes(data: bytes, source: str, key: str | None = None) -> dict[str, torch.Tensor]:
    """Parse a checkpoint and pick its state dict: ``key`` if given, else ``params_ema``, ``params``, or the top level."""
    if source.endswith(".safetensors"):
        state = load_safetensors(data)
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for bad/unsafe files
            raise WeightsError(f"{source}: not a loadable weights-only checkpoint ({exc})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{source}: expected a dict of tensors, got {type(state).__name__}")
    if key is not None:
        if key not in state:
            raise WeightsError(f"{source}: no key {key!r} (has: {', '.join(map(str, state))})")
        state = state[key]
    else:
        for candidate in ("params_ema", "params"):
            if candidate in state and isinstance(state[candidate], dict):
                state = state[candidate]
                break
    # DDP-saved checkpoints prefix every key with 'module.'
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_dict_into(
    net: nn.Module,
    source: str,
    storage_cfg: StorageConfig | None = None,
    key: str | None = None,
    *,
    allow_unverified: bool = False,
) -> None:
    """Strictly load ``source`` (zoo name, path or URI, see :func:`resolve_weights`) into ``net``.

    Raises:
        WeightsError: unreadable/unsafe file, or keys/shapes that do not fit (lists missing and unexpected keys).
    """
    state = load_state_dict_bytes(resolve_weights(source, storage_cfg, allow_unverified=allow_unverified), source, key)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs network {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise WeightsError(
            f"{source} does not fit {type(net).__name__}: missing keys {missing or 'none'}; "
            f"unexpected keys {unexpected or 'none'}" + (f"; shape mismatches {shapes}" if shapes else "")
        )
    net.load_state_dict(state, strict=True)


def save_basicsr_checkpoint(net: nn.Module, path: str, ema: nn.Module | None = None) -> bytes:
    """Serialise as BasicSR/Real-ESRGAN do (``params`` and, when given, ``params_ema``); returns the bytes."""
    payload = {"params": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
    if ema is not None:
        payload["params_ema"] = {k: v.detach().cpu() for k, v in ema.state_dict().items()}
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return data
