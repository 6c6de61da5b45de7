"""Guardrails of a training run: collapse detection at validation, and what an export says about its validation.

A fine-tune on a few images can collapse (uniform grey or black outputs, a known failure in Real-ESRGAN's issue
tracker); :func:`collapse_reasons` names what collapsed from the validation metrics of
:func:`medsr_dist.train.loop.validate`, :class:`CollapseWatch` counts consecutive collapsed validations
(``train.guard.patience``), :func:`validation_record` is what an export's ``meta.json`` records (and says when the
model is below bicubic). Torch-free: the loop computes the numbers.
"""
from __future__ import annotations

import math

from medsr_dist.config import MedsrConfig

#: the file a collapsed run leaves in its run folder (``<train.output>/<run.name>/``); the driver raises from it
COLLAPSE_FILE = "collapsed.json"


class TrainingCollapsed(RuntimeError):
    """A training run stopped because its validation outputs collapsed; the message names what collapsed."""


def guard_enabled(cfg: MedsrConfig) -> bool:
    """``train.guard.enabled``, or (null) whether the generator starts from weights (a fine-tune)."""
    enabled = cfg.train.guard.enabled
    return bool(getattr(cfg.model, "pretrained_g", None)) if enabled is None else enabled


def collapse_reasons(metrics: dict[str, float], cfg: MedsrConfig) -> list[str]:
    """What collapsed in one validation (empty: nothing).

    Args:
        metrics: ``val_psnr``, ``val_psnr_bicubic``, ``val_output_std``, ``val_gt_std``, ``val_consistency_db``.
    """
    g = cfg.train.guard
    names = ("val_psnr", "val_psnr_bicubic", "val_output_std", "val_gt_std", "val_consistency_db")
    bad = [k for k in names if not math.isfinite(metrics.get(k, math.nan)) and not (k == "val_consistency_db"
                                                                                     and metrics.get(k) == math.inf)]
    if bad:
        return [f"outputs are not finite (NaN or infinite {', '.join(bad)})"]
    reasons = []
    std, gt_std = metrics["val_output_std"], metrics["val_gt_std"]
    if std < g.min_output_std_ratio * gt_std:
        reasons.append(f"output variance collapsed: the validation outputs' standard deviation is {std:.4f}, "
                       f"{std / gt_std if gt_std else 0:.2f} x the ground truth's {gt_std:.4f} (limit "
                       f"train.guard.min_output_std_ratio={g.min_output_std_ratio:g}): uniform outputs")
    if metrics["val_consistency_db"] < g.min_consistency_db:
        reasons.append(f"consistency collapsed: the outputs downsampled back agree with their inputs at "
                       f"{metrics['val_consistency_db']:.1f} dB (limit train.guard.min_consistency_db="
                       f"{g.min_consistency_db:g})")
    gap = metrics["val_psnr_bicubic"] - metrics["val_psnr"]
    if gap > g.max_psnr_below_bicubic_db:
        reasons.append(f"validation PSNR collapsed: {metrics['val_psnr']:.2f} dB, {gap:.1f} dB below bicubic's "
                       f"{metrics['val_psnr_bicubic']:.2f} dB (limit train.guard.max_psnr_below_bicubic_db="
                       f"{g.max_psnr_below_bicubic_db:g})")
    return reasons


class CollapseWatch:
    """Consecutive collapsed validations; :meth:`update` returns the stop message once there are ``patience``."""

    def __init__(self, cfg: MedsrConfig):
        self.cfg, self.enabled, self.count = cfg, guard_enabled(cfg), 0
        self.reasons: list[str] = []  # what collapsed at the latest validation (empty: nothing, or disabled)

    def update(self, metrics: dict[str, float], iteration: int) -> str | None:
        if not self.enabled:
            return None
        reasons = self.reasons = collapse_reasons(metrics, self.cfg)
        self.count = self.count + 1 if reasons else 0
        if self.count < self.cfg.train.guard.patience:
            return None
        return (f"training run {self.cfg.run.name} stopped at iteration {iteration}: "
                + "; ".join(reasons) + f" ({self.count} validation(s) in a row). Lower train.lr_g, check the "
                "training images, or set train.guard.enabled=false to train on regardless; nothing was exported")


def validation_record(metrics: dict[str, float], iteration: int) -> dict:
    """What an export's ``meta.json`` records of the validation of its weights; ``below_bicubic`` and a ``warning``
    when its PSNR is below bicubic's (``medsr eval`` repeats the warning in its report)."""
    record = {k: float(metrics[k]) for k in ("val_psnr", "val_ssim", "val_psnr_bicubic", "val_consistency_db")
              if k in metrics}
    record["iteration"] = iteration
    if "val_psnr" in record and "val_psnr_bicubic" in record:
        below = not record["val_psnr"] >= record["val_psnr_bicubic"]  # NaN counts as below
        record["below_bicubic"] = below
        if below:
            record["warning"] = (f"validation PSNR {record['val_psnr']:.2f} dB is below bicubic's "
                                 f"{record['val_psnr_bicubic']:.2f} dB on the run's val split (iteration {iteration})")
    return record
