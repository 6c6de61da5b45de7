"""Reproduce docs/RESULTS.md: imported RealESRGAN_x4plus vs the same model briefly fine-tuned on synthetic
radiographs vs bicubic, under the `nih-x4` protocol, on held-out synthetic radiographs.

    python jobs/reproduce_results.py --imported weights/RealESRGAN_x4plus/model.pth \\
        --finetuned runs/x4plus-ft/train/export/model.pth [--root ./repro-run] [--size 256] [--images 16] [key=value ...]
    python jobs/reproduce_results.py --imported weights/RealESRGAN_x4plus/model.pth --finetune-iterations 40

    ray job submit --address http://<head>:8265 --working-dir . -- python jobs/reproduce_results.py ...

Model paths are model files as `medsr weights import-ncnn` and `medsr train` write them (model.pth with
meta.json beside), or plain BasicSR RRDBNet checkpoints. ``--finetuned`` may be left out (imported vs bicubic
only), or made here by ``--finetune-iterations N``: a brief fine-tune of the imported model on a synthetic
archive with the ordinary prepare and train stages (:data:`FINETUNE_OVERRIDES`). The held-out images are
made here with seeds that the training archive generator never uses (``make_radiograph(20_000_000 + k)``;
``write_sample_archive`` uses ``seed * 100_003 + i``), written as
16-bit PNGs, and evaluated with ``configs/eval_nih-x4.yaml``. ``--size 1024`` is the protocol at full
scale (1024 x 1024 ground truth); smaller sizes lift the protocol's 1024 x 1024 check
(``eval.params.source_size``) and say so in the report. Trailing ``key=value`` arguments are config
overrides (e.g. ``eval.tile=256 eval.precision=fp16``).

Prints the results table and the report location; the report is ``<root>/eval/nih-x4/report.html``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the working dir holds medsr_dist/

HELDOUT_SEED = 20_000_000


def write_heldout(folder: str, n_images: int, size: int) -> list[str]:
    """``n_images`` synthetic radiographs of ``size`` x ``size`` as 16-bit PNGs under ``folder``; returns the keys."""
    from medsr_dist.data.synthetic import make_radiograph
    from medsr_dist.io.image import ImageMeta, encode_image
    from medsr_dist.storage import Storage

    storage = Storage()
    meta = ImageMeta(format="png", dtype="uint16", bits_stored=16, channels=1, photometric="MONOCHROME2")
    keys = []
    for k in range(n_images):
        key = storage.join(folder, f"heldout_{k:03d}.png")
        storage.write_bytes(key, encode_image(make_radiograph(HELDOUT_SEED + k, size)[:, :, None], meta))
        keys.append(key)
    return keys


#: The brief fine-tune (``--finetune-iterations``): the recipe of tests/test_finetune_x4plus.py, longer. No
#: perceptual loss: ImageNet VGG19 cannot be downloaded here, and a random VGG would only add noise.
FINETUNE_OVERRIDES = [
    "run.name=x4plus-ft", "sample.n_images=24", "prepare.rows_per_shard=8",
    "prepare.split={train: 0.75, val: 0.25, test: 0.0}", "degradation.gt_size=64", "degradation.shuffle_buffer=8",
    "model.scale=4", "model.generator={num_feat: 64, num_block: 23, num_grow_ch: 32}", "model.discriminator.num_feat=32",
    "train.num_workers=2", "train.batch_size=2", "train.lr_g=1.0e-4", "train.ema_decay=0.9",
    "model.losses.perceptual_weight=0", "model.losses.gan_weight=0.1", "train.vgg.weights=random-init-for-testing",
]


def finetune(imported: str, root: str, iterations: int, size: int, overrides: list[str] = ()) -> str:
    """Fine-tune the imported model briefly on a synthetic radiograph archive; returns the exported model.pth.

    The archive (``write_sample_archive``, seeds ``i`` < 24) is disjoint from the held-out images. Uses the
    ordinary stages (prepare, Ray Train); Ray must be initialised. ``overrides`` (e.g. the command line's
    ``ray.*`` ones) apply to the fine-tuning config.
    """
    from rich.console import Console

    from medsr_dist.config import load_config
    from medsr_dist.data.synthetic import write_sample_archive
    from medsr_dist.pipeline import run_prepare, run_train
    from medsr_dist.storage import Storage

    ft_root = Storage.join(root, "finetune")
    cfg = load_config(None, [f"run.root={ft_root}", *FINETUNE_OVERRIDES, f"sample.size={size}",
                             f"model.pretrained_g={imported}", f"train.iterations={iterations}",
                             f"train.checkpoint_every={iterations}", f"train.val_every={iterations}", *overrides])
    storage = Storage(cfg.storage)
    write_sample_archive(lambda key, data: storage.write_bytes(storage.join(cfg.sample.archive, key), data),
                         n_images=cfg.sample.n_images, size=size, seed=cfg.run.seed)
    console = Console(stderr=True)
    from medsr_dist.data.prepare import use_demo_group_secret

    use_demo_group_secret()  # the synthetic archive's patients need a secret for their pseudonyms; no real one needed
    run_prepare(cfg, console)
    return run_train(cfg, console).export


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imported", required=True, help="RealESRGAN_x4plus as imported (model.pth)")
    parser.add_argument("--finetuned", help="the same model after fine-tuning on synthetic radiographs (model.pth)")
    parser.add_argument("--finetune-iterations", type=int, default=0,
                        help="without --finetuned: fine-tune the imported model this many iterations first (CPU: ~40)")
    parser.add_argument("--root", default="./repro-run", help="where the held-out images and the report go")
    parser.add_argument("--size", type=int, default=256, help="side of the held-out images (1024: full scale)")
    parser.add_argument("--images", type=int, default=16, help="number of held-out images")
    parser.add_argument("--config", default=str(REPO / "configs" / "eval_nih-x4.yaml"))
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)

    from medsr_dist.config import load_config
    from medsr_dist.eval.evaluate import plan_evaluation, run_evaluation
    from medsr_dist.eval.plan import describe_plan
    from medsr_dist.runtime import init_ray
    from medsr_dist.storage import Storage

    heldout = Storage.join(args.root, "heldout")
    write_heldout(heldout, args.images, args.size)
    if not args.finetuned and args.finetune_iterations:
        init_ray(load_config(args.config, [f"run.root={args.root}", *args.overrides]))
        t0 = time.perf_counter()
        ray_overrides = [o for o in args.overrides if o.startswith(("ray.", "storage."))]
        args.finetuned = finetune(args.imported, args.root, args.finetune_iterations, args.size, ray_overrides)
        print(f"fine-tuned {args.finetune_iterations} iterations in {time.perf_counter() - t0:.0f} s: {args.finetuned}")
    models = [{"name": "bicubic", "source": "bicubic", "baseline": True},
              {"name": "RealESRGAN_x4plus (imported)", "source": args.imported}]
    if args.finetuned:
        models.append({"name": "x4plus fine-tuned (synthetic CXR)", "source": args.finetuned})
    overrides = [f"run.root={args.root}", f"eval.dataset={heldout}", "eval.split=null",
                 f"eval.models={json.dumps(models)}", f"eval.output={Storage.join(args.root, 'eval', 'nih-x4')}"]
    if args.size != 1024:
        overrides.append(f"eval.params.source_size={args.size}")
    cfg = load_config(args.config, [*overrides, *args.overrides])
    plan = plan_evaluation(cfg)
    print(describe_plan(plan))
    init_ray(cfg)
    t0 = time.perf_counter()
    result = run_evaluation(cfg, plan=plan)
    print(f"\nevaluated {len(plan.items)} image(s) x {len(plan.models)} model(s) at {args.size}x{args.size} "
          f"in {time.perf_counter() - t0:.0f} s\n")
    print(Storage().read_bytes(result.files["results.md"]).decode())
    print(f"report: {result.files['report.html']}")
    return result.report


if __name__ == "__main__":
    main()
