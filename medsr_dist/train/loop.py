"""The one training loop (``train_loop_per_worker``) shared by every model family and every strategy.

Ray Train runs this function on every worker. The family builds its networks, optimisers and schedulers; the
strategy (``train.strategy``: DDP or DeepSpeed) takes them over; the latest checkpoint is restored through the
strategy if there is one; then the loop iterates the worker's shard of the training stream:
family step (through the strategy) -> schedulers -> EMA of every EMA-tracked network -> (validation through
the family's inference module) -> report (+ checkpoint: every rank saves through the strategy, rank 0 also
writes the export ``model.pth`` + ``meta.json``).
The data arriving here is already degraded by the Ray Data actors; this loop only optimises.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time

import numpy as np
import torch
from torch import nn

from medsr_dist.config import MedsrConfig
from medsr_dist.eval.metrics import bicubic_upscale, psnr, ssim
from medsr_dist.infer.consistency import consistency_psnr
from medsr_dist.models.base import StepContext
from medsr_dist.models.registry import load_family
from medsr_dist.storage import Storage
from medsr_dist.train.guard import COLLAPSE_FILE, CollapseWatch, validation_record
from medsr_dist.train.strategy import STATE_FILE, make_strategy  # noqa: F401  (STATE_FILE: DDP's checkpoint file)

log = logging.getLogger(__name__)

MODEL_FILE = "model.pth"
META_FILE = "meta.json"


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """BasicSR's model_ema: ema = decay * ema + (1 - decay) * net, over parameters; buffers are copied."""
    net_params = dict(net.named_parameters())
    for name, p in ema.named_parameters():
        p.mul_(decay).add_(net_params[name].detach().to(p.dtype), alpha=1 - decay)
    net_buffers = dict(net.named_buffers())
    for name, b in ema.named_buffers():
        b.copy_(net_buffers[name])


def model_meta(cfg: MedsrConfig, iteration: int) -> dict:
    """What an inference engine needs to rebuild the exported network (kept beside every model file)."""
    family = load_family(cfg.model.family)
    return {**family.export_meta(cfg), "iteration": iteration, "run": cfg.run.name}


def write_export(path: str, cfg: MedsrConfig, iteration: int, family, nets: dict[str, nn.Module],
                 ema: dict[str, nn.Module], validation: dict | None = None) -> None:
    """``model.pth`` (the family's export payload: plain fp32, the same for every strategy) + ``meta.json`` in ``path``;
    ``validation``: the latest validation's record (:func:`~medsr_dist.train.guard.validation_record`)."""
    torch.save(family.export_payload(nets, ema), os.path.join(path, MODEL_FILE))
    meta = model_meta(cfg, iteration)
    if validation:
        meta["validation"] = validation
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def best_export_uri(cfg: MedsrConfig) -> str:
    """Where ``train.export_best`` keeps the export of the best validation PSNR: ``<train.output>/export/best/``."""
    return Storage.join(cfg.train.output, "export", "best")


def write_best_export(cfg: MedsrConfig, iteration: int, family, nets: dict[str, nn.Module], ema: dict[str, nn.Module],
                      validation: dict) -> None:
    """The export (weights + meta with its sha256 and validation) of a new best validation PSNR, to
    :func:`best_export_uri` (rank 0, at validation)."""
    storage = Storage(cfg.storage)
    buf = io.BytesIO()
    torch.save(family.export_payload(nets, ema), buf)
    data = buf.getvalue()
    meta = {**model_meta(cfg, iteration), **family.meta_from_weights(data), "validation": validation,
            "sha256": hashlib.sha256(data).hexdigest(), "name": f"{cfg.run.name}@{iteration}-best"}
    folder = best_export_uri(cfg)
    storage.write_bytes(storage.join(folder, MODEL_FILE), data)
    storage.write_bytes(storage.join(folder, META_FILE), json.dumps(meta, indent=2).encode())


def best_validation_psnr(cfg: MedsrConfig) -> float:
    """The validation PSNR of the best export so far (-inf: none), so a resumed run keeps a better earlier one."""
    storage = Storage(cfg.storage)
    uri = storage.join(best_export_uri(cfg), META_FILE)
    try:
        return float(json.loads(storage.read_bytes(uri))["validation"]["val_psnr"]) if storage.exists(uri) else -np.inf
    except (ValueError, KeyError, TypeError):
        return -np.inf


