"""Model families known to medsr-dist, described without importing torch.

A family is one module implementing :class:`medsr_dist.models.base.ModelFamily`. The config
validates a run against the lightweight facts here (scales an architecture supports) before any
Ray or torch work starts; the training loop and the inference engine import the module itself.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyInfo:
    name: str
    module: str
    scales: tuple[int, ...]
    description: str


FAMILIES: dict[str, FamilyInfo] = {
    "realesrgan": FamilyInfo(
        name="realesrgan",
        module="medsr_dist.models.realesrgan",
        # basicsr RRDBNet: x4 upsampling, with pixel-unshuffle by 2 (x2) or 4 (x1) in front.
        scales=(1, 2, 4),
        description="Real-ESRGAN: RRDBNet generator + U-Net discriminator with spectral norm",
    ),
}


def family_info(name: str) -> FamilyInfo:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(sorted(FAMILIES))})") from None


def load_family(name: str):
    """Import and return the family object (a :class:`ModelFamily`) registered under ``name``."""
    module = importlib.import_module(family_info(name).module)
    return module.FAMILY
