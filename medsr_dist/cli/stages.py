"""The pipeline's stage commands: `medsr config`, `prepare`, `train`, `degrade` and `demo`, each taking ``--config``
plus ``key=value`` overrides.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medsr_dist.cli.common import ConfigOpt, FailOnErrorOpt, OverridesArg, _fail, _load, console
from medsr_dist.config import dump_config
from medsr_dist.storage import Storage, StorageError

stages_app = typer.Typer()

#: The repository's configs/ folder, where `medsr demo` finds its default configs (absent in an installed wheel).
_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@stages_app.command("config")
def show_config(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Validate a config and print it with every default filled in."""
    typer.echo(dump_config(_load(config, overrides)))


@stages_app.command()
def prepare(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
            fail_on_error: bool = FailOnErrorOpt) -> None:
    """Archive on the store -> sharded Parquet dataset with a patient-level train/val/test split."""
    from medsr_dist.pipeline import run_prepare  # lazy: stage code, not loaded by --help
    from medsr_dist.data.prepare import GroupSecretError  # lazy: stage code, not loaded by --help

    cfg = _load(config, overrides, "prepare")
    try:
        result = run_prepare(cfg, console)
    except GroupSecretError as exc:
        console.print(f"[bold red]prepare error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    if result.n_errors and (fail_on_error or cfg.prepare.fail_on_error):
        raise typer.Exit(1)


@stages_app.command()
def train(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Train (or resume) a model with Ray Train on the degraded stream of a prepared dataset."""
    from medsr_dist.pipeline import run_train  # lazy: stage code, not loaded by --help
    from medsr_dist.train.guard import TrainingCollapsed  # lazy: stage code, not loaded by --help

    try:
        run_train(_load(config, overrides, "train"), console)
    except TrainingCollapsed as exc:  # the guard's message names what collapsed; no traceback
        _fail(exc)


@stages_app.command()
def degrade(
    image: str = typer.Argument(..., help="Image to degrade (path or URI; PNG/JPEG/TIFF/DICOM)"),
    output: Path = typer.Option(Path("degradation-preview.png"), "--output", "-o", help="Preview grid PNG to write"),
    n: int = typer.Option(15, "--n", min=1, help="Number of degradations"),
    seed: int = typer.Option(0, "--seed", help="Seed (crop position and samples)"),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Write a preview grid of N second-order degradations of one image (ground-truth crop first)."""
    import cv2

    from medsr_dist.data.degrade import preview_grid  # lazy: imports torch
    from medsr_dist.io.image import ImageDecodeError, decode_image, single_frame_pixels  # lazy: image codecs

    cfg = _load(config, overrides)
    try:
        pixels = single_frame_pixels(decode_image(Storage(cfg.storage).read_bytes(image), image), image, "previews")
    except (ImageDecodeError, StorageError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    grid = preview_grid(pixels[:, :, :3], cfg.degradation, cfg.model.scale, n=n, seed=seed)
    if not cv2.imwrite(str(output), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        console.print(f"[bold red]error:[/] could not write {output}")
        raise typer.Exit(1)
    console.print(f"wrote {output} ({n} degradations at x{cfg.model.scale}, gt_size {cfg.degradation.gt_size})")


@stages_app.command()
def demo(config: Optional[Path] = typer.Option(
            _CONFIGS / "demo.yaml" if (_CONFIGS / "demo.yaml").exists() else None,
            "--config", "-c", help="Demo config (default: configs/demo.yaml)"),
         overrides: Optional[list[str]] = OverridesArg,
         pretrain_config: Optional[Path] = typer.Option(
            _CONFIGS / "demo_psnr.yaml" if (_CONFIGS / "demo_psnr.yaml").exists() else None,
            "--pretrain-config", help="First training stage whose export starts the second (default: configs/demo_psnr.yaml)"),
         no_pretrain: bool = typer.Option(False, "--no-pretrain", help="Train only the --config stage, from random weights"),
         ray_log: bool = typer.Option(True, "--ray-log/--ray-output", help="Ray's own output to <run.root>/logs/ray.log "
                                      "(default) or to the terminal")) -> None:
    """Whole pipeline on a local Ray: sample archive -> prepare -> train (psnr stage, then GAN stage) -> enhance -> report.

    The overrides apply to both training stages' configs."""
    from medsr_dist.pipeline import run_demo  # lazy: stage code, not loaded by --help

    cfg = _load(config, overrides)
    pretrain = None if no_pretrain or pretrain_config is None else _load(pretrain_config, overrides)
    run_demo(cfg, console, pretrain=pretrain, quiet_ray=ray_log)
