"""Distributed strategies: the mechanics a model family must not see.

A :class:`Strategy` takes a family's networks over (move to the device, wrap the trained ones), and does
backward, optimiser step, no-sync, unwrap, gradient scaling and checkpoint state for them. The one training
loop (:mod:`medsr_dist.train.loop`) and the families talk to it only through this protocol, so DDP and
DeepSpeed (``medsr_dist.train.deepspeed_strategy``) are interchangeable plug-ins chosen by ``train.strategy``.

The contract with the DeepSpeed strategy is written down in the ``Strategy`` docstrings below.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, ContextManager, Protocol

import torch
from torch import nn

from medsr_dist.train.deepspeed_strategy import DeepSpeedStrategy

STATE_FILE = "state.pt"


class Strategy(Protocol):
    """Owns the distributed mechanics a family must not see (wrap, backward, step, no-sync, unwrap, state, scaling)."""

    name: str  # "ddp" | "deepspeed"
    device: torch.device

    def setup(self, nets: dict[str, nn.Module], trained: list[str],
              optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any]) -> None:
        """Take the family's networks over: move every net to ``self.device``; wrap the *trained* ones (DDP /
        DeepSpeed engine, one per trained net). Frozen nets are never wrapped and get no grads. Optimisers and
        schedulers are built by the family on the raw nets BEFORE setup; afterwards ``optimizer(name)`` is what
        steps and what the schedulers act on (scheduler lr changes take effect)."""

    def module(self, name: str) -> nn.Module:
        """What a training forward calls (the wrapper for trained nets, the raw net for frozen ones)."""

    def raw(self, name: str) -> nn.Module:
        """The unwrapped network: EMA source, validation, export, and calls that must not synchronise."""

    def optimizer(self, name: str) -> torch.optim.Optimizer: ...

    def frozen(self, *names: str) -> ContextManager:
        """Inside: every parameter of these nets has ``requires_grad`` False; the previous flags are restored after."""

    def zero_grad(self, name: str) -> None: ...

    def backward(self, name: str, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` for net ``name``; may be called several times before :meth:`step` (they add up)."""

    def step(self, name: str) -> None:
        """Optimiser step of net ``name`` (+ grad-scaler update). The loop steps the schedulers."""

    def autocast(self) -> ContextManager:
        """Forward-pass mixed precision (a no-op when off or on CPU)."""

    def no_sync(self, name: str) -> ContextManager:
        """Gradient accumulation without all-reduce."""

    def save(self, directory: str, client_state: dict) -> bool:
        """Every rank calls it with its own local directory; nets + optimiser states (+ scaler) are written there
        with ``client_state``. True when this rank wrote files that must go into the reported checkpoint."""

    def load(self, directory: str) -> dict:
        """Restore nets + optimiser states from a directory made by :meth:`save`; returns the client_state."""

    def barrier(self) -> None: ...


class DDPStrategy:
    """PyTorch DDP through Ray Train (``ray.train.torch.prepare_model``) or, with ``distributed=False``, one
    process and no wrapping (unit tests, benchmarks). A GradScaler per trained net when AMP runs on a GPU.

    Checkpoint: rank 0 writes ``state.pt`` = ``{"nets": raw state dicts, "optimizers", "scalers", **client_state}``.
    """

    name = "ddp"

    def __init__(self, device: torch.device | str = "cpu", *, mixed_precision: bool = False, distributed: bool = True,
                 wrap: Callable[[nn.Module], nn.Module] | None = None):
        self.device = torch.device(device)
        self.use_amp = bool(mixed_precision) and self.device.type == "cuda"
        self.distributed = distributed
        self._wrap = wrap
        self._raw: dict[str, nn.Module] = {}
        self._wrapped: dict[str, nn.Module] = {}
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._scalers: dict[str, torch.amp.GradScaler] = {}
        self.trained: list[str] = []

    # ---- setup and access ----
    def setup(self, nets, trained, optimizers, schedulers) -> None:
        unknown = [n for n in trained if n not in nets]
        if unknown:
            raise ValueError(f"trained networks {unknown} are not among the family's networks {sorted(nets)}")
        self.trained = list(trained)
        self._optimizers = dict(optimizers)
        wrap = self._wrap
        if wrap is None and self.distributed:
            import ray.train.torch

            wrap = lambda m: ray.train.torch.prepare_model(m, move_to_device=False)  # noqa: E731
        for name, net in nets.items():
            net.to(self.device)
            self._raw[name] = net
            if name in self.trained:
                net.train()
                self._wrapped[name] = wrap(net) if wrap is not None else net
            else:
                net.eval().requires_grad_(False)
                self._wrapped[name] = net
        if self.use_amp:
            self._scalers = {k: torch.amp.GradScaler("cuda") for k in self._optimizers}

    def module(self, name: str) -> nn.Module:
        return self._wrapped[name]

    def raw(self, name: str) -> nn.Module:
        return self._raw[name]

    def optimizer(self, name: str) -> torch.optim.Optimizer:
        return self._optimizers[name]

    @property
    def names(self) -> list[str]:
        return list(self._raw)

    # ---- optimisation ----
    @contextlib.contextmanager
    def frozen(self, *names: str):
        params = [p for n in names for p in self._raw[n].parameters()]
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(False)
            yield
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)

    def zero_grad(self, name: str) -> None:
        self._optimizers[name].zero_grad(set_to_none=True)

    def backward(self, name: str, loss: torch.Tensor) -> None:
        scaler = self._scalers.get(name)
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def step(self, name: str) -> None:
        scaler, opt = self._scalers.get(name), self._optimizers[name]
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    def autocast(self):
        return torch.autocast(device_type=self.device.type, enabled=self.use_amp)

    def no_sync(self, name: str):
        wrapped = self._wrapped[name]
        return wrapped.no_sync() if hasattr(wrapped, "no_sync") else contextlib.nullcontext()

    # ---- state ----
    def _rank(self) -> int:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return 0

    def save(self, directory: str, client_state: dict) -> bool:
        if self._rank() != 0:
            return False
        state = {
            "nets": {k: v.state_dict() for k, v in self._raw.items()},
            "optimizers": {k: v.state_dict() for k, v in self._optimizers.items()},
            "scalers": {k: v.state_dict() for k, v in self._scalers.items()},
            **client_state,
        }
        torch.save(state, os.path.join(directory, STATE_FILE))
        return True

    def load(self, directory: str) -> dict:
        state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
        for k, net in self._raw.items():
            net.load_state_dict(state["nets"][k])
        for k, opt in self._optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        for k, scaler in self._scalers.items():
            if k in state.get("scalers", {}):
                scaler.load_state_dict(state["scalers"][k])
        return {k: v for k, v in state.items() if k not in ("nets", "optimizers", "scalers")}

    def barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


def make_strategy(cfg, device: torch.device | str, *, distributed: bool = True) -> Strategy:
    """The strategy ``cfg.train.strategy`` names ("ddp" when the key is absent), on ``device``.

    ``distributed=False`` gives the same mechanics in one process without Ray Train (tests, benchmarks).

    Raises:
        ValueError: an unknown strategy name.
    """
    name = getattr(cfg.train, "strategy", "ddp")
    if name == "ddp":
        return DDPStrategy(device, mixed_precision=cfg.train.mixed_precision, distributed=distributed)
    if name == "deepspeed":
        return DeepSpeedStrategy(cfg, device, distributed=distributed)
    raise ValueError(f"train.strategy: unknown strategy {name!r} (known: ddp, deepspeed)")
