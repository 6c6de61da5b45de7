"""Real images only, available offline: does the small-archive recipe (configs/finetune_x4plus_psnr.yaml) beat
bicubic and RealESRGAN_x4plus on real modalities it never saw?

    medsr weights import-ncnn --from-package --output weights/RealESRGAN_x4plus/model.pth
    python jobs/real_images.py --imported weights/RealESRGAN_x4plus/model.pth [--root ./real-run] \\
        [--iterations 400] [--crop 128] [--per-source 24] [--spread 1] [key=value ...]
    python jobs/real_images.py --imported ... --iterations 2 --crop 64 --per-source 2   # smoke size

Sources (every one ships in a package of the test extra or the runtime, nothing is downloaded):

- ``fundus``: skimage's retina photograph (1411 x 1411 RGB), and its microaneurysms crop (102 x 102 gray);
- ``mr-template``: axial and coronal slices of nilearn's MNI152 T1 template;
- ``mr-volume``: axial and coronal slices of dipy's aniso_vox.nii.gz (a real T1 acquisition);
- ``ct`` / ``mr-dicom``: pydicom's CT and MR test files (CT_small, MR_small, ...);
- ``us``: pydicom's ultrasound test file stored losslessly (examples_jpeg2k.dcm: 640 x 480, a lymph node with its
  burnt-in annotations; the other US files are lossy JPEG or a mostly empty palette sector);
- ``ct-head``: pydicom's J2K_pixelrep_mismatch.dcm, an axial head CT of 512 x 512 (13 bits, JPEG 2000 lossless);
- ``mr-abdomen``: pydicom's examples_overlay.dcm, an axial abdominal MR of 300 x 484 (12 bits, uncompressed; its
  overlay plane is not burnt into the pixels).

Cross-modality split (``--train`` / ``--test``, default: train on fundus + mr-template, test on ct + mr-volume +
mr-dicom): the fine-tune never sees a test modality. Training images are ``--crop``-px crops of the train sources
(``--per-source`` each, strided), written as 16-bit PNGs (8-bit sources: exact), prepared and trained with the
recipe (patient-level split by file name, its val split choosing the best export); the test images are crops of
the test sources, evaluated under ``bicubic-x4`` (MATLAB bicubic BI x4, Y channel, crop border 4) with bicubic
(the baseline), the imported x4plus and the recipe's best export. Paired bootstrap intervals are the report's.

Prints the table (markdown: what docs/RESULTS.md quotes), the command, the wall time of the fine-tune and of the
whole run, and CPU time: the training worker's own (``worker_cpu_seconds`` of its metrics) and this driver's; the
other Ray workers (prepare, degradation actor, eval) are not counted.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the working dir holds medsr_dist/

SOURCES = ("fundus", "mr-template", "mr-volume", "ct", "mr-dicom", "us", "ct-head", "mr-abdomen")


def _unit(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float64)
    low, high = np.percentile(image, [0.5, 99.5])
    return np.clip((image - low) / max(high - low, 1e-9), 0, 1)


def _volume_slices(path: Path, spread: int = 1) -> list[np.ndarray]:
    """Axial and coronal slices at the centre and +-8 voxels (``spread`` 1: six slices); ``spread`` k > 1 also takes
    sagittal slices and offsets every 8 voxels out to +-8k (clipped to the volume): more anatomy, same volume."""
    import nibabel as nib

    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
    while data.ndim > 3:
        data = data[..., 0]
    i, j, k = (n // 2 for n in data.shape)
    slices = []
    for offset in range(-8 * spread, 8 * spread + 1, 8):
        if abs(offset) < min(data.shape) // 2:
            slices.append(np.rot90(data[:, :, k + offset]))
            slices.append(np.rot90(data[:, j + offset, :]))
            if spread > 1:
                slices.append(np.rot90(data[i + offset, :, :]))
    return [_unit(s) for s in slices]


def source_images(name: str, spread: int = 1) -> list[np.ndarray]:
    """Real images of one source, float64 (H, W[, 3]) in [0, 1]; ``spread`` > 1 takes more slices of a volume."""
    if name == "fundus":
        from skimage import data

        return [data.retina().astype(np.float64) / 255, data.microaneurysms().astype(np.float64) / 255]
    if name in ("mr-template", "mr-volume"):
        from medsr_dist.mri.sample_data import sample_volume_path

        return _volume_slices(sample_volume_path("mni152_t1" if name == "mr-template" else "aniso_vox"), spread)
    import pydicom
    from pydicom.data import get_testdata_file

    files = {"ct": ["CT_small.dcm"], "mr-dicom": ["MR_small.dcm", "MR_small_RLE.dcm"],
             "us": ["examples_jpeg2k.dcm"], "ct-head": ["J2K_pixelrep_mismatch.dcm"],
             "mr-abdomen": ["examples_overlay.dcm"]}[name]
    out = []
    for f in files:
        path = get_testdata_file(f)
        if path:
            out.append(_unit(pydicom.dcmread(path).pixel_array))  # pydicom converts YBR_RCT to RGB
    return out


def crops(images: list[np.ndarray], crop: int, count: int) -> list[tuple[int, np.ndarray]]:
    """Up to ``count`` (image index, crop) of ``crop`` px, strided over the images (each image at least once;
    images smaller than the crop are used whole, modcropped to a multiple of 4)."""
    out: list[tuple[int, np.ndarray]] = []
    per_image = max(1, count // max(len(images), 1))
    for k, image in enumerate(images):
        h, w = image.shape[:2]
        if min(h, w) < 32:  # e.g. the 24 thick slices of aniso_vox seen edge-on: too few pixels for x4
            continue
        if min(h, w) < crop:
            out.append((k, image[: h - h % 4, : w - w % 4]))
            continue
        side = max(1, int(np.ceil(np.sqrt(per_image))))
        ys = np.linspace(0, h - crop, side).astype(int)
        xs = np.linspace(0, w - crop, side).astype(int)
        cells = sorted({(int(y), int(x)) for y in ys for x in xs})[:per_image]  # a small image: one crop
        out += [(k, image[y:y + crop, x:x + crop]) for y, x in cells]
    return out[:count]


def write_pngs(folder: Path, prefix: str, images: list[tuple[int, np.ndarray]]) -> list[str]:
    """16-bit PNGs named ``<prefix>-<image>_<crop>.png``: prepare's default file-name pattern groups the crops of
    one image, so the val split holds whole images the training never saw."""
    from medsr_dist.io.image import ImageMeta, encode_image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k, (index, image) in enumerate(images):
        image = image if image.ndim == 3 else image[:, :, None]
        channels = image.shape[2]
        meta = ImageMeta(format="png", dtype="uint16", bits_stored=16, channels=channels,
                         photometric="RGB" if channels == 3 else "MONOCHROME2")
        name = f"{prefix}-{index:02d}_{k:03d}.png"
        (folder / name).write_bytes(encode_image(np.ascontiguousarray(image, dtype=np.float32), meta))
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imported", required=True, help="RealESRGAN_x4plus as imported (model.pth)")
    parser.add_argument("--root", default="./real-run")
    parser.add_argument("--train", default="fundus,mr-template", help="train sources (comma-separated)")
    parser.add_argument("--test", default="ct,mr-volume,mr-dicom", help="test sources, unseen in training")
    parser.add_argument("--iterations", type=int, default=400, help="fine-tune iterations (the recipe's: 400)")
    parser.add_argument("--crop", type=int, default=128, help="side of the training and test crops")
    parser.add_argument("--per-source", type=int, default=24, help="training crops per source")
    parser.add_argument("--test-per-source", type=int, default=24, help="test crops per source")
    parser.add_argument("--spread", type=int, default=1,
                        help="slices of a training volume: 1 = six (axial, coronal at 0, +-8); k = three orientations "
                             "every 8 voxels to +-8k")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (the fine-tune's and eval's)")
    args = parser.parse_args(argv)
    train_sources, test_sources = args.train.split(","), args.test.split(",")
    unknown = sorted(set(train_sources + test_sources) - set(SOURCES))
    if unknown or set(train_sources) & set(test_sources):
        parser.error(f"sources are {SOURCES}; train and test must be disjoint (got {train_sources} / {test_sources})")

    from rich.console import Console

    from medsr_dist.config import load_config
    from medsr_dist.data.prepare import use_demo_group_secret
    from medsr_dist.eval.evaluate import plan_evaluation, run_evaluation
    from medsr_dist.pipeline import run_prepare, run_train
    from medsr_dist.runtime import init_ray
    from medsr_dist.train.loop import best_export_uri

    t_start, cpu_start = time.perf_counter(), time.process_time()
    use_demo_group_secret()  # public sample images, no patients: the published secret only names their crops
    root = Path(args.root).resolve()
    archive, test_dir = root / "archive", root / "test"
    for s in train_sources:
        write_pngs(archive, s, crops(source_images(s, args.spread), args.crop, args.per_source))
    for s in test_sources:  # the test set does not depend on --per-source/--spread: runs stay comparable
        write_pngs(test_dir, s, crops(source_images(s), args.crop, args.test_per_source))
    n_train, n_test = len(list(archive.iterdir())), len(list(test_dir.iterdir()))

    every = max(1, args.iterations // 4)
    cfg = load_config(REPO / "configs" / "finetune_x4plus_psnr.yaml", [
        f"run.root={root}", f"prepare.input={archive}", f"prepare.output={root / 'dataset'}",
        f"train.dataset={root / 'dataset'}", f"train.output={root / 'train-psnr'}", f"model.pretrained_g={args.imported}",
        "prepare.split={train: 0.8, val: 0.2, test: 0.0, group_by: filename}",
        f"prepare.subimages.crop_size={min(128, args.crop)}", f"prepare.subimages.step={min(64, args.crop // 2)}",
        f"degradation.gt_size={min(64, args.crop)}", f"train.iterations={args.iterations}",
        f"train.val_every={every}", f"train.checkpoint_every={every}", f"train.log_every={every}", "ray.progress=false",
        *[o for o in args.overrides if not o.startswith("eval.")],
    ])
    console = Console(stderr=True)
    init_ray(cfg)
    run_prepare(cfg, console)
    t0 = time.perf_counter()
    trained = run_train(cfg, console)
    train_wall = time.perf_counter() - t0
    train_cpu = float(trained.metrics.get("worker_cpu_seconds", float("nan")))
    best = f"{best_export_uri(cfg)}/model.pth"
    finetuned = best if Path(best).is_file() else trained.export

    models = [{"name": "bicubic", "source": "bicubic", "baseline": True},
              {"name": "x4plus", "source": args.imported},
              {"name": "x4plus fine-tuned (recipe)", "source": finetuned}]
    eval_cfg = load_config(REPO / "configs" / "eval_bicubic-x4.yaml", [
        f"run.root={root}", f"eval.dataset={test_dir}", "eval.split=null", f"eval.models={json.dumps(models)}",
        f"eval.output={root / 'eval'}", "ray.progress=false", "eval.lpips.enabled=false",
        *[o for o in args.overrides if o.startswith(("eval.", "ray."))],
    ])
    result = run_evaluation(eval_cfg, plan=plan_evaluation(eval_cfg))
    report = result.report
    driver_cpu = time.process_time() - cpu_start
    lines = [f"Train: {', '.join(train_sources)} ({n_train} crops of {args.crop} px); test: {', '.join(test_sources)} "
             f"({n_test} crops, never seen); bicubic-x4 (MATLAB bicubic BI x4, Y channel, crop border 4); "
             f"{args.iterations} fine-tune iterations.", "",
             "| model | PSNR (dB) | Δ PSNR vs bicubic [95% CI] | HaarPSI | Δ HaarPSI [95% CI] | SSIM |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in models:
        s, c = report["summary"][m["name"]], report["comparisons"].get(m["name"], {})

        def delta(metric: str, digits: int) -> str:
            d = c.get(metric)
            if not d:
                return "–"
            return f"{d['mean_difference']:+.{digits}f} [{d['ci_low']:+.{digits}f}, {d['ci_high']:+.{digits}f}]"

        lines.append(f"| {m['name']} | {s['psnr']['mean']:.2f} | {delta('psnr', 2)} | {s['haarpsi']['mean']:.4f} | "
                     f"{delta('haarpsi', 4)} | {s['ssim']['mean']:.4f} |")
    lines += ["", f"Command: `python jobs/real_images.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
              f"Fine-tune: {train_wall:.0f} s wall, {train_cpu:.0f} CPU-s in the training worker (its own clock; the "
              f"degradation actor's and Ray's CPU are not in it); whole run {time.perf_counter() - t_start:.0f} s wall, "
              f"this driver {driver_cpu:.0f} CPU-s."]
    text = "\n".join(lines)
    (root / "real_results.md").write_text(text + "\n")
    print(text)
    print(f"report: {result.files['report.html']}")
    return report


if __name__ == "__main__":
    main()
