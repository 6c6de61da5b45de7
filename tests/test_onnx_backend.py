"""Specification of the ONNX export (`medsr export --format onnx`) and the onnxruntime backend."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import medsr_dist.compat  # noqa: F401  (must precede basicsr)
from basicsr.archs.rrdbnet_arch import RRDBNet
from conftest import TINY_RRDBNET, write_tiny_model
from medsr_dist.infer.backends import TorchBackend
from medsr_dist.infer.engine import TileSpec, enhance_array, enhance_many
from medsr_dist.infer.export import PARITY_TOLERANCE, export_onnx
from medsr_dist.infer.model_file import build_model_backend, read_model_file
from medsr_dist.infer.onnx_backend import OnnxRuntimeBackend, StaleExportError
from medsr_dist.infer.registry import BACKENDS
from medsr_dist.storage import Storage

SIZE_MULTIPLE = {4: 1, 2: 2, 1: 4}


def spanning_rrdbnet(scale: int) -> RRDBNet:
    """A tiny seeded RRDBNet whose outputs spread over [0, 1] (a random one is almost constant), so parity
    is tested on values that matter rather than on a clamped flat image."""
    torch.manual_seed(7)
    net = RRDBNet(num_in_ch=3, num_out_ch=3, scale=scale, **TINY_RRDBNET).eval()
    probe = torch.rand(1, 3, 16 * SIZE_MULTIPLE[scale], 16 * SIZE_MULTIPLE[scale], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        net.conv_last.weight.mul_(30.0)
        net.conv_last.bias.zero_()
        net.conv_last.bias.copy_(0.5 - net(probe).mean(dim=(0, 2, 3)))
    return net


@pytest.fixture(scope="module", params=[4, 2], ids=["x4", "x2-pixel-unshuffle"])
def exported(request):
    scale = request.param
    net = spanning_rrdbnet(scale)
    return scale, net, export_onnx(net, scale=scale, size_multiple=SIZE_MULTIPLE[scale])


def test_onnx_runtime_matches_torch_to_1e_minus_4_at_any_batch_and_size(exported):
    scale, net, export = exported
    assert export.max_abs_diff <= PARITY_TOLERANCE
    backend = OnnxRuntimeBackend(export.data)
    assert (backend.scale, backend.size_multiple) == (scale, SIZE_MULTIPLE[scale])  # read from the export's metadata
    reference = TorchBackend(net, scale=scale, device="cpu", size_multiple=SIZE_MULTIPLE[scale])
    m = SIZE_MULTIPLE[scale]
    rng = np.random.default_rng(0)
    for batch, height, width in ((1, 8 * m, 8 * m), (3, 11 * m, 5 * m), (2, 24 * m, 17 * m)):
        tiles = rng.random((batch, 3, height, width), dtype=np.float32)
        got, want = backend(tiles), reference(tiles)
        assert got.shape == want.shape == (batch, 3, height * scale, width * scale)
        assert got.dtype == np.float32 and got.min() >= 0.0 and got.max() <= 1.0
        assert want.std() > 0.05  # the comparison is over real content, not a clamped constant
        assert float(np.abs(got - want).max()) <= PARITY_TOLERANCE


def test_engine_output_is_the_same_with_either_backend(exported):
    """Tiling, batching and blending are the engine's: swapping the backend changes nothing above 1e-4."""
    scale, net, export = exported
    image = np.random.default_rng(1).random((45, 38, 1), dtype=np.float32)  # gray, odd sizes: padding is exercised
    spec = TileSpec(tile=16, overlap=4, blend=2, batch_size=3)
    m = SIZE_MULTIPLE[scale]
    torch_out = enhance_array(TorchBackend(net, scale=scale, device="cpu", size_multiple=m), image, spec)
    onnx_out = enhance_array(OnnxRuntimeBackend(export.data), image, spec)
    assert onnx_out.shape == torch_out.shape == (45 * scale, 38 * scale, 1)
    assert float(np.abs(onnx_out - torch_out).max()) <= PARITY_TOLERANCE


