"""A trained model on the store: ``model.pth`` (BasicSR layout) with ``meta.json`` beside it.

``meta.json`` says which family and architecture to build (written by the training export), so an
inference replica can rebuild the network without the training config.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from torch import nn

from medsr_dist.config import MedsrConfig, StorageConfig
from medsr_dist.storage import Storage


@dataclass(frozen=True)
class ModelFile:
    uri: str
    name: str
    sha256: str
    family: str
    scale: int
    generator: dict

    def build(self, storage: Storage) -> nn.Module:
        """The inference network (EMA weights when present), on CPU, in eval mode."""
        from medsr_dist.models.weights import load_state_dict_bytes

        cfg = MedsrConfig.model_validate({"model": {"family": self.family, "scale": self.scale, "generator": self.generator}})
        if self.family != "realesrgan":  # pragma: no cover - one family so far
            raise ValueError(f"{self.uri}: no inference network for family {self.family!r}")
        from medsr_dist.models.realesrgan import build_generator

        net = build_generator(cfg)
        state = load_state_dict_bytes(storage.read_bytes(self.uri), self.uri)
        net.load_state_dict(state, strict=True)
        return net.eval()


def read_model_file(uri: str, storage_cfg: StorageConfig | None = None) -> ModelFile:
    """Describe the model at ``uri`` from its ``meta.json``; the sha256 is computed from the weights' bytes."""
    storage = Storage(storage_cfg)
    if not storage.exists(uri):
        raise FileNotFoundError(f"enhance.checkpoint: model file {uri} does not exist (run `medsr train` first)")
    meta_uri = uri.rsplit("/", 1)[0] + "/meta.json" if "/" in uri else "meta.json"
    if not storage.exists(meta_uri):
        raise FileNotFoundError(f"enhance.checkpoint: {meta_uri} (architecture of {uri}) does not exist")
    meta = json.loads(storage.read_bytes(meta_uri))
    digest = hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    return ModelFile(uri=uri, name=str(meta.get("name", meta.get("run", "model"))), sha256=digest,
                     family=meta["family"], scale=int(meta["scale"]), generator=dict(meta["generator"]))
