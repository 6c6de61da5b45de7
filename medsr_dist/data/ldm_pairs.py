"""Training pairs of the latent diffusion families (``model.degradation: bicubic_augmented``) as a Ray Data stage.

Per sample (seeded from (run seed, image key, epoch) like every other pair stage): a random ``gt_size`` crop of
the prepared image, then — on ``degradation.augment.prob`` of the samples (the reference's ~70 %) — the
reference's augmentations of that HR crop, each with its own probability: horizontal flip, rotation by 90/180/270,
random resized crop (a square of ``resized_crop_scale`` of the side, resized back with area/cubic interpolation)
and cutout (a zeroed square of ``cutout_size`` of the side). No colour jitter, no warps. The LR is made *from the
augmented HR* with the bicubic BI degradation of :mod:`medsr_dist.data.bicubic` (``degradation.bicubic``), so LR
and HR stay aligned by construction. At scale 1 (the ``vae`` stage) the LR is the HR itself.

Arrays: ``gt`` (3, gt_size, gt_size) and ``lq`` (3, gt_size/scale, gt_size/scale), float32 in [0, 1], RGB.
"""
from __future__ import annotations

import cv2
import numpy as np

from medsr_dist.config import AugmentConfig, DegradationConfig
from medsr_dist.data.bicubic import degrade_bicubic
from medsr_dist.data.degrade import decode_training_image, random_crop, sample_seed


def augment_hr(gt: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """(S, S, 3) float32 in [0, 1] -> the same shape, augmented (or returned as is). Never modifies ``gt``."""
    if rng.random() >= cfg.prob:
        return gt
    img = gt
    size = img.shape[0]
    if rng.random() < cfg.hflip:
        img = img[:, ::-1]
    if rng.random() < cfg.rotate:
        img = np.rot90(img, k=int(rng.integers(1, 4)))
    if rng.random() < cfg.resized_crop:
        side = max(1, int(round(size * cfg.resized_crop_scale)))
        y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        img = cv2.resize(np.ascontiguousarray(img[y:y + side, x:x + side]), (size, size), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img, 0, 1)
    if rng.random() < cfg.cutout:
        side = max(1, int(round(size * cfg.cutout_size)))
        y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        img = np.array(img, copy=True)
        img[y:y + side, x:x + side] = 0.0
    return np.ascontiguousarray(img, dtype=np.float32)


class AugmentedBicubicPairs:
    """Ray Data stage (callable class, run in an actor pool): prepared rows -> augmented, aligned BI pairs.

    In: a batch with ``image`` (PNG bytes), ``key`` (str) and ``epoch`` (int) columns.
    Out: ``lq`` (N, 3, h, w) and ``gt`` (N, 3, H, W) float32 in [0, 1], plus ``key``.
    """

    def __init__(self, cfg: DegradationConfig, scale: int, run_seed: int):
        if cfg.gt_size % scale:
            raise ValueError(f"degradation.gt_size ({cfg.gt_size}) must be divisible by model.scale ({scale})")
        self.cfg, self.scale, self.run_seed = cfg, scale, run_seed
        cv2.setNumThreads(1)

    def degrade_one(self, data: bytes, key: str, epoch: int) -> dict:
        rng = np.random.default_rng(sample_seed(self.run_seed, key, epoch))
        gt = random_crop(decode_training_image(data), self.cfg.gt_size, rng, False)  # flips are in augment_hr
        gt = augment_hr(gt, self.cfg.augment, rng)
        lq = gt.copy() if self.scale == 1 else degrade_bicubic(gt, self.cfg.bicubic, self.scale, rng)
        return {"gt": gt, "lq": lq}

    def __call__(self, batch: dict) -> dict:
        results = [self.degrade_one(d, str(k), int(e)) for d, k, e in zip(batch["image"], batch["key"], batch["epoch"])]
        chw = lambda name: np.stack([r[name].transpose(2, 0, 1) for r in results]).astype(np.float32)  # noqa: E731
        return {"lq": chw("lq"), "gt": chw("gt"), "key": np.asarray(batch["key"])}
