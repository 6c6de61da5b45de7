"""The contract between the one training loop and a model family (protocol v2).

The loop (``medsr_dist.train.loop``) owns everything stateful: EMA, scheduler stepping, checkpoints,
validation, reporting, export. The strategy (``medsr_dist.train.strategy``) owns everything distributed:
wrapping, backward, optimiser steps, gradient scaling, checkpoint state. A family owns only what is specific
to it, and declares it here:

* its networks with their roles (:class:`NetworkRole`: trained or frozen, EMA-tracked or not; any number),
* its losses, optimisers and schedulers,
* one optimisation step, written against ``ctx.strategy`` only (no ``.backward()``/``.step()`` of its own),
* how its export becomes an inference network (:meth:`ModelFamily.inference_module`: one forward here; an
  iterative sampler wrapping several networks for diffusion families), and the export format itself
  (:meth:`ModelFamily.export_payload` / :meth:`ModelFamily.load_export`),
* optional hooks with a default here (:meth:`ModelFamily.meta_from_weights`).

A family registers its object with :func:`medsr_dist.models.registry.register_family`. What a family adds on the
inference side is registered there, in ``medsr_dist.infer`` (models sit below infer): a family whose inference is
not one forward (diffusion) supplies its own engine Backend with
``medsr_dist.infer.registry.register_family_backend``, and a family with several inference networks its own ONNX
export with ``medsr_dist.infer.registry.register_family_exporter`` (the ``ldm`` family:
:mod:`medsr_dist.infer.diffusion_backend`, :mod:`medsr_dist.infer.diffusion_export`).

Tensors crossing this boundary: ``batch["lq"]`` (B, 3, h, w) float32 in [0, 1] RGB,
``batch["gt"]`` and ``batch["gt_usm"]`` (B, 3, h*scale, w*scale) float32 in [0, 1] RGB (``gt_usm`` may be
absent; families then use ``gt``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ContextManager, Protocol

import torch
from torch import nn

from medsr_dist.config import MedsrConfig


@dataclass(frozen=True)
class NetworkRole:
    """How the loop and the strategy treat one network of a family.

    Attributes:
        trained: optimised (wrapped by the strategy, has an optimiser); False: frozen (never wrapped, no grads).
        ema: the loop keeps an fp32 exponential moving average of it (``train.ema_decay``), saved in checkpoints,
            used for validation and export.
    """

    trained: bool = True
    ema: bool = False


class StepStrategy(Protocol):
    """What a family's train step may ask of the distributed strategy (``medsr_dist.train.strategy.Strategy``,
    which satisfies it, owns the rest: setup, checkpoints, barriers). Networks are named as in
    :meth:`ModelFamily.network_roles`."""

    def module(self, name: str) -> nn.Module:
        """The network to run forward (wrapped for distribution when trained; the raw one when frozen)."""

    def raw(self, name: str) -> nn.Module:
        """The unwrapped network (its own attributes and buffers)."""

    def frozen(self, *names: str) -> ContextManager:
        """A context in which ``names`` get no gradients (e.g. the discriminator during the generator's step)."""

    def zero_grad(self, name: str) -> None:
        """Clear the gradients of network ``name``'s optimiser."""

    def backward(self, name: str, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` (a scalar tensor) for network ``name`` (gradient scaling included)."""

    def step(self, name: str) -> None:
        """One optimiser step of network ``name``."""

    def autocast(self) -> ContextManager:
        """The mixed-precision context of the forward passes (a no-op in fp32)."""


@dataclass
class StepContext:
    """What a family's train step gets besides the batch.

    Attributes:
        strategy: the distributed strategy; the step's only way to run, differentiate and update networks
            (``module``/``raw``/``frozen``/``zero_grad``/``backward``/``step``/``autocast``).
        losses: the family's loss modules (from :meth:`ModelFamily.build_losses`, on the strategy's device).
        iteration: 1-based iteration being run.
    """

    strategy: StepStrategy
    losses: dict[str, nn.Module]
    iteration: int = 0


class ModelFamily(Protocol):
    """A model family (see the module docstring). Families subclass this to inherit the optional hooks' defaults.

    Attributes:
        name: the ``model.family`` value it is registered under.
    """

    name: str
    #: the network whose (EMA) weights are exported and used for inference
    inference_net: str
    #: what :meth:`export_payload` writes: ``basicsr`` = a torch file ``{"params", "params_ema"}`` of the inference net
    export_format: str

    def network_roles(self, cfg: MedsrConfig) -> dict[str, NetworkRole]:
        """Every network of the family with its role (the keys of :meth:`build_networks`)."""

    def build_networks(self, cfg: MedsrConfig) -> dict[str, nn.Module]:
        """Create the networks on CPU (random init under the caller's seed, or ``model.pretrained_*`` weights)."""

    def build_losses(self, cfg: MedsrConfig, device: torch.device) -> dict[str, nn.Module]:
        """Create the loss modules (on ``device``)."""

    def build_optimizers(self, cfg: MedsrConfig, nets: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        """One optimiser per trained network, on the raw networks (before the strategy's setup)."""

    def build_schedulers(self, cfg: MedsrConfig, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
        """LR schedulers (``step()`` once per iteration, ``state_dict``/``load_state_dict``), keyed like the optimisers."""

    def train_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimisation step on ``batch``; returns the step's scalar logs (loss values)."""

    def export_meta(self, cfg: MedsrConfig) -> dict:
        """What rebuilds the inference networks later: ``family``, ``scale`` and the architecture (``generator``)."""

    def inference_networks(self, scale: int, architecture: dict) -> dict[str, nn.Module]:
        """Empty inference networks for an export's meta (``scale``, ``generator``), on CPU."""

    def export_payload(self, nets: dict[str, nn.Module], ema: dict[str, nn.Module]) -> dict:
        """The export file's content (plain fp32 CPU tensors) from the raw networks and their EMA copies."""

    def load_export(self, nets: dict[str, nn.Module], data: bytes, source: str) -> None:
        """Load an export's bytes strictly into :meth:`inference_networks` (EMA weights when present)."""

    def inference_module(self, nets: dict[str, nn.Module]) -> nn.Module:
        """The module an inference Backend runs: (B, 3, h, w) in [0, 1] -> (B, 3, h*scale, w*scale), unclamped.
        A single forward of the generator here; an iterative sampler over several networks for diffusion."""

    # ---- optional hooks (defaults here) ----
    def meta_from_weights(self, data: bytes) -> dict:
        """Entries only the trained weights know, added to the final export's meta.json (``data``: the export
        file's bytes); e.g. the vae family's latent scale factor and statistics. Default: none (``{}``).

        Raises:
            WeightsError: ``data`` is not a readable export of this family.
        """
        return {}