def _to_device_batch(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else torch.as_tensor(v, device=device))
            for k, v in batch.items()}


#: dB an exact output scores in validation (PSNR is infinite there): a finite mean the guard and best export can use
PSNR_CAP = 100.0


@torch.no_grad()
def validate(net: nn.Module, pairs: list[dict], device: torch.device, scale: int) -> dict[str, float]:
    """Mean PSNR/SSIM (RGB, crop border = scale) of ``net`` (a family's inference module) on fixed pairs; also of
    bicubic, for reference; and what the collapse guard watches (:mod:`medsr_dist.train.guard`): the outputs' and
    ground truths' mean standard deviation, the outputs' mean consistency score. NaN outputs give NaN metrics.

    A pair whose ground truth is uniform inside the crop border (e.g. a crop of an ultrasound's black background)
    has no detail to score and is left out of the PSNR/SSIM means: bicubic reproduces it exactly, and its infinite
    PSNR made the mean infinite, which the guard read as a collapse (a real fine-tune was stopped so). An exact
    output elsewhere (a scale-1 identity) scores :data:`PSNR_CAP` dB, as the consistency score does."""
    was_training = net.training
    net.eval()
    psnrs, ssims, psnrs_bic, stds, gt_stds, consistency = [], [], [], [], [], []
    for pair in pairs:
        lq = torch.from_numpy(pair["lq"]).unsqueeze(0).to(device)
        raw = net(lq).float()[0].permute(1, 2, 0).cpu().numpy()
        out = np.clip(raw, 0, 1)  # NaN stays NaN (torch's clamp too), so a diverged net is seen as one
        gt = pair["gt"].transpose(1, 2, 0)
        finite = bool(np.isfinite(out).all())
        inner = gt[scale:-scale, scale:-scale] if scale and min(gt.shape[:2]) > 2 * scale else gt
        if float(np.ptp(inner)) > 0:  # uniform ground truth: nothing to score (docstring)
            bic = np.clip(bicubic_upscale(pair["lq"].transpose(1, 2, 0), scale), 0, 1)
            psnrs.append(psnr(out, gt, crop_border=scale) if finite else np.nan)
            ssims.append(ssim(out, gt, crop_border=scale) if finite else np.nan)
            psnrs_bic.append(psnr(bic, gt, crop_border=scale))
        stds.append(float(out.std()))
        gt_stds.append(float(gt.std()))
        consistency.append(consistency_psnr(out, pair["lq"].transpose(1, 2, 0)) if finite else np.nan)
    net.train(was_training)

    def capped_mean(values: list[float]) -> float:  # NaN stays NaN; no scorable pair: NaN
        return float(np.mean(np.minimum(values, PSNR_CAP))) if values else math.nan

    return {"val_psnr": capped_mean(psnrs), "val_ssim": float(np.mean(ssims)) if ssims else math.nan,
            "val_psnr_bicubic": capped_mean(psnrs_bic), "val_output_std": float(np.mean(stds)),
            "val_gt_std": float(np.mean(gt_stds)), "val_consistency_db": capped_mean(consistency)}


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on rank 0 (broadcast, so every rank takes the same branch)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    tensor = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.broadcast(tensor, src=0)
    return bool(tensor.item())


def build_training(cfg: MedsrConfig, device: torch.device, *, distributed: bool = True):
    """Family + strategy set up for training, as every worker does it (also used by tests and benchmarks).

    Returns ``(family, strategy, ema, schedulers, losses)``; ``ema`` maps each EMA-tracked network's name to its
    fp32 copy on ``device`` (kept by the loop, outside any engine).
    """
    family = load_family(cfg.model.family)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    nets = family.build_networks(cfg)
    roles = family.network_roles(cfg)
    ema = {k: copy.deepcopy(nets[k]).float().requires_grad_(False) for k, r in roles.items() if r.ema}
    optimizers = family.build_optimizers(cfg, nets)
    schedulers = family.build_schedulers(cfg, optimizers)
    strategy = make_strategy(cfg, device, distributed=distributed)
    strategy.setup(nets, [k for k, r in roles.items() if r.trained], optimizers, schedulers)
    for e in ema.values():
        e.to(device).eval()
    return family, strategy, ema, schedulers, family.build_losses(cfg, device)


