"""Benchmark (not a test): the latent diffusion family's samplers, batching and runtimes, ratios in one run.

    python jobs/bench_ldm.py                               # trains a small model first (CPU: ~10 min), then measures
    python jobs/bench_ldm.py --ldm runs/ldm_cxr_x4/train-ldm/export/model.pth --images 8   # an ldm export

Everything runs on the same model and the same images (synthetic radiographs, medsr_dist.data.synthetic, HR 256
-> LR 64 by MATLAB bicubic, the held-out seeds never trained on), one process, ``--threads`` torch/ORT threads:

(a) Samplers: DDPM-300 (the reference), DDIM-50 (eta 0), DPM-Solver++-20: seconds per image (all images in one
    batch sharing every step) and PSNR against the HR; speed ratios vs DDPM-300 and |dPSNR| vs DDPM-300
    (goals: DDIM >= 5x and DPM-Solver++ >= 12x at |dPSNR| <= 0.3 dB).
(b) Batching: ``--batch`` LR images per denoising step vs one image at a time (DDIM-50): images/s ratio (goal >= 3x).
(c) Runtimes: one U-Net call (batch ``--batch``, 8 x 32 x 32 latents) in onnxruntime vs torch, and the whole
    DDIM-50 sampler with the ONNX U-Net + VAE vs torch.
(d) ``--zero-snr``: a second U-Net trained the same way with zero-terminal-SNR + v-prediction; PSNR of both with
    DDPM-300 and DDIM-50 (the alpha_bar_T = 0.048 mismatch of the reference schedule, measured).

Without ``--ldm`` the script trains its own VAE (``--vae-iters``) and U-Net (``--ldm-iters``) with the family's own
train_step (``build_training``, one process, no Ray) at the default architectures; a CPU budget of minutes gives a
weak model, so the PSNRs say how the samplers compare on *this* model, not what the family reaches.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medsr_dist.config import load_config  # noqa: E402
from medsr_dist.models.base import StepContext  # noqa: E402
from medsr_dist.train.loop import build_training, write_export  # noqa: E402


def _pairs(seeds, hr: int = 256):
    import medsr_dist.compat  # noqa: F401
    from basicsr.utils.matlab_functions import imresize

    from medsr_dist.data.synthetic import make_radiograph

    gts, lqs = [], []
    for s in seeds:
        g = np.repeat(make_radiograph(int(s), size=hr)[..., None], 3, axis=2)  # float32 [0, 1] gray -> RGB
        gts.append(g.transpose(2, 0, 1))
        lqs.append(imresize(np.ascontiguousarray(g), 0.25, antialiasing=True).clip(0, 1).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(lqs)).float(), torch.from_numpy(np.stack(gts)).float()


def _train(cfg, iters, batch, seed0, log_every=50):
    family, strategy, ema, schedulers, losses = build_training(cfg, torch.device("cpu"), distributed=False)
    ctx = StepContext(strategy=strategy, losses=losses)
    rng = np.random.default_rng(seed0)
    pool_lq, pool_gt = _pairs(rng.integers(1000, 10**6, size=64))
    t0 = time.perf_counter()
    for i in range(1, iters + 1):
        idx = rng.integers(0, len(pool_gt), size=batch)
        ctx.iteration = i
        logs = family.train_step(ctx, {"lq": pool_lq[idx], "gt": pool_gt[idx]})
        for s in schedulers.values():
            s.step()
        from medsr_dist.train.loop import ema_update

        for k, e in ema.items():
            ema_update(e, strategy.raw(k), cfg.train.ema_decay)
        if i % log_every == 0 or i == iters:
            print(f"  {cfg.model.family} {i}/{iters} {', '.join(f'{k}={v:.4g}' for k, v in logs.items())} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return family, strategy, ema


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(0, 1) - b) ** 2).mean())
    return 10 * math.log10(1 / max(mse, 1e-12))


def _train_models(args, out_dir):
    vae_cfg = load_config(None, ["model.family=vae", "model.losses.perceptual_weight=0",  # no ImageNet VGG here: a random one teaches nothing
                                 "train.vgg.weights=random-init-for-testing",
                                 "degradation.gt_size=256", f"train.iterations={args.vae_iters}",
                                 f"model.scale_factor_iterations={max(1, args.vae_iters // 5)}", "train.lr_g=5e-4"])
    fam, strat, ema = _train(vae_cfg, args.vae_iters, 4, 1)
    vae_dir = os.path.join(out_dir, "vae")
    os.makedirs(vae_dir, exist_ok=True)
    write_export(vae_dir, vae_cfg, args.vae_iters, fam, {"vae": strat.raw("vae")}, ema)
    lq, gt = _pairs(range(args.images))
    with torch.no_grad():
        rec = strat.raw("vae").decode(strat.raw("vae").encode(gt))
    print(f"VAE reconstruction PSNR on the benchmark images: {_psnr(rec, gt):.2f} dB "
          f"(scale factor {float(strat.raw('vae').scale_factor):.4f})", flush=True)
    exports = {}
    variants = [("eps", [])] + ([("zsnr", ["model.schedule.zero_terminal_snr=true",
                                           "model.schedule.prediction_type=v_prediction"])] if args.zero_snr else [])
    for name, extra in variants:
        cfg = load_config(None, ["model.family=ldm", f"model.vae={vae_dir}/model.pth", "degradation.gt_size=256",
                                 f"train.iterations={args.ldm_iters}", "train.lr_g=1e-3", "train.ema_decay=0.99", *extra])
        fam, strat, ema = _train(cfg, args.ldm_iters, args.train_batch, 2)
        d = os.path.join(out_dir, name)
        os.makedirs(d, exist_ok=True)
        write_export(d, cfg, args.ldm_iters, fam, {k: strat.raw(k) for k in ("unet", "vae")}, ema)
        exports[name] = os.path.join(d, "model.pth")
    return exports


def _time(fn, repeats=1):
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ldm", help="an ldm export (model.pth with meta.json); default: train one first")
    p.add_argument("--images", type=int, default=4, help="held-out images for (a) and (d)")
    p.add_argument("--batch", type=int, default=16, help="images per denoising step in (b) and (c)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-iters", type=int, default=300)
    p.add_argument("--ldm-iters", type=int, default=600)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--zero-snr", action="store_true", help="(d): also train and measure a zero-terminal-SNR U-Net")
    p.add_argument("--out", help="keep the trained exports here (vae/, eps/, zsnr/); default: a temporary folder")
    p.add_argument("--zsnr", help="with --ldm: the zero-terminal-SNR export for (d)")
    p.add_argument("--repeats", type=int, default=2, help="timings are the best of this many runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from medsr_dist.infer.diffusion_backend import DiffusionBackend, _OrtParts
    from medsr_dist.infer.model_file import read_model_file
    from medsr_dist.infer.diffusion_export import export_ldm_onnx
    from medsr_dist.storage import Storage

    with tempfile.TemporaryDirectory(prefix="bench_ldm_") as tmp:
        if args.out:
            os.makedirs(args.out, exist_ok=True)
        if args.ldm:
            exports = {"eps": args.ldm, **({"zsnr": args.zsnr} if args.zsnr else {})}
        else:
            exports = _train_models(args, args.out or tmp)
        mf = read_model_file(exports["eps"])
        module = mf.build(Storage())
        lq, gt = _pairs(range(args.images))
        lq_np = lq.numpy()

        def run(be, x):
            return torch.from_numpy(be(x))

        print(f"\nmodel {mf.name}: U-Net {sum(p.numel() for p in module.unet.parameters()):,} parameters; "
              f"{args.images} images 64 -> 256, torch threads {args.threads}")
        bic = torch.nn.functional.interpolate(lq, scale_factor=4, mode="bicubic", align_corners=False)
        print(f"bicubic PSNR {_psnr(bic, gt):.2f} dB")

        # (a) samplers
        rows = {}
        for sampler, steps in (("ddpm", 300), ("ddim", 50), ("dpmsolver++", 20)):
            be = DiffusionBackend(module, samples=1, sampler=sampler, steps=steps)
            sec, out = _time(lambda: run(be, lq_np), repeats=args.repeats)
            rows[sampler] = (steps, sec / args.images, _psnr(out, gt))
        with torch.inference_mode():
            sec_vae, _ = _time(lambda: module.vae.decode(module.condition(lq)), repeats=args.repeats)
            z = module.condition(lq)
            tt = torch.full((len(lq),), 150, dtype=torch.int64)
            sec_call, _ = _time(lambda: module.unet(torch.cat([z, z], 1), tt), repeats=args.repeats)
        print(f"fixed cost per image (VAE encode + decode, 256 px): {sec_vae / args.images:.3f} s; "
              f"one U-Net call per image: {sec_call / args.images * 1e3:.1f} ms")
        ref = rows["ddpm"]
        print("\n(a) sampler        steps  s/image  speed-up vs DDPM-300  PSNR dB  |dPSNR| vs DDPM-300")
        for name, (steps, spi, ps) in rows.items():
            print(f"    {name:14s} {steps:5d}  {spi:7.3f}  {ref[1] / spi:20.1f}x  {ps:7.2f}  {abs(ps - ref[2]):8.2f}")

        # (b) batching across images
        lq_b, _ = _pairs(range(100, 100 + args.batch))
        xb = lq_b.numpy()
        be = DiffusionBackend(module, samples=1, sampler="ddim", steps=50)
        sec_batched, _ = _time(lambda: run(be, xb), repeats=args.repeats)
        sec_single, _ = _time(lambda: [run(be, xb[i:i + 1]) for i in range(len(xb))], repeats=args.repeats)
        print(f"\n(b) DDIM-50, {args.batch} images: one denoising step for all {args.batch / sec_batched:.2f} images/s, "
              f"one image at a time {args.batch / sec_single:.2f} images/s: {sec_single / sec_batched:.2f}x")

        # (c) onnxruntime vs torch
        parts = export_ldm_onnx(module, metadata={})
        print(f"\n(c) ONNX export parity (max abs vs torch): {', '.join(f'{k} {d:.1e}' for k, (_, d) in parts.items())}")
        ort = _OrtParts({k: v for k, (v, _) in parts.items()}, threads=args.threads)
        c = module.vae.latent_channels
        x = torch.randn(args.batch, 2 * c, 32, 32)
        t = torch.full((args.batch,), 150, dtype=torch.int64)
        with torch.inference_mode():
            module.unet(x, t)
            ort.denoise(x, t)
            sec_t, _ = _time(lambda: module.unet(x, t), repeats=5)
            sec_o, _ = _time(lambda: ort.denoise(x, t), repeats=5)
        print(f"    one U-Net call, batch {args.batch}: torch {sec_t * 1e3:.0f} ms, onnxruntime {sec_o * 1e3:.0f} ms "
              f"({sec_t / sec_o:.2f}x)")
        be_ort = DiffusionBackend(module, samples=1, sampler="ddim", steps=50, ort_parts=ort)
        sec_ob, out_o = _time(lambda: run(be_ort, xb), repeats=args.repeats)
        out_t = run(be, xb)
        print(f"    DDIM-50 on {args.batch} images: torch {sec_batched:.1f} s, onnxruntime {sec_ob:.1f} s "
              f"({sec_batched / sec_ob:.2f}x); max |torch - ORT| output {float((out_t - out_o).abs().max()):.1e}")

        # (d) zero terminal SNR
        if "zsnr" in exports:
            mz = read_model_file(exports["zsnr"]).build(Storage())
            print("\n(d) schedule                         DDPM-300 PSNR  DDIM-50 PSNR")
            for name, m in (("reference (alpha_bar_T 0.048, eps)", module), ("zero terminal SNR (v)", mz)):
                res = [_psnr(run(DiffusionBackend(m, samples=1, sampler=s, steps=n), lq_np), gt)
                       for s, n in (("ddpm", 300), ("ddim", 50))]
                print(f"    {name:34s} {res[0]:13.2f}  {res[1]:12.2f}")


if __name__ == "__main__":
    main()
