"""`medsr eval`: evaluate models under a paper's protocol (Ray Data) and write the report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from medsr_dist.cli.common import ConfigOpt, OverridesArg, _load, console
from medsr_dist.config import MedsrConfig
from medsr_dist.runtime import init_ray
from medsr_dist.storage import Storage, StorageError

eval_app = typer.Typer()

FailOnErrorOpt = typer.Option(False, "--fail-on-error", help="Exit with status 1 when any (image, model) cell is an error")
ModelOpt = typer.Option(
    None, "--model", "-m",
    help="NAME=SOURCE, appended to eval.models (SOURCE: bicubic, a model.pth, or a zoo name); repeatable",
)


def _with_models(config: Optional[Path], overrides: list[str], models: list[str]) -> MedsrConfig:
    """The config with ``--model NAME=SOURCE`` entries appended to ``eval.models`` (validated like the rest)."""
    cfg = _load(config, overrides)
    if not models:
        return cfg
    listed = [m.model_dump() for m in cfg.eval.models]
    for item in models:
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            console.print(f"[bold red]config error:[/] --model {item!r}: expected NAME=SOURCE (e.g. x4plus=weights/x4plus/model.pth)",
                          highlight=False)
            raise typer.Exit(2)
        listed.append({"name": name.strip(), "source": source.strip(), "baseline": False})
    return _load(config, [*overrides, f"eval.models={json.dumps(listed)}"])


@eval_app.command("eval")
def evaluate(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
             model: Optional[list[str]] = ModelOpt, fail_on_error: bool = FailOnErrorOpt) -> None:
    """Score models under an evaluation protocol (configs/eval_<protocol>.yaml) and write report.html + results.*"""
    from medsr_dist.eval.evaluate import plan_evaluation, run_evaluation  # lazy: stage code, not loaded by --help
    from medsr_dist.eval.plan import EvalInputError, describe_plan  # lazy: stage code, not loaded by --help

    cfg = _with_models(config, list(overrides or []), list(model or []))
    storage = Storage(cfg.storage)
    try:
        plan = plan_evaluation(cfg, storage)
    except (EvalInputError, StorageError, FileNotFoundError) as exc:
        console.print(f"[bold red]eval error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    console.print(describe_plan(plan), highlight=False)
    init_ray(cfg)
    result = run_evaluation(cfg, storage, plan=plan)
    summary = result.report["summary"]
    for name, s in summary.items():
        psnr, ssim = s["psnr"], s["ssim"]
        console.print(f"  {name}: PSNR {psnr['mean']:.2f} dB, SSIM {ssim['mean']:.4f} over {psnr['n']} image(s)"
                      f"{', ' + str(s['errors']) + ' error(s)' if s['errors'] else ''}", highlight=False)
    if result.report.get("note"):
        console.print(f"  [yellow]note[/] {result.report['note']}", highlight=False)
    for err in result.report["errors"]:
        console.print(f"  [yellow]error[/] {err['image']} / {err['model']}: {err['error']}", highlight=False)
    console.print(f"  report: {result.files['report.html']}")
    if result.n_errors and fail_on_error:
        raise typer.Exit(1)