def test_onnxruntime_is_a_registered_backend_built_from_the_exported_model_file(tmp_path):
    write_tiny_model(lambda name, data: (tmp_path / name).write_bytes(data))
    storage = Storage()
    model = read_model_file(str(tmp_path / "model.pth"))
    with pytest.raises(FileNotFoundError, match="medsr export --format onnx"):
        build_model_backend(model, "onnxruntime", storage)

    from medsr_dist.cli import app

    result = CliRunner().invoke(app, ["export", "--format", "onnx", "--checkpoint", str(tmp_path / "model.pth")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model.onnx").is_file() and str(tmp_path / "model.onnx") in result.output
    assert "max abs difference" in result.output

    backend = build_model_backend(model, "onnxruntime", storage, device="cpu")
    assert isinstance(backend, OnnxRuntimeBackend) and BACKENDS["onnxruntime"] is OnnxRuntimeBackend
    assert backend.providers == ["CPUExecutionProvider"]
    reference = build_model_backend(model, "torch", storage, device="cpu")
    images = [np.random.default_rng(s).random((20 + s, 24, 3), dtype=np.float32) for s in range(3)]
    spec = TileSpec(tile=12, overlap=4, batch_size=4)
    for got, want in zip(enhance_many(backend, images, spec), enhance_many(reference, images, spec)):
        assert float(np.abs(got - want).max()) <= PARITY_TOLERANCE


def test_an_export_of_other_weights_is_refused(tmp_path):
    """A model.onnx left over from an earlier model.pth must not silently run in its place."""
    write_tiny_model(lambda name, data: (tmp_path / name).write_bytes(data), seed=0)
    from medsr_dist.infer.export import export_model_file

    export_model_file(read_model_file(str(tmp_path / "model.pth")), Storage())
    data = write_tiny_model(lambda name, data: (tmp_path / name).write_bytes(data), seed=1)  # retrained weights
    model = read_model_file(str(tmp_path / "model.pth"))
    assert model.sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(StaleExportError, match="export again"):
        build_model_backend(model, "onnxruntime", Storage())


def test_model_file_without_meta_json_reads_the_architecture_from_the_weights(tmp_path):
    """A plain BasicSR checkpoint (e.g. a copy of RealESRGAN_x2plus.pth) needs no meta.json."""
    write_tiny_model(lambda name, data: (tmp_path / name).write_bytes(data) if name == "model.pth" else None, scale=2)
    model = read_model_file(str(tmp_path / "model.pth"))
    assert (model.scale, model.size_multiple, model.name) == (2, 2, "model")
    assert {k: model.generator[k] for k in TINY_RRDBNET} == TINY_RRDBNET
    out = enhance_array(build_model_backend(model, "torch", Storage(), device="cpu"),
                        np.zeros((7, 9, 3), np.float32))  # odd sides: padded to the x2 model's multiple of 2
    assert out.shape == (14, 18, 3)

    meta = {"family": "realesrgan", "scale": 2, "generator": TINY_RRDBNET, "sha256": "0" * 64}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="incomplete copy or mismatched files"):
        read_model_file(str(tmp_path / "model.pth"))


def test_cuda_provider_is_required_when_cuda_is_asked_for():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    export = export_onnx(spanning_rrdbnet(4), scale=4)
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        OnnxRuntimeBackend(export.data, device="cuda")


@pytest.mark.gpu
def test_cuda_provider_matches_torch_on_gpu():
    import onnxruntime as ort

    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA GPU and onnxruntime-gpu")
    net = spanning_rrdbnet(4)
    export = export_onnx(net, scale=4)
    backend = OnnxRuntimeBackend(export.data, device="cuda")
    assert backend.providers[0] == "CUDAExecutionProvider"
    tiles = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    want = TorchBackend(net, scale=4, device="cuda")(tiles)
    assert float(np.abs(backend(tiles) - want).max()) <= 1e-3  # cuDNN and ORT pick different conv algorithms


def test_backend_auto_runs_onnxruntime_on_cpu_once_the_export_exists_and_torch_on_gpus(tmp_path):
    """``enhance.backend``/``serve.backend: auto`` (the default): chosen per model and hardware from the measured
    speeds (onnxruntime is faster on CPU), never silently: the reason names what was missing."""
    from medsr_dist.infer.model_file import AUTO_BACKEND, choose_backend, onnx_export_uris

    write_tiny_model(lambda name, data: (tmp_path / name).write_bytes(data))
    storage = Storage()
    model = read_model_file(str(tmp_path / "model.pth"))
    assert onnx_export_uris(model) == [str(tmp_path / "model.onnx")]
    assert choose_backend("torch", model, storage, gpu=False).name == "torch"  # a named backend is what runs
    before = choose_backend(AUTO_BACKEND, model, storage, gpu=False)
    assert before.name == "torch" and f"no ONNX export at {tmp_path / 'model.onnx'}" in before.reason
    assert isinstance(build_model_backend(model, AUTO_BACKEND, storage, device="cpu"), TorchBackend)

    from medsr_dist.cli import app

    result = CliRunner().invoke(app, ["export", "--format", "onnx", "--checkpoint", str(tmp_path / "model.pth")])
    assert result.exit_code == 0, result.output
    after = choose_backend(AUTO_BACKEND, model, storage, gpu=False)
    assert after.name == "onnxruntime" and "onnxruntime" in after.reason and "PERFORMANCE" in after.reason
    assert isinstance(build_model_backend(model, AUTO_BACKEND, storage, device="cpu"), OnnxRuntimeBackend)
    assert choose_backend(AUTO_BACKEND, model, storage, gpu=True).name == "torch"  # no GPU provider here


def test_an_ldm_export_needs_every_onnx_part_before_auto_picks_onnxruntime(tmp_path):
    import dataclasses

    from medsr_dist.infer.model_file import AUTO_BACKEND, ONNX_PARTS, choose_backend, onnx_export_uris

    write_tiny_model(lambda name, data: (tmp_path / name).write_bytes(data))
    model = dataclasses.replace(read_model_file(str(tmp_path / "model.pth")), family="ldm")  # naming only
    uris = onnx_export_uris(model)
    assert uris == [str(tmp_path / f"model.{part}.onnx") for part in ONNX_PARTS["ldm"]]
    for uri in uris[:-1]:
        (tmp_path / uri).write_bytes(b"x")
    choice = choose_backend(AUTO_BACKEND, model, Storage(), gpu=False)
    assert choice.name == "torch" and uris[-1] in choice.reason
    (tmp_path / uris[-1]).write_bytes(b"x")
    assert choose_backend(AUTO_BACKEND, model, Storage(), gpu=False).name == "onnxruntime"
