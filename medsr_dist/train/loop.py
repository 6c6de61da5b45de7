"""The one training loop (``train_loop_per_worker``) shared by every model family.

Ray Train runs this function on every worker. It builds the family's networks, wraps them for DDP,
restores the latest checkpoint if there is one, then iterates the worker's shard of the degraded
training stream: family step -> schedulers -> EMA -> (validation) -> report (+ checkpoint on rank 0).
The data arriving here is already degraded by the Ray Data actors; this loop only optimises.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time

import numpy as np
import torch
from torch import nn

from medsr_dist.config import MedsrConfig
from medsr_dist.models.base import StepContext
from medsr_dist.models.registry import load_family
from medsr_dist.models.weights import save_basicsr_checkpoint

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MODEL_FILE = "model.pth"
META_FILE = "meta.json"


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """BasicSR's model_ema: ema = decay * ema + (1 - decay) * net, over parameters; buffers are copied."""
    net_params = dict(net.named_parameters())
    for name, p in ema.named_parameters():
        p.mul_(decay).add_(net_params[name].detach(), alpha=1 - decay)
    net_buffers = dict(net.named_buffers())
    for name, b in ema.named_buffers():
        b.copy_(net_buffers[name])


def model_meta(cfg: MedsrConfig, iteration: int) -> dict:
    """What an inference engine needs to rebuild the exported network (kept beside every model file)."""
    return {
        "family": cfg.model.family,
        "scale": cfg.model.scale,
        "generator": cfg.model.generator.model_dump(mode="json"),
        "iteration": iteration,
        "run": cfg.run.name,
    }


def save_checkpoint_dir(path: str, cfg: MedsrConfig, iteration: int, raw_nets, ema, optimizers, schedulers) -> None:
    """Full training state (``state.pt``) + an inference export (``model.pth``: params + params_ema) + meta."""
    family = load_family(cfg.model.family)
    state = {
        "iteration": iteration,
        "nets": {k: v.state_dict() for k, v in raw_nets.items()},
        "ema": ema.state_dict(),
        "optimizers": {k: v.state_dict() for k, v in optimizers.items()},
        "schedulers": {k: v.state_dict() for k, v in schedulers.items()},
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, os.path.join(path, STATE_FILE))
    save_basicsr_checkpoint(raw_nets[family.inference_net], os.path.join(path, MODEL_FILE), ema=ema)
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(model_meta(cfg, iteration), f, indent=2)


def _to_device_batch(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else torch.as_tensor(v, device=device))
            for k, v in batch.items()}


@torch.no_grad()
def validate(net: nn.Module, pairs: list[dict], device: torch.device, scale: int) -> dict[str, float]:
    """Mean PSNR/SSIM (RGB, crop border = scale) of ``net`` on fixed degraded pairs; also of bicubic, for reference."""
    from medsr_dist.eval.metrics import bicubic_upscale, psnr, ssim

    net.eval()
    psnrs, ssims, psnrs_bic = [], [], []
    for pair in pairs:
        lq = torch.from_numpy(pair["lq"]).unsqueeze(0).to(device)
        out = net(lq).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
        gt = pair["gt"].transpose(1, 2, 0)
        bic = np.clip(bicubic_upscale(pair["lq"].transpose(1, 2, 0), scale), 0, 1)
        psnrs.append(psnr(out, gt, crop_border=scale))
        ssims.append(ssim(out, gt, crop_border=scale))
        psnrs_bic.append(psnr(bic, gt, crop_border=scale))
    net.train()
    return {"val_psnr": float(np.mean(psnrs)), "val_ssim": float(np.mean(ssims)), "val_psnr_bicubic": float(np.mean(psnrs_bic))}


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    cfg = MedsrConfig.model_validate(config["cfg"])
    t = cfg.train
    family = load_family(cfg.model.family)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    raw_nets = family.build_networks(cfg)
    ema = copy.deepcopy(raw_nets[family.inference_net]).requires_grad_(False)
    start_iteration = 0
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        for k, net in raw_nets.items():
            net.load_state_dict(state["nets"][k])
        ema.load_state_dict(state["ema"])
        start_iteration = int(state["iteration"])
        torch.set_rng_state(state["torch_rng"])
        log.info("rank %d: resumed from iteration %d", rank, start_iteration)
    for net in raw_nets.values():
        net.to(device).train()
    ema.to(device).eval()
    optimizers = family.build_optimizers(cfg, raw_nets)
    schedulers = {k: torch.optim.lr_scheduler.MultiStepLR(o, milestones=t.milestones, gamma=t.lr_gamma)
                  for k, o in optimizers.items()}
    if state is not None:
        for k, o in optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        del state
    nets = {k: ray.train.torch.prepare_model(v, move_to_device=False) for k, v in raw_nets.items()}
    use_amp = t.mixed_precision and device.type == "cuda"
    step_ctx = StepContext(
        nets=nets, raw_nets=raw_nets, optimizers=optimizers, losses=family.build_losses(cfg, device),
        iteration=start_iteration, autocast=use_amp,
        scalers={k: torch.amp.GradScaler("cuda") for k in optimizers} if use_amp else {},
    )

    val_pairs = config.get("val_pairs")
    if val_pairs is not None and not isinstance(val_pairs, list):  # an ObjectRef from the driver
        val_pairs = ray.get(val_pairs) if rank == 0 else []
    val_pairs = val_pairs or []

    shard = ray.train.get_dataset_shard("train")
    iteration = start_iteration
    wait_s = step_s = first_batch_s = 0.0
    t_prev = time.perf_counter()
    batches = shard.iter_torch_batches(
        batch_size=t.batch_size, drop_last=True, local_shuffle_buffer_size=cfg.degradation.shuffle_buffer or None,
        local_shuffle_seed=cfg.run.seed + rank if cfg.degradation.shuffle_buffer else None,
    )
    for batch in batches:
        if iteration >= t.iterations:
            break
        t_data = time.perf_counter()
        if iteration == start_iteration:
            first_batch_s = t_data - t_prev  # pipeline start-up, kept out of the steady-state wait fraction
        else:
            wait_s += t_data - t_prev
        iteration += 1
        step_ctx.iteration = iteration
        logs = family.train_step(step_ctx, _to_device_batch(batch, device))
        for s in schedulers.values():
            s.step()
        ema_update(ema, raw_nets[family.inference_net], t.ema_decay)
        t_prev = time.perf_counter()
        step_s += t_prev - t_data

        steps = iteration - start_iteration
        metrics = {"iteration": iteration, "resumed_from": start_iteration, **logs,
                   "data_wait_fraction": wait_s / max(wait_s + step_s, 1e-9), "step_seconds": step_s / steps,
                   "first_batch_seconds": first_batch_s, "lr_g": optimizers[family.inference_net].param_groups[0]["lr"]}
        last = iteration == t.iterations
        if rank == 0 and val_pairs and (iteration % t.val_every == 0 or last):
            metrics.update(validate(ema, val_pairs, device, cfg.model.scale))
        if iteration % t.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as d:
                ckpt = None
                if rank == 0:
                    save_checkpoint_dir(d, cfg, iteration, raw_nets, ema, optimizers, schedulers)
                    ckpt = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=ckpt)
        elif iteration % t.log_every == 0 or iteration % t.val_every == 0:  # the same iterations on every rank
            ray.train.report(metrics)
    if iteration < t.iterations:
        raise RuntimeError(
            f"training stream ended at iteration {iteration} of {t.iterations}: the degraded stream was too short"
        )
