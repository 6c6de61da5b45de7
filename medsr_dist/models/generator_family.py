"""What every single-generator family shares: networks with roles, Adam + MultiStepLR (or cosine annealing:
``train.lr_schedule``), the BasicSR export.

Export format ``basicsr``: a torch file ``{"params": G, "params_ema": EMA of G}`` (plain fp32 CPU tensors, what
Real-ESRGAN's and BasicSR's own inference scripts load) with ``meta.json`` beside it naming the family, the scale
and the generator architecture. Inference is one forward of the generator. A family with several inference
networks or an iterative sampler (diffusion) overrides :meth:`inference_networks`, :meth:`load_export` and
:meth:`inference_module` instead.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medsr_dist.config import MedsrConfig
from medsr_dist.models.archs import build_discriminator, build_generator, generator_from
from medsr_dist.models.base import ModelFamily, NetworkRole
from medsr_dist.models.weights import load_state_dict_bytes, load_state_dict_into
from medsr_dist.models.weights_error import WeightsError


class GeneratorFamily(ModelFamily):
    """Base of the families whose inference network is one generator ``net_g`` (EMA-tracked, exported)."""

    name = "generator"
    inference_net = "net_g"
    export_format = "basicsr"
    #: the family trains a discriminator ``net_d`` too
    has_discriminator = False

    # ---- networks ----
    def network_roles(self, cfg: MedsrConfig) -> dict[str, NetworkRole]:
        roles = {"net_g": NetworkRole(trained=True, ema=True)}
        if self.has_discriminator:
            roles["net_d"] = NetworkRole(trained=True, ema=False)
        return roles

    def build_networks(self, cfg: MedsrConfig) -> dict[str, nn.Module]:
        nets = {"net_g": build_generator(cfg)}
        if self.has_discriminator:
            nets["net_d"] = build_discriminator(cfg)
        if cfg.model.pretrained_g:  # e.g. the export of a psnr run: its params_ema
            load_state_dict_into(nets["net_g"], cfg.model.pretrained_g, storage_cfg=cfg.storage)
        if self.has_discriminator and getattr(cfg.model, "pretrained_d", None):
            load_state_dict_into(nets["net_d"], cfg.model.pretrained_d, storage_cfg=cfg.storage)
        return nets

    # ---- optimisation ----
    def build_optimizers(self, cfg: MedsrConfig, nets: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        t = cfg.train
        lr = {"net_g": t.lr_g, "net_d": t.lr_d}
        return {k: torch.optim.Adam(nets[k].parameters(), lr=lr[k], betas=t.betas)
                for k, role in self.network_roles(cfg).items() if role.trained}

    def build_schedulers(self, cfg: MedsrConfig, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
        t = cfg.train
        if t.lr_schedule == "cosine":
            return {k: torch.optim.lr_scheduler.CosineAnnealingLR(
                o, T_max=t.iterations, eta_min=o.param_groups[0]["lr"] * t.lr_min_ratio) for k, o in optimizers.items()}
        return {k: torch.optim.lr_scheduler.MultiStepLR(o, milestones=t.milestones, gamma=t.lr_gamma)
                for k, o in optimizers.items()}

    # ---- export and inference ----
    def export_meta(self, cfg: MedsrConfig) -> dict:
        return {"family": self.name, "export_format": self.export_format, "scale": cfg.model.scale,
                "generator": cfg.model.generator.model_dump(mode="json")}

    def inference_networks(self, scale: int, architecture: dict) -> dict[str, nn.Module]:
        return {"net_g": generator_from(architecture, scale)}

    def export_payload(self, nets: dict[str, nn.Module], ema: dict[str, nn.Module]) -> dict:
        payload = {"params": {k: v.detach().float().cpu() for k, v in nets["net_g"].state_dict().items()}}
        if "net_g" in ema:
            payload["params_ema"] = {k: v.detach().float().cpu() for k, v in ema["net_g"].state_dict().items()}
        return payload

    def load_export(self, nets: dict[str, nn.Module], data: bytes, source: str) -> None:
        state = load_state_dict_bytes(data, source)  # params_ema when present
        try:
            nets["net_g"].load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{source} does not fit {type(nets['net_g']).__name__}: {exc}") from None

    def inference_module(self, nets: dict[str, nn.Module]) -> nn.Module:
        return nets["net_g"]
