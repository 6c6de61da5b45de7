"""Self-supervised SR told the true slice profile vs the profile estimated from the thick volume (issue #28).

For each true profile (box, Gaussian, flattened Gaussian of FWHM = the thick spacing), a crop of the MNI152 T1 is
made x4 thick along its axial normal; the profile is estimated from the thick volume alone
(:func:`medsr_dist.mri.profile.estimate_profile`); then SMORE in miniature runs twice, once with the true profile's
pairs and once with the estimate's: the psnr family's own train step (as tests/test_mri_refiner.py: seeded, no Ray)
on the volume's in-plane slices, every through-plane slice refined through the engine, the two orientations fused.
PSNR inside the brain (ground truth > 10 % of its max) against the isotropic crop, with the cubic B-spline beside.

    nice .venv/bin/python jobs/bench_mri_profile.py --crop 96 --iterations 300

Prints one row per profile and the CPU seconds of each stage (the machine is shared: CPU time, not wall, is the
budget). A full-size run: ``--crop 0`` (the whole template) and ``--iterations 3000``.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from medsr_dist.config import load_config
from medsr_dist.infer.backends import TorchBackend
from medsr_dist.infer.engine import TileSpec
from medsr_dist.mri.metrics import interpolation_baseline, psnr_3d
from medsr_dist.mri.profile import BOX_SHAPE, SliceProfile, degrade, estimate_profile
from medsr_dist.mri.reconstruct import reconstruct
from medsr_dist.mri.sample_data import sample_volume_path
from medsr_dist.mri.simulate import crop_to_multiple, intensity_window, self_supervised_pairs
from medsr_dist.mri.volume import Volume, read_nifti

TRUE = {"box": SliceProfile(4.0, BOX_SHAPE), "gaussian": SliceProfile(4.0, 2.0), "flattened": SliceProfile(4.0, 4.0)}


def train_and_reconstruct(thick: np.ndarray, profile, iterations: int, patch: int, seed: int = 0) -> np.ndarray:
    from medsr_dist.models.base import StepContext
    from medsr_dist.train.loop import build_training

    torch.manual_seed(seed)
    window = intensity_window(thick, 4, thick.shape[2])
    pairs = [p for p in self_supervised_pairs(thick, 2, 4, profile, window=window, skip_empty=0.05)
             if min(p.gt.shape) >= patch]
    cfg = load_config("configs/mri_psnr_x4.yaml", ["model.generator.num_feat=32", "model.generator.num_block=4",
                                                   f"train.iterations={iterations}", "train.lr_g=5e-4"])
    family, strategy, ema, schedulers, losses = build_training(cfg, torch.device("cpu"), distributed=False)
    ctx = StepContext(strategy=strategy, losses=losses)
    rng = np.random.default_rng(seed)
    for it in range(iterations):
        idx = rng.integers(len(pairs), size=8)
        lq, gt = [], []
        for i in idx:
            h, w = pairs[i].gt.shape
            t, l = rng.integers(0, h - patch + 1), rng.integers(0, w - patch + 1)
            lq.append(pairs[i].lq[t:t + patch, l:l + patch])
            gt.append(pairs[i].gt[t:t + patch, l:l + patch])
        batch = {k: torch.from_numpy(np.stack(v))[:, None].repeat(1, 3, 1, 1) for k, v in (("lq", lq), ("gt", gt))}
        ctx.iteration = it + 1
        family.train_step(ctx, batch)
        for s in schedulers.values():
            s.step()
    net = strategy.raw("net_g").eval()
    out = reconstruct(Volume(thick, np.diag([1.0, 1.0, 4.0, 1.0]), source="crop"), TorchBackend(net, scale=1, device="cpu"),
                      4, tile=TileSpec(tile=0, batch_size=8), fusion="fourier")
    return out.data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crop", type=int, default=96, help="central crop side (0: the whole template)")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--profiles", default="box,gaussian,flattened")
    args = ap.parse_args()
    path = sample_volume_path("mni152_t1")
    iso = read_nifti(path.read_bytes(), path.name).data.astype(np.float32)
    if args.crop:
        c = [s // 2 for s in iso.shape]
        h = args.crop // 2
        iso = iso[c[0] - h:c[0] + h, c[1] - h:c[1] + h, c[2] - h:c[2] + h]
    ref = crop_to_multiple(iso, 2, 4)
    mask = ref > 0.1 * ref.max()
    rows = []
    for name in args.profiles.split(","):
        true = TRUE[name]
        thick = degrade(ref, 2, 4.0, true)
        t0 = time.process_time()
        est = estimate_profile(thick, 2, 4.0)
        t_est = time.process_time() - t0
        bspline = psnr_3d(interpolation_baseline(thick, 2, 4, "bspline"), ref, mask)
        row = {"profile": name, "estimate": est.profile.describe(1.0), "fwhm_error_pct":
               round(100 * (est.profile.fwhm / true.fwhm - 1), 1), "estimate_cpu_s": round(t_est, 1),
               "bspline_db": round(bspline, 3)}
        for label, prof in (("told_true", true), ("estimated", est.profile)):
            t0 = time.process_time()
            out = train_and_reconstruct(thick, prof, args.iterations, args.patch)
            row[f"{label}_db"] = round(psnr_3d(out, ref, mask), 3)
            row[f"{label}_cpu_s"] = round(time.process_time() - t0, 1)
        row["estimated_minus_true_db"] = round(row["estimated_db"] - row["told_true_db"], 3)
        row["estimated_minus_bspline_db"] = round(row["estimated_db"] - bspline, 3)
        print(json.dumps(row), flush=True)
        rows.append(row)


if __name__ == "__main__":
    main()
