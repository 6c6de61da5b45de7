"""Volume reconstruction throughput and memory against the engine's 2-D throughput on the same slices.

    python jobs/bench_mri.py                        # MNI152 T1 (nilearn wheel) made x4 thick, random MSRResNet x1
    python jobs/bench_mri.py --crop 64x64 --repeat 3       # a central crop: quicker on a busy machine
    python jobs/bench_mri.py --model runs/.../export/model.pth --repeat 2
    python jobs/bench_mri.py --memory 512x512x75    # identity backend: peak numpy memory of both fusions

Throughput: ``reconstruct`` refines every slice of both through-plane orientations, so the engine sees the same
slices in both runs; the 2-D run gets them pre-interpolated in a list (no slicing, interpolation, restacking or
fusion). Ratio = 2-D time / volume time (goal >= 0.9: restacking and fusion nearly free), in wall seconds and in
CPU seconds of the process (all threads; the one to read on a shared machine). Output voxels/s is the fused
volume's voxels per second of the volume run.

Memory: ``tracemalloc`` peak of numpy allocations (numpy reports to it; torch's do not) during ``reconstruct``,
against the output's float32 size V: mean fusion should stay near V + input, Fourier near 3 V + input.
"""
from __future__ import annotations

import argparse
import gc
import time
import tracemalloc

import numpy as np


def thick_mni(factor: int):
    from medsr_dist.mri.sample_data import sample_volume_path
    from medsr_dist.mri.simulate import simulate_anisotropic
    from medsr_dist.mri.volume import read_nifti

    path = sample_volume_path("mni152_t1")
    return simulate_anisotropic(read_nifti(path.read_bytes(), path.name), axis=2, k=factor, profile="gaussian")


def random_backend(threads: int):
    import torch

    from medsr_dist.config import load_config
    from medsr_dist.infer.backends import TorchBackend
    from medsr_dist.models.archs import generator_from

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    gen = load_config("configs/mri_psnr_x4.yaml").model.generator  # MSRResNet x1, the refiner the config trains
    net = generator_from(gen, 1)
    with torch.no_grad():  # random weights in the tail too: the identity at init would be a cheap special case
        net.conv_last.weight.normal_(0, 1e-3)
    return TorchBackend(net.eval(), scale=1, device="cpu")


class Identity:
    scale, size_multiple = 1, 1

    def __call__(self, batch):
        return batch


def throughput(args) -> None:
    from medsr_dist.infer.engine import TileSpec, enhance_many
    from medsr_dist.mri.reconstruct import interpolated_slices, plan_reconstruction, reconstruct

    vol = thick_mni(args.factor)
    if args.crop:  # a central in-plane crop: fewer, narrower slices (busy or small machines)
        ci, cj = (int(v) for v in args.crop.split("x"))
        i0, j0 = (vol.shape[0] - ci) // 2, (vol.shape[1] - cj) // 2
        vol = vol.with_data(np.ascontiguousarray(vol.data[i0:i0 + ci, j0:j0 + cj]))
    if args.model:
        from medsr_dist.infer.model_file import build_model_backend, read_model_file
        from medsr_dist.storage import Storage

        import torch
        torch.set_num_threads(args.threads)
        backend = build_model_backend(read_model_file(args.model), "torch", Storage())
    else:
        backend = random_backend(args.threads)
    tile = TileSpec(tile=args.tile, overlap=args.overlap, batch_size=args.batch_size)
    plan = plan_reconstruction(vol, args.factor)
    slices = [s for b in plan.slice_axes for s in interpolated_slices(vol, plan, b)]
    pixels = sum(s.size for s in slices)
    print(f"volume {vol.shape} -> {plan.output_shape} (x{args.factor} along axis {plan.lr_axis}); "
          f"{len(slices)} slices, {pixels / 1e6:.1f} Mpx; backend {backend!r}; tile {tile}")
    for s in enhance_many(backend, slices[:4], tile):  # warm-up
        pass
    rows = []
    for r in range(args.repeat):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in enhance_many(backend, slices, tile):
            pass
        t2d, c2d = time.perf_counter() - t0, time.process_time() - c0
        for fusion in ("mean", "fourier"):
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            out = reconstruct(vol, backend, args.factor, tile=tile, fusion=fusion)
            tvol, cvol = time.perf_counter() - t0, time.process_time() - c0
            rows.append((r, fusion, t2d, tvol, c2d, cvol, out.data.size))
            del out
    # CPU seconds of this process (all threads) as well as wall seconds: on a shared machine the wall clock
    # measures the neighbours; the CPU-time ratio is the overhead of slicing, restacking and fusion
    print(f"{'run':>3} {'fusion':>8} {'2-D s':>7} {'vol s':>7} {'2-D cpu':>8} {'vol cpu':>8} {'out vox/s':>10} "
          f"{'vox/cpu-s':>10} {'ratio wall':>10} {'ratio cpu':>9}")
    for r, fusion, t2d, tvol, c2d, cvol, n in rows:
        print(f"{r:>3} {fusion:>8} {t2d:7.2f} {tvol:7.2f} {c2d:8.2f} {cvol:8.2f} {n / tvol:10.3g} {n / cvol:10.3g} "
              f"{t2d / tvol:10.3f} {c2d / cvol:9.3f}", flush=True)


def memory(args) -> None:
    from medsr_dist.mri.reconstruct import reconstruct
    from medsr_dist.mri.volume import Volume

    shape = tuple(int(v) for v in args.memory.split("x"))
    rng = np.random.default_rng(0)
    spacing = [1.0, 1.0, float(args.factor)]
    vol = Volume(rng.random(shape, dtype=np.float32) * 1000, np.diag([*spacing, 1.0]), source="bench")
    out_bytes = vol.data.size * args.factor * 4
    print(f"input {shape} ({vol.data.nbytes / 2**20:.0f} MiB) -> output ({out_bytes / 2**20:.0f} MiB float32)")
    for fusion in ("mean", "fourier"):
        gc.collect()
        tracemalloc.start()
        t0 = time.perf_counter()
        out = reconstruct(vol, Identity(), args.factor, fusion=fusion)
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"  {fusion:>8}: peak {peak / 2**20:7.0f} MiB = {peak / out_bytes:4.2f} x output "
              f"(incl. the returned volume), {seconds:.1f} s, identity backend")
        del out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--model", help="exported scale-1 model.pth "
                    "(default: random-weight MSRResNet x1 of configs/mri_psnr_x4.yaml)")
    ap.add_argument("--tile", type=int, default=0)
    ap.add_argument("--overlap", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--crop", help="IxJ central in-plane crop of the volume for the throughput run, e.g. 64x64")
    ap.add_argument("--memory", help="IxJxK thick input for the memory check (identity backend), e.g. 512x512x75")
    args = ap.parse_args()
    if args.memory:
        memory(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
