"""The contract between the one training loop and a model family.

The loop (``medsr_dist.train.loop``) owns everything distributed and stateful: DDP wrapping,
EMA, schedulers, checkpoints, validation, reporting. A family owns only what is specific to it:
which networks exist, their losses and one optimisation step.

Tensors crossing this boundary: ``batch["lq"]`` (B, 3, h, w) float32 in [0, 1] RGB,
``batch["gt"]`` and ``batch["gt_usm"]`` (B, 3, h*scale, w*scale) float32 in [0, 1] RGB.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from medsr_dist.config import MedsrConfig


@dataclass
class StepContext:
    """What a family's train step gets besides the batch."""

    nets: dict[str, nn.Module]  # possibly DDP-wrapped
    raw_nets: dict[str, nn.Module]  # the same networks unwrapped (for calls that must not sync)
    optimizers: dict[str, torch.optim.Optimizer]
    losses: dict[str, nn.Module]
    iteration: int
    autocast: bool = False  # mixed precision (GPU only)
    scalers: dict[str, torch.amp.GradScaler] = field(default_factory=dict)


class ModelFamily(Protocol):
    name: str
    #: the network whose EMA is kept and exported for inference
    inference_net: str

    def build_networks(self, cfg: MedsrConfig) -> dict[str, nn.Module]:
        """Create the networks (random init or ``model.pretrained_*`` weights)."""

    def build_losses(self, cfg: MedsrConfig, device: torch.device) -> dict[str, nn.Module]:
        """Create the loss modules (on ``device``)."""

    def build_optimizers(self, cfg: MedsrConfig, nets: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        """One optimizer per trained network."""

    def train_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimisation step on ``batch``; returns the step's scalar logs (loss values)."""