def client_state(iteration: int, ema: dict[str, nn.Module], schedulers: dict) -> dict:
    """What the loop adds to a strategy checkpoint: iteration, fp32 EMA weights, scheduler states, torch RNG."""
    return {"iteration": iteration, "ema": {k: v.state_dict() for k, v in ema.items()},
            "schedulers": {k: v.state_dict() for k, v in schedulers.items()}, "torch_rng": torch.get_rng_state()}


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    cfg = MedsrConfig.model_validate(config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()

    family, strategy, ema, schedulers, losses = build_training(cfg, device)
    start_iteration = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = strategy.load(d)
        for k, e in ema.items():
            e.load_state_dict(state["ema"][k])
        for k, sch in schedulers.items():
            sch.load_state_dict(state["schedulers"][k])
        start_iteration = int(state["iteration"])
        torch.set_rng_state(state["torch_rng"])
        del state
        log.info("rank %d: resumed from iteration %d", rank, start_iteration)
    step_ctx = StepContext(strategy=strategy, losses=losses, iteration=start_iteration)

    val_pairs = config.get("val_pairs")
    if val_pairs is not None and not isinstance(val_pairs, list):  # an ObjectRef from the driver
        val_pairs = ray.get(val_pairs) if rank == 0 else []
    val_pairs = val_pairs or []

    watch = CollapseWatch(cfg)
    last_validation: dict | None = None
    best_psnr = best_validation_psnr(cfg) if rank == 0 and t.export_best and val_pairs else -np.inf
    collapsed = ""
    shard = ray.train.get_dataset_shard("train")
    iteration = start_iteration
    wait_s = step_s = first_batch_s = 0.0
    t_prev = time.perf_counter()
    cpu0 = time.process_time()  # this worker's CPU seconds (all its threads): the budget on a shared machine
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
        for sch in schedulers.values():
            sch.step()
        for k, e in ema.items():
            ema_update(e, strategy.raw(k), t.ema_decay)
        t_prev = time.perf_counter()
        step_s += t_prev - t_data

        steps = iteration - start_iteration
        metrics = {"iteration": iteration, "resumed_from": start_iteration, **logs,
                   "data_wait_fraction": wait_s / max(wait_s + step_s, 1e-9), "step_seconds": step_s / steps,
                   "first_batch_seconds": first_batch_s, "worker_cpu_seconds": time.process_time() - cpu0, "lr_g": strategy.optimizer(family.inference_net).param_groups[0]["lr"]}
        last = iteration == t.iterations
        validating = iteration % t.val_every == 0 or last
        if rank == 0 and val_pairs and validating:
            inference = family.inference_module({k: ema.get(k, strategy.raw(k)) for k in family.network_roles(cfg)})
            metrics.update(validate(inference, val_pairs, device, cfg.model.scale))
            last_validation = validation_record(metrics, iteration)
            collapsed = watch.update(metrics, iteration) or ""
            # a validation the guard finds collapsed is never the best one, even before patience runs out
            if not watch.reasons and t.export_best and metrics["val_psnr"] > best_psnr:
                best_psnr = metrics["val_psnr"]
                write_best_export(cfg, iteration, family, {k: strategy.raw(k) for k in family.network_roles(cfg)}, ema,
                                  last_validation)
        if validating and watch.enabled and _any_rank(bool(collapsed), device):
            # every rank stops at the same iteration; the last good checkpoint stays the run's latest
            if rank == 0:
                storage = Storage(cfg.storage)
                storage.write_bytes(storage.join(t.output, cfg.run.name, COLLAPSE_FILE),
                                    json.dumps({"iteration": iteration, "message": collapsed, **metrics}).encode())
                log.error("%s", collapsed)
            collapsed = collapsed or "collapsed (rank 0)"
            break
        if iteration % t.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as d:
                wrote = strategy.save(d, client_state(iteration, ema, schedulers))
                if rank == 0:
                    write_export(d, cfg, iteration, family, {k: strategy.raw(k) for k in family.network_roles(cfg)}, ema,
                                 last_validation)
                strategy.barrier()
                # Ray Train merges the files of every rank's reported checkpoint into one checkpoint folder
                ckpt = ray.train.Checkpoint.from_directory(d) if (wrote or rank == 0) else None
                ray.train.report(metrics, checkpoint=ckpt)
        elif iteration % t.log_every == 0 or iteration % t.val_every == 0:  # the same iterations on every rank
            ray.train.report(metrics)
    if iteration < t.iterations and not collapsed:
        raise RuntimeError(
            f"training stream ended at iteration {iteration} of {t.iterations}: the degraded stream was too short"
        )
