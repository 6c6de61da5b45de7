"""`medsr mri ...`: 3-D MRI volumes (medsr_dist/mri): prepare slice pairs, reconstruct a volume, self-supervised SR.

The MRI knobs are the config tree's ``mri:`` section (:class:`~medsr_dist.config.MriConfig`); an option given here
overrides its key, and the result is validated with the config before Ray starts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from medsr_dist.cli.common import ConfigOpt, FailOnErrorOpt, OverridesArg, _fail, _load, console
from medsr_dist.config import ConfigError, MriConfig, check_through_plane_model
from medsr_dist.runtime import init_ray

mri_app = typer.Typer(help="3-D MRI: isotropic reconstruction of thick-slice volumes (slice pairs, training, "
                           "reconstruction)", no_args_is_help=True)

ModeOpt = typer.Option(None, "--mode", help="supervised (isotropic volumes, six pairings) or self (SMORE) "
                       "[default: mri.mode]")
FactorOpt = typer.Option(None, "--factor", "-k", help="Slice-thickness factor k: output spacing = input spacing / k, "
                         "need not be an integer [default: mri.factor]")
ProfileOpt = typer.Option(None, "--profile", help="Slice profile of the thick slices: estimate (from the volume itself; "
                          "supervised pairs: gaussian), box or gaussian [default: mri.profile]")
FusionOpt = typer.Option(None, "--fusion", help="Fusion of the two refined orientations: mean or fourier "
                         "[default: mri.fusion]")
OutputOpt = typer.Option(..., "--output", "-o", help="Output .nii/.nii.gz, or a folder for a derived DICOM series")


def _mri(cfg, **values) -> MriConfig:
    """``cfg.mri`` with the options given on the command line (None = not given) applied and validated."""
    try:
        return MriConfig(**{**cfg.mri.model_dump(), **{k: v for k, v in values.items() if v is not None}})
    except ValidationError as exc:
        problems = "; ".join(f"--{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        console.print(f"[bold red]option error:[/] {problems}", highlight=False)
        raise typer.Exit(2) from None


@mri_app.command("prepare")
def prepare(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
            mode: str = ModeOpt, factor: float = FactorOpt, profile: str = ProfileOpt,
            skip_empty: Optional[float] = typer.Option(None, "--skip-empty", help="Drop pairs with at most this "
                                                       "foreground fraction [default: mri.skip_empty]"),
            fail_on_error: bool = FailOnErrorOpt) -> None:
    """prepare.input volumes -> slice-pair Parquet (prepare.output) for `medsr train` with a scale-1 model."""
    from medsr_dist.mri.prepare import prepare_slice_pairs  # lazy: stage code, not loaded by --help

    cfg = _load(config, overrides, "prepare")
    mri = _mri(cfg, mode=mode, factor=factor, profile=profile, skip_empty=skip_empty)
    try:
        check_through_plane_model(cfg)  # the model these pairs train, refused before Ray starts
    except ConfigError as exc:
        console.print(f"[bold red]config error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    init_ray(cfg)
    try:
        result = prepare_slice_pairs(cfg, mri)
    except FileNotFoundError as exc:
        _fail(exc)
    console.print(f"  slice pairs per split: {result.counts}  volume groups per split: {result.patients}")
    for err in result.errors:
        console.print(f"  [yellow]skipped[/] {err['key']}: {err['error']}", highlight=False)
    if fail_on_error and result.errors:
        raise typer.Exit(1)


@mri_app.command("reconstruct")
def reconstruct(volume: str = typer.Argument(..., help="Thick-slice .nii/.nii.gz, or a folder with one DICOM series"),
                output: str = OutputOpt,
                model: str = typer.Option(..., "--model", "-m", help="Exported scale-1 model (model.pth with meta.json)"),
                config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
                factor: float = FactorOpt, fusion: str = FusionOpt, profile: str = ProfileOpt) -> None:
    """Refine every through-plane slice of VOLUME with MODEL and write the isotropic volume (+ provenance JSON)."""
    from medsr_dist.mri.job import reconstruct_volume  # lazy: stage code, not loaded by --help
    from medsr_dist.mri.volume import VolumeError  # lazy: stage code, not loaded by --help

    cfg = _load(config, overrides)
    mri = _mri(cfg, factor=factor, fusion=fusion, profile=profile)
    try:
        result = reconstruct_volume(cfg, mri, volume, output, model)
    except (VolumeError, FileNotFoundError, ValueError) as exc:
        _fail(exc)
    p = result.provenance
    console.print(f"  {p['input_shape']} -> {p['output_shape']} at {p['output_spacing_mm']} mm; consistency "
                  f"{p['consistency_psnr_db']} dB; written {result.output}", highlight=False)


@mri_app.command("self-sr")
def self_sr(volume: str = typer.Argument(..., help="Thick-slice .nii/.nii.gz, or a folder with one DICOM series"),
            output: str = OutputOpt, config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
            factor: float = FactorOpt, fusion: str = FusionOpt, profile: str = ProfileOpt) -> None:
    """Self-supervised SR of VOLUME alone: its in-plane slices -> pairs -> training (train.iterations) -> reconstruction."""
    from medsr_dist.pipeline.mri_self_sr import self_sr as run_self_sr  # lazy: stage code, not loaded by --help
    from medsr_dist.mri.volume import VolumeError  # lazy: stage code, not loaded by --help

    cfg = _load(config, overrides)
    mri = _mri(cfg, mode="self", factor=factor, fusion=fusion, profile=profile)
    if cfg.model.scale != 1:
        console.print(f"[bold red]config error:[/] model.scale: self-sr trains a scale-1 refinement network "
                      f"(got {cfg.model.scale}); see configs/mri_psnr_x4.yaml", highlight=False)
        raise typer.Exit(2)
    try:
        result, summary = run_self_sr(cfg, mri, volume, output)
    except (VolumeError, FileNotFoundError, ValueError) as exc:
        _fail(exc)
    console.print(f"  pairs {summary['pairs']}, {summary['iterations']} iterations (training CPU s "
                  f"{summary['train_cpu_seconds']}, wall s {summary['train_wall_seconds']}), "
                  f"export {summary['export']}",
                  highlight=False)
    console.print(json.dumps(result.provenance, indent=2), highlight=False)
