"""Peak memory of one nightly-job replica reconstructing a large thick-slice volume (issue goal: a 512 x 512 x 300
output volume with peak RSS <= 3 GB).

Runs, in this process, exactly what an EnhanceReplica actor runs for a volume row
(:class:`medsr_dist.enhance.volumes.VolumeReplicas`: ModelReplica + cross-plane reconstruction through the one engine,
output quantised to the source's int16) on a synthetic 512 x 512 x 75 int16 volume (1 x 1 x 4 mm) at x4, and
prints the process's peak RSS (``ru_maxrss``), wall time and output voxels per second. The model is a seeded tiny
RRDBNet x1 (the test suite's) unless ``--model`` names an exported scale-1 model (``--identity``: no network, the
volume pipeline alone); the model's activations are bounded by the tile (``--tile``), the volume's arrays by the
streaming reconstruction.

    python jobs/bench_mri_replica.py [--size 512 --slices 75 --factor 4 --tile 256 --model path/model.pth]
"""
from __future__ import annotations

import argparse
import json
import pickle
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=75)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--model", default=None, help="an exported scale-1 model.pth (default: a tiny RRDBNet x1)")
    ap.add_argument("--identity", action="store_true", help="an identity scale-1 backend instead of a network: the "
                    "volume pipeline's own memory and speed (engine, restacking, fusion, quantisation), no model")
    args = ap.parse_args()

    from scipy import ndimage

    from medsr_dist.config import load_config
    from medsr_dist.infer.model_file import read_model_file
    from medsr_dist.enhance.volumes import VolumeReplicas, unpack_stored
    from medsr_dist.mri.reconstruct import plan_reconstruction
    from medsr_dist.mri.volume import Volume

    tmp = Path(tempfile.mkdtemp(prefix="bench-mri-replica-"))
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from conftest import write_tiny_model

        write_tiny_model(lambda n, d: (tmp / n).write_bytes(d), scale=1, name="tiny-mri@bench")
        args.model = str(tmp / "model.pth")
    model = read_model_file(args.model)
    cfg = load_config(None, [f"enhance.tile={args.tile}", "enhance.tile_overlap=16", f"enhance.batch_size={args.batch_size}"])

    rng = np.random.default_rng(0)
    n, k = args.size, args.slices
    head = np.zeros((n, n, k), np.float32)
    x, y = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    for s in range(k):
        head[:, :, s] = ((x ** 2 + y ** 2) < 0.8 - 0.3 * (s / k - 0.5) ** 2) * (600 + 200 * np.sin(9 * x + s / 7))
    head = np.rint(ndimage.gaussian_filter(head + 20 * rng.random(head.shape, np.float32), (1, 1, 0))).astype(np.int16)
    volume = Volume(head, np.diag([1.0, 1.0, 4.0, 1.0]), source="bench", stored_dtype=np.int16)
    plan = plan_reconstruction(volume, args.factor)
    meta = {"lr_axis": plan.lr_axis, "factor": plan.factor, "fusion": "mean", "profile": "gaussian",
            "input_shape": list(plan.input_shape), "output_shape": list(plan.output_shape), "model_uri": args.model,
            "model_sha256": model.sha256, "model_name": model.name}
    row = {"pixels": volume.data[None], "header": pickle.dumps(volume.with_data(np.zeros((1, 1, 1), np.float32))),
           "meta": json.dumps(meta), "seconds": 0.0}
    del head
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    replicas = VolumeReplicas(None, cfg.storage, cfg.enhance, "fp32")
    if args.identity:
        from medsr_dist.infer.replica import EngineSettings, ModelReplica

        class Identity:
            scale, size_multiple, precision = 1, 1, "fp32"

            def __call__(self, batch):
                return batch

        replicas.loaded[model.sha256] = ModelReplica(None, Identity(), EngineSettings.of(cfg.enhance, outscale=None))
    out = replicas.enhance(row)
    seconds = time.perf_counter() - t0
    stored = unpack_stored(out["output"], np.int16, plan.output_shape)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "input_shape": list(plan.input_shape), "output_shape": list(plan.output_shape),
        "model": "identity" if args.identity else model.name, "tile": args.tile, "batch_size": args.batch_size,
        "rss_before_mib": round(before), "peak_rss_mib": round(peak), "seconds": round(seconds, 1),
        "output_voxels_per_s": round(plan.output_voxels / seconds), "stored_dtype": str(stored.dtype),
    }, indent=2))


if __name__ == "__main__":
    main()
