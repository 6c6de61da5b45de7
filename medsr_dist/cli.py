"""`medsr` command line: one command per stage, each taking ``--config`` plus ``key=value`` overrides.

The config is loaded and validated (and local inputs checked) before Ray starts, so a typo costs
seconds, not a cluster start-up.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from medsr_dist.config import ConfigError, MedsrConfig, dump_config, load_config

app = typer.Typer(
    help="medsr-dist: distributed training and batch inference of medical image super-resolution on Ray.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML run config (configs/*.yaml); defaults when omitted")
OverridesArg = typer.Argument(None, help="Config overrides as key=value, e.g. train.iterations=10 model.scale=2")
FailOnErrorOpt = typer.Option(False, "--fail-on-error", help="Exit with status 1 when any input file could not be read")


def _load(config: Optional[Path], overrides: Optional[list[str]], stage: str | None = None) -> MedsrConfig:
    # lazy: preflight reads the backend registry and model files (torch); `medsr --help` stays free of them
    from medsr_dist.preflight import preflight

    try:
        return preflight(load_config(config, overrides or []), stage)
    except ConfigError as exc:
        console.print(f"[bold red]config error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level")) -> None:
    _setup_logging(verbose)


@app.command("config")
def show_config(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Validate a config and print it with every default filled in."""
    typer.echo(dump_config(_load(config, overrides)))


@app.command()
def prepare(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
            fail_on_error: bool = FailOnErrorOpt) -> None:
    """Archive on the store -> sharded Parquet dataset with a patient-level train/val/test split."""
    from medsr_dist.pipeline import run_prepare

    from medsr_dist.data.prepare import GroupSecretError

    cfg = _load(config, overrides, "prepare")
    try:
        result = run_prepare(cfg, console)
    except GroupSecretError as exc:
        console.print(f"[bold red]prepare error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    if result.n_errors and (fail_on_error or cfg.prepare.fail_on_error):
        raise typer.Exit(1)


@app.command()
def train(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Train (or resume) a model with Ray Train on the degraded stream of a prepared dataset."""
    from medsr_dist.pipeline import run_train

    run_train(_load(config, overrides, "train"), console)


# enhance: medsr_dist/cli_infer.py


@app.command()
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

    from medsr_dist.data.degrade import preview_grid
    from medsr_dist.io.image import ImageDecodeError, decode_image, single_frame_pixels
    from medsr_dist.storage import Storage, StorageError

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


@app.command()
def demo(config: Optional[Path] = typer.Option(
            Path(__file__).resolve().parent.parent / "configs" / "demo.yaml" if (Path(__file__).resolve().parent.parent / "configs" / "demo.yaml").exists() else None,
            "--config", "-c", help="Demo config (default: configs/demo.yaml)"),
         overrides: Optional[list[str]] = OverridesArg,
         pretrain_config: Optional[Path] = typer.Option(
            Path(__file__).resolve().parent.parent / "configs" / "demo_psnr.yaml" if (Path(__file__).resolve().parent.parent / "configs" / "demo_psnr.yaml").exists() else None,
            "--pretrain-config", help="First training stage whose export starts the second (default: configs/demo_psnr.yaml)"),
         no_pretrain: bool = typer.Option(False, "--no-pretrain", help="Train only the --config stage, from random weights"),
         ray_log: bool = typer.Option(True, "--ray-log/--ray-output", help="Ray's own output to <run.root>/logs/ray.log "
                                      "(default) or to the terminal")) -> None:
    """Whole pipeline on a local Ray: sample archive -> prepare -> train (psnr stage, then GAN stage) -> enhance -> report.

    The overrides apply to both training stages' configs."""
    from medsr_dist.pipeline import run_demo

    cfg = _load(config, overrides)
    pretrain = None if no_pretrain or pretrain_config is None else _load(pretrain_config, overrides)
    run_demo(cfg, console, pretrain=pretrain, quiet_ray=ray_log)


# ---- command groups living in their own modules (each module defines a typer app or commands) ----
# weights (model zoo, ncnn import): medsr_dist/cli_weights.py
from medsr_dist.cli_weights import weights_app  # noqa: E402
app.add_typer(weights_app, name="weights")
# export / status (inference side): medsr_dist/cli_infer.py
import medsr_dist.cli_infer  # noqa: E402,F401
# eval (evaluation protocols): medsr_dist/cli_eval.py
import medsr_dist.cli_eval  # noqa: E402,F401
import medsr_dist.cli_mri  # noqa: E402,F401  (mri: 3-D volumes, medsr_dist/cli_mri.py)
import medsr_dist.cli_serve  # noqa: E402,F401  (serve: the on-demand endpoint, medsr_dist/cli_serve.py)


def entrypoint() -> None:  # pragma: no cover - console script shim
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    app()
