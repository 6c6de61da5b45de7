"""Benchmark: patches/s of our second-order degradation stage against Real-ESRGAN's own degradation, on CPU.

    python jobs/bench_degradation.py                       # defaults: gt 256, x4, about 1 min on 2 idle cores
    python jobs/bench_degradation.py --patches 480 --ref-batches 6 --ref-threads 1 --ray-batch-size 16

What is timed (every side produces the same thing: 256x256 ground-truth/USM patches and 64x64 LQ patches,
float32 RGB in [0, 1], from the same 16-bit grayscale PNGs, with the same degradation distributions):

* reference: ``realesrgan.data.realesrgan_dataset.RealESRGANDataset.__getitem__`` (read PNG from a folder with a
  meta_info file, flip, 400-px crop, three kernels) for a batch of ``--ref-batch`` (12, as the x4plus fine-tune)
  + collate + ``realesrgan.models.realesrgan_model.RealESRGANModel.feed_data`` (USM, blur, resize, noise,
  DiffJPEG twice, sinc, crop to gt_size, training pair pool), in this one process on CPU with
  ``torch.set_num_threads(--ref-threads)`` and ``cv2.setNumThreads(--ref-threads)``. Real-ESRGAN was written for
  a GPU; two things are patched only while the reference runs: ``torch.Tensor.cuda`` is the identity, and the
  ``filter2D`` it calls gets a ``.contiguous()`` input (basicsr's ``.view`` fails on non-contiguous tensors with
  current torch). ``feed_data`` is called unbound on a small object holding CPU DiffJPEG/USMSharp, so no
  generator/discriminator/VGG is built.
* ours, in-process: ``SecondOrderDegradation.__call__`` on batches of 4 rows (PNG bytes, key, epoch) in this
  process, OpenCV on 1 thread (the stage sets it) -- the same work one actor does, without Ray.
* ours, Ray Data: the same rows through ``map_batches(SecondOrderDegradation, batch_size=4,
  compute=ActorPoolStrategy(size=N), num_cpus=1)`` exactly as ``build_train_stream`` declares it, for N = 1 and 2,
  on ``ray.init(num_cpus=2)``. Throughput is steady state: patches finished after every actor delivered its first
  batch, divided by the time from then to the last batch (actor start-up is reported separately). Also printed:
  the rate counting only the time inside the stage's ``__call__`` (the rest is Ray Data's per-batch cost, or
  waiting) and the share of a core this driver used consuming the stream (on a trainer in real runs).

The reference and the in-process run are each timed in two halves, one before and one after the Ray runs, all
beside the same idle Ray instance; the halves' difference ("drift") shows whether the machine's load changed.
Ray starts its worker processes (our actors) at nice 15 while this driver (reference, in-process) runs at nice 0:
no difference on an idle machine, a handicap for the actors on a busy one.

The degradation options of both sides come from one ``DegradationConfig`` (defaults = Real-ESRGAN's
options/finetune_realesrgan_x4plus.yml); the script fails if a degradation field is not handed to the reference.
Needs ``realesrgan==0.3.0`` installed with ``pip install --no-deps realesrgan==0.3.0``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import medsr_dist.compat  # noqa: E402,F401  (must precede basicsr/realesrgan)
from medsr_dist.config import DegradationConfig  # noqa: E402
from medsr_dist.data.degrade import SecondOrderDegradation  # noqa: E402
from medsr_dist.data.prepare import to_training_png  # noqa: E402
from medsr_dist.data.synthetic import make_radiograph  # noqa: E402

# Real-ESRGAN option names, split by where the reference reads them; all equal DegradationConfig field names.
DATASET_KEYS = (
    "blur_kernel_size", "kernel_list", "kernel_prob", "sinc_prob", "blur_sigma", "betag_range", "betap_range",
    "blur_kernel_size2", "kernel_list2", "kernel_prob2", "sinc_prob2", "blur_sigma2", "betag_range2", "betap_range2",
    "final_sinc_prob", "use_hflip",
)
MODEL_KEYS = (
    "resize_prob", "resize_range", "gaussian_noise_prob", "noise_range", "poisson_scale_range", "gray_noise_prob",
    "jpeg_range", "second_blur_prob", "resize_prob2", "resize_range2", "gaussian_noise_prob2", "noise_range2",
    "poisson_scale_range2", "gray_noise_prob2", "jpeg_range2", "gt_size",
)
# DegradationConfig fields with no Real-ESRGAN option of the same name, and where the reference has them.
NOT_OPTIONS = {
    "usm_sharpen_gt": "always on in feed_data (l1/percep_gt_usm: True)",
    "shuffle_buffer": "opt['queue_size'] (training pair pool)",
    "num_actors": "placement only", "cpus_per_actor": "placement only",
    "lq_quantization": "feed_data always rounds the LQ to 8 bits ('8bit'); the bench's 16-bit sources use 'source'",
}
REF_CROP = 400  # RealESRGANDataset's hard-coded crop_pad_size


def reference_options(cfg: DegradationConfig, scale: int, dataroot: str, meta_info: str) -> tuple[dict, dict]:
    """(RealESRGANDataset opt, RealESRGANModel opt) built from ``cfg``, so the two sides cannot drift apart."""
    fields = set(DegradationConfig.model_fields)
    unknown = (set(DATASET_KEYS) | set(MODEL_KEYS)) - fields
    unhandled = fields - set(DATASET_KEYS) - set(MODEL_KEYS) - set(NOT_OPTIONS)
    if unknown or unhandled:
        raise SystemExit(f"reference options out of date: not in DegradationConfig {sorted(unknown)}, "
                         f"not handed to the reference {sorted(unhandled)}")
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (YAML lists, as the .yml gives them)
    dataset_opt = {k: plain(getattr(cfg, k)) for k in DATASET_KEYS}
    dataset_opt.update(dataroot_gt=dataroot, meta_info=meta_info, io_backend={"type": "disk"}, use_rot=False)
    model_opt = {k: plain(getattr(cfg, k)) for k in MODEL_KEYS}
    for k in ("gray_noise_prob", "gray_noise_prob2"):  # null: 1.0 for gray sources, as the bench's radiographs are
        model_opt[k] = 1.0 if model_opt[k] is None else model_opt[k]
    model_opt.update(scale=scale, queue_size=cfg.shuffle_buffer, high_order_degradation=True)
    return dataset_opt, model_opt


def make_rows(n_images: int, image_size: int, n_patches: int) -> tuple[list[bytes], list[dict]]:
    """``n_images`` 16-bit grayscale PNGs of synthetic radiographs, and ``n_patches`` stage rows cycling over them."""
    pngs = [to_training_png(make_radiograph(100 + i, image_size)[:, :, None], 16) for i in range(n_images)]
    rows = [{"image": pngs[i % n_images], "key": f"img{i % n_images:03d}.png", "epoch": i // n_images}
            for i in range(n_patches)]
    return pngs, rows


@contextlib.contextmanager
def reference_on_cpu():
    """While timing the reference only: ``Tensor.cuda`` is the identity and filter2D gets contiguous input."""
    import torch
    from basicsr.utils import img_process_util
    from realesrgan.models import realesrgan_model

    saved_cuda, saved_filter = torch.Tensor.cuda, realesrgan_model.filter2D
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    realesrgan_model.filter2D = lambda img, kernel: img_process_util.filter2D(img.contiguous(), kernel)
    try:
        yield
    finally:
        torch.Tensor.cuda, realesrgan_model.filter2D = saved_cuda, saved_filter


class ReferencePipeline:
    """Real-ESRGAN's data path on CPU: ``RealESRGANDataset`` over a temp folder of PNGs + ``feed_data``."""

    def __init__(self, cfg: DegradationConfig, scale: int, pngs: list[bytes], batch: int, threads: int, seed: int):
        import random

        import torch

        try:
            from basicsr.utils import DiffJPEG, USMSharp
            from realesrgan.data.realesrgan_dataset import RealESRGANDataset
            from realesrgan.models.realesrgan_model import RealESRGANModel
        except ImportError as exc:
            raise SystemExit(f"the reference needs Real-ESRGAN: pip install --no-deps realesrgan==0.3.0 ({exc})")

        class CPUFeeder:
            """What ``RealESRGANModel.feed_data`` reads from ``self``: no networks, CPU DiffJPEG/USMSharp."""

            _dequeue_and_enqueue = RealESRGANModel._dequeue_and_enqueue

            def __init__(self, opt):
                self.opt, self.is_train, self.device = opt, True, torch.device("cpu")
                self.jpeger, self.usm_sharpener = DiffJPEG(differentiable=False), USMSharp()
                self.queue_size = opt["queue_size"]

        self.cfg, self.scale, self.batch, self.threads = cfg, scale, batch, threads
        self.feed_data = RealESRGANModel.feed_data
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self._dir = tempfile.TemporaryDirectory(prefix="bench-ref-")
        names = []
        for i, data in enumerate(pngs):
            names.append(f"img{i:03d}.png")
            Path(self._dir.name, names[-1]).write_bytes(data)
        meta = Path(self._dir.name, "meta_info.txt")
        meta.write_text("".join(f"{n}\n" for n in names))
        dataset_opt, model_opt = reference_options(cfg, scale, self._dir.name, str(meta))
        self.dataset, self.feeder = RealESRGANDataset(dataset_opt), CPUFeeder(model_opt)
        self.index = 0
        self.run(1)  # warm-up batch (allocations, file cache), not counted

    def run(self, n_batches: int) -> dict:
        """Time ``n_batches`` batches: dataset ``__getitem__`` x batch + collate, then ``feed_data``."""
        import torch
        from torch.utils.data import default_collate

        torch.set_num_threads(self.threads)
        cv2.setNumThreads(self.threads)
        t_get = t_feed = 0.0
        with reference_on_cpu():
            for _ in range(n_batches):
                t0 = time.perf_counter()
                items = []
                for _ in range(self.batch):
                    items.append(self.dataset[self.index % len(self.dataset)])
                    self.index += 1
                data = default_collate(items)
                t1 = time.perf_counter()
                self.feed_data(self.feeder, data)
                t_get, t_feed = t_get + t1 - t0, t_feed + time.perf_counter() - t1
        lq, gt, size = self.feeder.lq, self.feeder.gt, self.cfg.gt_size
        assert tuple(lq.shape) == (self.batch, 3, size // self.scale, size // self.scale), lq.shape
        assert tuple(gt.shape) == (self.batch, 3, size, size), gt.shape
        n = self.batch * n_batches
        return {"patches": n, "seconds": t_get + t_feed, "rate": n / (t_get + t_feed),
                "getitem_s_per_batch": t_get / n_batches, "feed_data_s_per_batch": t_feed / n_batches}

    def close(self) -> None:
        self._dir.cleanup()


def combine(a: dict, b: dict) -> dict:
    """Two timings of the same thing (before/after the others) as one, with their relative drift."""
    n, sec = a["patches"] + b["patches"], a["seconds"] + b["seconds"]
    return {**a, "patches": n, "seconds": sec, "rate": n / sec, "first": a["rate"], "second": b["rate"],
            "drift": abs(a["rate"] - b["rate"]) / (n / sec)}


def time_ours_in_process(cfg: DegradationConfig, scale: int, rows: list[dict], seed: int) -> dict:
    """The stage's own work on batches of 4, in this process, without Ray (warm-up batch not counted)."""
    stage = SecondOrderDegradation(cfg, scale, seed)  # sets cv2.setNumThreads(1)
    batches = [rows[i:i + 4] for i in range(0, len(rows), 4)]
    as_batch = lambda rs: {k: [r[k] for r in rs] for k in ("image", "key", "epoch")}  # noqa: E731
    out = stage(as_batch(batches[0]))
    assert out["lq"].shape[1:] == (3, cfg.gt_size // scale, cfg.gt_size // scale) and out["gt"].shape[2] == cfg.gt_size
    t0 = time.perf_counter()
    n = 0
    for rs in batches[1:]:
        n += len(stage(as_batch(rs))["key"])
    seconds = time.perf_counter() - t0
    return {"patches": n, "seconds": seconds, "rate": n / seconds}


class TimedDegradation(SecondOrderDegradation):
    """The stage plus two bookkeeping columns: when the actor finished the batch, and which actor it was."""

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        out = super().__call__(batch)
        n = len(out["key"])
        out["t_done"] = np.full(n, time.time())
        out["t_work"] = np.full(n, (time.perf_counter() - t0) / n)  # seconds of stage work per patch
        out["pid"] = np.full(n, os.getpid())
        return out


def time_ours_ray(cfg: DegradationConfig, scale: int, rows: list[dict], seed: int, actors: int, batch_size: int = 4) -> dict:
    """Steady-state patches/s of the Ray Data actor pool (the same map_batches call as build_train_stream)."""
    import ray

    t0, cpu0 = time.time(), time.process_time()
    ds = ray.data.from_items(rows).map_batches(
        TimedDegradation, fn_constructor_args=(cfg, scale, seed), batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
    )
    done, pids, work = [], [], []
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        assert b["lq"].shape[1:] == (3, cfg.gt_size // scale, cfg.gt_size // scale)
        done.append(b["t_done"])
        pids.append(b["pid"])
        work.append(b["t_work"])
    t_end_driver, driver_cpu = time.time(), time.process_time() - cpu0
    done, pids, work = np.concatenate(done), np.concatenate(pids), np.concatenate(work)
    if len(done) != len(rows):
        raise RuntimeError(f"Ray Data returned {len(done)} patches of {len(rows)}")
    first = {p: done[pids == p].min() for p in np.unique(pids)}
    t_start = max(first.values())  # every actor is up and has delivered a batch
    in_window = done > t_start
    window = done.max() - t_start
    if in_window.sum() < 8 or window <= 0:
        raise SystemExit(f"{actors} actor(s): too few patches after start-up to measure; raise --patches")
    return {"patches": int(in_window.sum()), "seconds": float(window), "rate": float(in_window.sum() / window),
            "actors_seen": len(first), "startup_s": float(min(first.values()) - t0),
            "all_up_s": float(t_start - t0), "end_to_end_s": float(t_end_driver - t0),
            "end_to_end_rate": len(rows) / (t_end_driver - t0),
            # patches/s of one actor counting only the time inside the stage's __call__
            "work_rate_per_actor": float(len(work) / work.sum()),
            "driver_cpu_share": driver_cpu / (t_end_driver - t0)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gt-size", type=int, default=256, help="ground-truth patch side (Real-ESRGAN: 256)")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--image-size", type=int, default=512, help="side of the synthetic radiographs (>= 400 for the reference's crop)")
    p.add_argument("--images", type=int, default=16, help="distinct source images")
    p.add_argument("--ref-batch", type=int, default=12, help="reference batch size (x4plus fine-tune: 12)")
    p.add_argument("--ref-batches", type=int, default=4, help="timed reference batches, half before and half after "
                   "ours (one more warms up)")
    p.add_argument("--ref-threads", type=int, default=2, help="torch and OpenCV threads of the reference process")
    p.add_argument("--patches", type=int, default=240, help="patches per Ray Data run (half of them for each "
                   "in-process run)")
    p.add_argument("--actors", default="1,2", help="actor pool sizes to time")
    p.add_argument("--ray-batch-size", type=int, default=4, help="map_batches batch_size (build_train_stream: 4)")
    p.add_argument("--num-cpus", type=int, default=2, help="ray.init(num_cpus=...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--skip-ray", action="store_true")
    args = p.parse_args(argv)
    if args.gt_size > REF_CROP and not args.skip_reference:
        raise SystemExit(f"--gt-size must be <= {REF_CROP} (the reference crops {REF_CROP}-px patches first)")
    cfg = DegradationConfig(gt_size=args.gt_size)
    actor_counts = [int(a) for a in args.actors.split(",") if a]

    print(f"# bench_degradation: gt {args.gt_size}x{args.gt_size} -> lq {args.gt_size // args.scale}x"
          f"{args.gt_size // args.scale} (x{args.scale}), source {args.images} synthetic radiographs "
          f"{args.image_size}x{args.image_size} (16-bit gray PNG)")
    print(f"# host: {os.cpu_count()} logical CPUs, {platform.processor() or platform.machine()}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print("# order: reference (1st half), ours in-process (1st half), Ray Data runs, ours in-process (2nd half), "
          "reference (2nd half); 'drift' = how much the two halves of one measurement differ (machine load)")
    pngs, rows = make_rows(args.images, args.image_size, args.patches)
    half = len(rows) // 2
    results: dict[str, dict] = {}
    ray = None
    if not args.skip_ray:  # started first, so that every measurement runs beside the same (idle) Ray processes
        import ray
        from ray.data import DataContext

        # address="local": a private instance even when other Ray clusters run on this host
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=1 << 30)
        ctx = DataContext.get_current()
        ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    try:
        ref = None
        if not args.skip_reference:
            ref = ReferencePipeline(cfg, args.scale, pngs, args.ref_batch, args.ref_threads, args.seed)
            ref_first = ref.run((args.ref_batches + 1) // 2)
        inproc_first = time_ours_in_process(cfg, args.scale, rows[:half], args.seed)
        if ray is not None:
            for n in actor_counts:
                results[f"ray{n}"] = time_ours_ray(cfg, args.scale, rows, args.seed, n, args.ray_batch_size)
        results["inproc"] = combine(inproc_first, time_ours_in_process(cfg, args.scale, rows[half:], args.seed))
        if ref is not None:
            second = ref.run(max(args.ref_batches // 2, 1))
            ref.close()
            r = results["ref"] = combine(ref_first, second)
            for key in ("getitem_s_per_batch", "feed_data_s_per_batch"):  # weighted by batches
                r[key] = (ref_first[key] * ref_first["patches"] + second[key] * second["patches"]) / r["patches"]
    finally:
        if ray is not None:
            ray.shutdown()

    print()
    if "ref" in results:
        r = results["ref"]
        print(f"reference  Real-ESRGAN __getitem__ + feed_data, 1 process, torch+cv2 threads={args.ref_threads}: "
              f"{r['rate']:7.2f} patches/s  ({r['patches']} patches in {r['seconds']:.1f} s; halves {r['first']:.2f} / "
              f"{r['second']:.2f}, drift {r['drift']:.0%}; per batch of {args.ref_batch}: __getitem__ "
              f"{r['getitem_s_per_batch']:.2f} s, feed_data {r['feed_data_s_per_batch']:.2f} s)")
    r = results["inproc"]
    print(f"ours       SecondOrderDegradation in-process, 1 process, cv2 threads=1:           "
          f"{r['rate']:7.2f} patches/s  ({r['patches']} patches in {r['seconds']:.1f} s; halves {r['first']:.2f} / "
          f"{r['second']:.2f}, drift {r['drift']:.0%})")
    for n in actor_counts:
        if f"ray{n}" in results:
            r = results[f"ray{n}"]
            print(f"ours       Ray Data ActorPoolStrategy(size={n}), num_cpus=1 each, cv2 threads=1:      "
                  f"{r['rate']:7.2f} patches/s  steady state ({r['patches']} patches in {r['seconds']:.1f} s after all "
                  f"actors were up; first batch after {r['startup_s']:.1f} s, all actors up after {r['all_up_s']:.1f} s; "
                  f"end to end incl. start-up {r['end_to_end_rate']:.2f} patches/s)")
            print(f"           ... inside the stage's __call__ one actor does {r['work_rate_per_actor']:.2f} patches/s; "
                  f"this driver, consuming the stream, used {r['driver_cpu_share']:.0%} of a core meanwhile")

    load = os.getloadavg()[0]
    print(f"\n# load average at end {load:.1f}" + (f" (above {os.cpu_count()}: other work shared these cores, "
          "ratios are indicative only; re-run on a quiet machine)" if load > os.cpu_count() else ""))
    print("\n## Ratios (patches/s over patches/s)")
    t = args.ref_threads
    if "ref" in results:
        ref_rate = results["ref"]["rate"]
        print(f"per process : ours in-process (1 process, 1 thread)  / reference (1 process, {t} threads) = "
              f"{results['inproc']['rate'] / ref_rate:6.1f}x")
        if "ray1" in results:
            print(f"per process : ours 1 actor (1 process, 1 CPU)       / reference (1 process, {t} threads) = "
                  f"{results['ray1']['rate'] / ref_rate:6.1f}x   (ours on 1 core, the reference on {t})")
        top = max((n for n in actor_counts if f"ray{n}" in results), default=None)
        if top is not None:
            print(f"per machine : ours {top} actor(s) ({top} processes, {top} CPUs) / reference (1 process, {t} threads) = "
                  f"{results[f'ray{top}']['rate'] / ref_rate:6.1f}x   (goal >= 10x on the same {args.num_cpus} cores)")
    if "ray1" in results and "ray2" in results:
        print(f"scaling     : ours 2 actors / ours 1 actor                                            = "
              f"{results['ray2']['rate'] / results['ray1']['rate']:6.2f}x   (goal >= 1.8x)")
    if "ray1" in results:
        print(f"Ray Data    : ours 1 actor / ours in-process, same work on 1 thread (1.00 = no cost)   = "
              f"{results['ray1']['rate'] / results['inproc']['rate']:6.2f}x")

if __name__ == "__main__":
    main()
