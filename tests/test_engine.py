"""Specification of the inference engine: tiling, cross-image batching, blending, channels and backends."""
from __future__ import annotations

import logging
import tracemalloc

import cv2
import numpy as np
import pytest
import torch

import medsr_dist.compat  # noqa: F401  (must precede basicsr)
from basicsr.archs.rrdbnet_arch import RRDBNet
from medsr_dist.infer.backends import Backend, TorchBackend, build_backend, cpu_has_native_bf16
from medsr_dist.infer.registry import BACKENDS, register_backend
from medsr_dist.infer.engine import (
    TileBatcher,
    TileSpec,
    enhance_array,
    enhance_many,
    plan_axis,
    resize_to_outscale,
)

# RRDBNet x4 runs on the image as it is; x2 pixel-unshuffles by 2, so its input sides must be even.
RRDBNET_SIZE_MULTIPLE = {4: 1, 2: 2}


def random_rrdbnet(scale: int) -> RRDBNet:
    """A small seeded RRDBNet whose output actually spans [0, 1].

    With basicsr's initialisation a random RRDBNet outputs values around -0.05, which clamp to an all-black
    image that any tiling reproduces trivially. A 30x stronger last layer whose bias centres each output
    channel at 0.5 (on a fixed calibration image) makes the comparisons real.
    """
    torch.manual_seed(1234)
    net = RRDBNet(num_in_ch=3, num_out_ch=3, scale=scale, num_feat=16, num_block=2, num_grow_ch=8).eval()
    calibration = torch.from_numpy(random_image(32, 32, seed=99).transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        net.conv_last.weight.mul_(30.0)
        net.conv_last.bias.zero_()
        net.conv_last.bias.copy_(0.5 - net(calibration).mean(dim=(0, 2, 3)))
    return net


@pytest.fixture(scope="module", params=[4, 2], ids=["x4", "x2-pixel-unshuffle"])
def rrdbnet_backend(request) -> TorchBackend:
    scale = request.param
    return TorchBackend(random_rrdbnet(scale), scale=scale, size_multiple=RRDBNET_SIZE_MULTIPLE[scale])


class NearestBackend:
    """Pixel replication in numpy: a per-pixel model, so any correct tiling reproduces it exactly.

    Records the shape of every batch it is called with.
    """

    def __init__(self, scale: int, size_multiple: int = 1) -> None:
        self.scale = scale
        self.size_multiple = size_multiple
        self.batch_shapes: list[tuple[int, ...]] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.ndim == 4 and batch.shape[1] == 3
        assert batch.shape[2] % self.size_multiple == 0 and batch.shape[3] % self.size_multiple == 0
        self.batch_shapes.append(batch.shape)
        return batch.repeat(self.scale, axis=2).repeat(self.scale, axis=3)


class RecordingBackend:
    """Wraps a backend and records the batch shapes it receives."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.scale = inner.scale
        self.size_multiple = inner.size_multiple
        self.batch_shapes: list[tuple[int, ...]] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batch_shapes.append(batch.shape)
        return self.inner(batch)


def random_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smoothish random float32 RGB image in [0, 1] (noise blurred a little, like image content)."""
    rng = np.random.default_rng(seed)
    noise = rng.random((height, width, channels), dtype=np.float32)
    blurred = cv2.GaussianBlur(noise, (3, 3), 0.8)
    return blurred.reshape(height, width, channels)


# ---------------------------------------------------------------------------------------------------------
# Tiling reproduces the untiled result
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seam_case(rrdbnet_backend):
    """A 70 x 53 image (odd sizes: nothing divides evenly) upscaled whole and in 3 x 3 tiles."""
    image = random_image(70, 53)
    spec = TileSpec(tile=24, overlap=8, blend=4, batch_size=4)
    rows, cols = TileBatcher(rrdbnet_backend, spec).grid(70, 53)
    untiled = enhance_array(rrdbnet_backend, image, TileSpec(tile=0))
    tiled = enhance_array(rrdbnet_backend, image, spec)
    return rrdbnet_backend.scale, spec, rows, cols, untiled, tiled


def test_tiled_rrdbnet_matches_untiled_within_2_of_255_seams_included(seam_case):
    s, spec, rows, cols, untiled, tiled = seam_case
    assert rows.count > 1 and cols.count > 1, "the image must actually be cut along both axes"
    assert untiled.shape == tiled.shape == (70 * s, 53 * s, 3)
    assert untiled.std(axis=(0, 1)).min() > 0.05, "the model output must vary with the input"
    assert np.mean((untiled == 0) | (untiled == 1)) < 0.1, "and mostly not be clamped"

    diff = np.abs(tiled - untiled).max(axis=2)
    assert diff.max() <= 2 / 255
    # the seams specifically: output bands around every core boundary, fade included
    band = (spec.blend + 2) * s
    for boundary in rows.boundaries[1:-1]:
        assert diff[boundary * s - band : boundary * s + band, :].max() <= 2 / 255
    for boundary in cols.boundaries[1:-1]:
        assert diff[:, boundary * s - band : boundary * s + band].max() <= 2 / 255


def test_tiled_rrdbnet_has_no_step_at_seams(seam_case):
    """Across a seam, neighbouring output pixels differ no more than in the untiled result (plus 2/255)."""
    s, _, rows, cols, untiled, tiled = seam_case
    for boundary in rows.boundaries[1:-1]:
        y = boundary * s
        step_tiled = np.abs(tiled[y] - tiled[y - 1])
        step_untiled = np.abs(untiled[y] - untiled[y - 1])
        assert np.max(step_tiled - step_untiled) <= 2 / 255
    for boundary in cols.boundaries[1:-1]:
        x = boundary * s
        step_tiled = np.abs(tiled[:, x] - tiled[:, x - 1])
        step_untiled = np.abs(untiled[:, x] - untiled[:, x - 1])
        assert np.max(step_tiled - step_untiled) <= 2 / 255


@pytest.mark.parametrize("size_multiple", [1, 2, 4])
@pytest.mark.parametrize(
    "height, width", [(1, 1), (5, 3), (31, 17), (70, 53), (97, 64), (128, 129)], ids=lambda v: str(v)
)
@pytest.mark.parametrize(
    "spec",
    [
        TileSpec(tile=8, overlap=2, blend=2),
        TileSpec(tile=16, overlap=4, blend=4),
        TileSpec(tile=20, overlap=0, blend=0),
    ],
    ids=["t8-o2-b2", "t16-o4-b4", "t20-hard-crop"],
)
def test_blend_weights_sum_to_one_so_a_per_pixel_model_is_tiled_exactly(height, width, size_multiple, spec):
    backend = NearestBackend(scale=2, size_multiple=size_multiple)
    image = random_image(height, width)
    expected = image.repeat(2, axis=0).repeat(2, axis=1)
    assert np.abs(enhance_array(backend, image, spec) - expected).max() < 1e-6
    assert np.abs(enhance_array(backend, image, TileSpec(tile=0)) - expected).max() < 1e-6


@pytest.mark.parametrize("length", [1, 7, 48, 49, 70, 101, 257])
@pytest.mark.parametrize("size_multiple", [1, 2, 4])
def test_axis_plan_contract(length, size_multiple):
    spec = TileSpec(tile=16, overlap=6, blend=3)
    plan = plan_axis(length, spec, size_multiple)
    scale = 3
    coverage = np.zeros(length * scale)
    inner_sizes = {plan.size(i) for i in range(1, plan.count - 1)}
    assert len(inner_sizes) <= 1, "inner windows share one size, so they batch together"
    for i in range(plan.count):
        lo, hi = plan.contribution(i)
        start, stop = plan.window_starts[i], plan.window_stops[i]
        assert start % size_multiple == 0 and stop % size_multiple == 0
        assert 0 <= start <= lo and hi <= stop <= plan.padded_length
        # at least `overlap` pixels of context inside the window, except where the window meets the border
        assert start == 0 or lo - start >= spec.overlap
        assert stop == plan.padded_length or stop - hi >= spec.overlap
        coverage[lo * scale : hi * scale] += plan.weights(i, scale)
    np.testing.assert_allclose(coverage, 1.0, atol=1e-6)
    assert plan.padded_length >= length and plan.padded_length % size_multiple == 0


def test_windows_are_clipped_at_the_image_border_like_realesrganers():
    """tile 64 / pad 10 on 128 pixels: RealESRGANer computes [0, 74) and [54, 128); so does the engine with a
    hard crop, and a blend only widens the windows towards the neighbour."""
    hard = plan_axis(128, TileSpec(tile=64, overlap=10, blend=0))
    assert list(zip(hard.window_starts, hard.window_stops)) == [(0, 74), (54, 128)]
    assert hard.computed == 148  # RealESRGANer's 34 % overlap overhead in 2-D: (148 / 128) ** 2 - 1
    blended = plan_axis(128, TileSpec(tile=64, overlap=10, blend=4))
    assert list(zip(blended.window_starts, blended.window_stops)) == [(0, 78), (50, 128)]
    # many tiles: first and last windows are shorter than the inner ones by the missing context
    plan = plan_axis(2048, TileSpec(tile=256, overlap=10, blend=4))
    assert plan.count == 8 and {plan.size(i) for i in range(1, 7)} == {284}
    assert plan.size(0) == plan.size(7) == 256 + 14
    assert plan.computed == 2048 + 7 * 2 * 14


# ---------------------------------------------------------------------------------------------------------
# Batching across images
# ---------------------------------------------------------------------------------------------------------


def test_tiles_of_an_image_are_batched_by_shape_and_give_the_one_by_one_results(rrdbnet_backend):
    spec = TileSpec(tile=16, overlap=6, blend=2, batch_size=4)
    images = [random_image(46, 39, seed=k) for k in range(3)]
    rows, cols = TileBatcher(rrdbnet_backend, spec).grid(46, 39)
    assert rows.count == cols.count == 3
    shapes = {(rows.size(r), cols.size(c)) for r in range(3) for c in range(3)}
    assert len(shapes) > 1, "border windows are clipped, so an image has tiles of several shapes"

    one_by_one = [enhance_array(rrdbnet_backend, image, spec) for image in images]
    recorder = RecordingBackend(rrdbnet_backend)
    batched = list(enhance_many(recorder, images, spec))

    assert len(batched) == len(images)
    for got, want in zip(batched, one_by_one):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert max(shape[0] for shape in recorder.batch_shapes) <= spec.batch_size
    assert sum(shape[0] for shape in recorder.batch_shapes) == 9 * len(images), "each tile computed once"
    # an image with >= batch_size tiles is finished on its own: per image, one batch per shape and 4 tiles
    per_image = sum(-(-sum(1 for r in range(3) for c in range(3) if (rows.size(r), cols.size(c)) == shape) // 4)
                    for shape in shapes)
    assert len(recorder.batch_shapes) == per_image * len(images)


def test_small_images_of_one_size_share_batches():
    backend = NearestBackend(scale=2)
    images = [random_image(10, 12, seed=k) for k in range(7)]
    results = list(enhance_many(backend, images, TileSpec(tile=0, batch_size=3)))
    assert [shape[0] for shape in backend.batch_shapes] == [3, 3, 1]
    for image, result in zip(images, results):
        np.testing.assert_array_equal(result, image.repeat(2, axis=0).repeat(2, axis=1))


def test_images_of_different_sizes_are_batched_only_with_same_shaped_tiles():
    backend = NearestBackend(scale=2)
    images = [random_image(h, w, seed=h) for h, w in [(10, 12), (10, 12), (7, 9), (10, 12)]]
    results = list(enhance_many(backend, images, TileSpec(tile=0, batch_size=8)))
    assert [r.shape for r in results] == [(20, 24, 3), (20, 24, 3), (14, 18, 3), (20, 24, 3)]
    assert [shape[0] for shape in backend.batch_shapes] == [3, 1]  # equal shapes share a batch, in input order out
    for image, result in zip(images, results):
        np.testing.assert_array_equal(result, image.repeat(2, axis=0).repeat(2, axis=1))


# ---------------------------------------------------------------------------------------------------------
# Bounded memory
# ---------------------------------------------------------------------------------------------------------


def test_engine_holds_only_a_few_batches_of_tiles_not_all_tiles():
    scale, spec = 2, TileSpec(tile=16, overlap=4, blend=2, batch_size=4)
    image = random_image(256, 256)
    rows, cols = TileBatcher(NearestBackend(scale), spec).grid(256, 256)
    n_tiles = rows.count * cols.count
    tile_bytes = 4 * 3 * rows.window * cols.window * (1 + scale * scale)  # one tile in + its output
    output_bytes = 4 * 3 * (256 * scale) ** 2
    assert n_tiles * tile_bytes > 2 * output_bytes, "holding every tile would show up clearly"

    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = enhance_array(NearestBackend(scale), image, spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.shape == (512, 512, 3)
    # the output accumulator, a few batches of tiles with their blending temporaries, small bookkeeping
    budget = output_bytes + 4 * spec.batch_size * tile_bytes + 256 * 1024
    assert peak - baseline < budget, f"peak {(peak - baseline) / 1e6:.1f} MB > budget {budget / 1e6:.1f} MB"


def test_images_are_pulled_lazily_and_released_as_soon_as_done():
    spec = TileSpec(tile=8, overlap=2, blend=1, batch_size=3)
    pulled = 0
    yielded = 0
    in_flight_at_calls: list[int] = []

    class Watching(NearestBackend):
        def __call__(self, batch):
            in_flight_at_calls.append(pulled - yielded)
            return super().__call__(batch)

    def images():
        nonlocal pulled
        for k in range(20):
            pulled += 1
            yield random_image(20, 17, seed=k)

    for _ in enhance_many(Watching(scale=2), images(), spec):
        yielded += 1
    assert yielded == 20
    # an image with at least batch_size tiles is finished before the next one is pulled
    assert max(in_flight_at_calls) == 1


# ---------------------------------------------------------------------------------------------------------
# Channels, shapes and output scale
# ---------------------------------------------------------------------------------------------------------


def test_gray_in_gray_out_equals_the_mean_of_the_rgb_result(rrdbnet_backend):
    gray = random_image(37, 29, channels=1)
    spec = TileSpec(tile=16, overlap=6, blend=2)
    out = enhance_array(rrdbnet_backend, gray, spec)
    s = rrdbnet_backend.scale
    assert out.shape == (37 * s, 29 * s, 1) and out.dtype == np.float32
    rgb_out = enhance_array(rrdbnet_backend, np.repeat(gray, 3, axis=2), spec)
    np.testing.assert_allclose(out[..., 0], rgb_out.mean(axis=2), atol=1e-5)
    # a 2-D image stays 2-D
    out_2d = enhance_array(rrdbnet_backend, gray[..., 0], spec)
    assert out_2d.shape == (37 * s, 29 * s)
    np.testing.assert_allclose(out_2d, out[..., 0], atol=1e-6)


def test_rgba_alpha_is_bicubic_upscaled_and_reattached(rrdbnet_backend):
    rgba = random_image(33, 26, channels=4, seed=3)
    spec = TileSpec(tile=16, overlap=6, blend=2)
    out = enhance_array(rrdbnet_backend, rgba, spec)
    s = rrdbnet_backend.scale
    assert out.shape == (33 * s, 26 * s, 4)
    np.testing.assert_allclose(out[..., :3], enhance_array(rrdbnet_backend, rgba[..., :3], spec), atol=1e-6)
    alpha = np.clip(cv2.resize(rgba[..., 3], (26 * s, 33 * s), interpolation=cv2.INTER_CUBIC), 0, 1)
    np.testing.assert_allclose(out[..., 3], alpha, atol=1e-6)


@pytest.mark.parametrize("height, width", [(1, 1), (3, 5), (9, 7)])
def test_images_smaller_than_a_tile_come_out_at_scale(rrdbnet_backend, height, width):
    s = rrdbnet_backend.scale
    image = random_image(height, width)
    for spec in (TileSpec(tile=0), TileSpec(tile=32, overlap=8)):
        out = enhance_array(rrdbnet_backend, image, spec)
        assert out.shape == (height * s, width * s, 3)
        assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1


def test_outscale_resizes_the_native_result_with_lanczos(rrdbnet_backend):
    image = random_image(21, 17)
    native = enhance_array(rrdbnet_backend, image)
    out = enhance_array(rrdbnet_backend, image, outscale=1.5)
    assert out.shape == (round(21 * 1.5), round(17 * 1.5), 3)
    expected = np.clip(cv2.resize(native, (out.shape[1], out.shape[0]), interpolation=cv2.INTER_LANCZOS4), 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    same = enhance_array(rrdbnet_backend, image, outscale=rrdbnet_backend.scale)
    np.testing.assert_array_equal(same, native)


def test_resize_to_outscale_keeps_a_single_channel_axis():
    gray = np.random.default_rng(0).random((40, 32, 1), dtype=np.float32)  # x4 result of a 10 x 8 input
    out = resize_to_outscale(gray, native_scale=4, outscale=2, orig_hw=(10, 8))
    assert out.shape == (20, 16, 1)
    assert resize_to_outscale(gray, 4, None, (10, 8)) is gray


def test_integer_images_and_bad_shapes_are_rejected():
    backend = NearestBackend(scale=2)
    with pytest.raises(TypeError):
        enhance_array(backend, np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError):
        enhance_array(backend, np.zeros((4, 4, 2), dtype=np.float32))


@pytest.mark.parametrize("field, value", [("tile", -1), ("overlap", -1), ("blend", -2), ("batch_size", 0)])
def test_tile_spec_rejects_impossible_values(field, value):
    with pytest.raises(ValueError, match=field):
        TileSpec(**{field: value})


# ---------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------


def test_torch_backend_contract():
    backend = TorchBackend(random_rrdbnet(4), scale=4)
    assert isinstance(backend, Backend)
    assert backend.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    batch = np.random.default_rng(0).random((2, 3, 12, 10), dtype=np.float32)
    out = backend(batch)
    assert out.shape == (2, 3, 48, 40) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.flags.c_contiguous


def test_torch_backend_reads_size_multiple_from_the_model_when_not_given():
    net = random_rrdbnet(2)
    net.size_multiple = 2
    assert TorchBackend(net, scale=2).size_multiple == 2
    assert TorchBackend(random_rrdbnet(4), scale=4).size_multiple == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_reduced_precision_falls_back_to_fp32_on_cpu(caplog):
    with caplog.at_level(logging.WARNING):
        backend = TorchBackend(random_rrdbnet(4), scale=4, precision="fp16")
    assert backend.precision == "fp32" and backend.dtype == torch.float32
    assert "fp16" in caplog.text


def test_bf16_runs_on_a_cpu_only_where_it_has_bf16_hardware(monkeypatch, caplog):
    from medsr_dist.infer import backends

    assert backends.torch_precision("fp16", "cuda") == "fp16" and backends.torch_precision("bf16", "cuda") == "bf16"
    assert backends.torch_precision("fp16", "cpu") == "fp32"  # no fast CPU fp16 convolution
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: False)
    assert backends.torch_precision("bf16", "cpu") == "fp32"
    with caplog.at_level(logging.WARNING):
        backend = TorchBackend(random_rrdbnet(4), scale=4, device="cpu", precision="bf16")
    assert backend.precision == "fp32" and "bf16" in caplog.text
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: True)
    assert backends.torch_precision("bf16", "cpu") == "bf16"
    assert TorchBackend(random_rrdbnet(4), scale=4, device="cpu", precision="bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        backends.torch_precision("fp8", "cpu")


def test_native_bf16_is_read_from_the_cpu_flags_not_from_onednn_emulation(monkeypatch):
    from medsr_dist.infer import backends

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this torch/CPU has no oneDNN bf16 at all")
    monkeypatch.setattr(backends, "_cpu_flags", lambda: frozenset({"avx512f", "avx512bw", "avx512vl"}))
    assert not backends.cpu_has_native_bf16()  # AVX-512 alone: emulated, slower than fp32
    monkeypatch.setattr(backends, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert backends.cpu_has_native_bf16()
    monkeypatch.setattr(backends, "_cpu_flags", frozenset)  # flags unreadable (not Linux)
    assert not backends.cpu_has_native_bf16()


def test_what_a_replica_will_run_is_known_before_it_starts():
    from medsr_dist.infer.backends import torch_precision
    from medsr_dist.infer.model_file import runnable_precision

    assert runnable_precision("torch", "fp16", gpu=True) == "fp16"
    assert runnable_precision("torch", "fp16", gpu=False) == "fp32"
    assert runnable_precision("torch", "bf16", gpu=False) == torch_precision("bf16", "cpu")
    assert runnable_precision("onnxruntime", "fp16", gpu=True) == "fp32"  # the export is an fp32 graph
    with pytest.raises(ValueError, match="precision"):
        runnable_precision("torch", "int8", gpu=False)
    assert runnable_precision("tensorrt", "fp16", gpu=True) == "fp16"  # an fp16-cast graph (tensorrt_backend.py)
    with pytest.raises(ValueError, match="fp32 or fp16"):
        runnable_precision("tensorrt", "bf16", gpu=True)
    with pytest.raises(ValueError, match="unknown backend 'nosuch'"):
        runnable_precision("nosuch", "fp16", gpu=True)


@pytest.mark.skipif(not cpu_has_native_bf16(),
                    reason="needs a CPU with bf16 hardware (AVX512-BF16 or AMX)")
def test_bf16_on_a_cpu_with_bf16_hardware_stays_close_to_fp32():
    image = random_image(40, 33)
    fp32 = enhance_array(TorchBackend(random_rrdbnet(4), scale=4, device="cpu"), image)
    low_backend = TorchBackend(random_rrdbnet(4), scale=4, device="cpu", precision="bf16")
    assert low_backend.precision == "bf16"
    low = enhance_array(low_backend, image)
    assert low.dtype == np.float32
    diff = np.abs(low - fp32)
    assert 0 < diff.max() < 0.05  # really computed in bf16, and still the same image


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_on_gpu_stays_close_to_fp32(precision):
    image = random_image(40, 33)
    fp32 = enhance_array(TorchBackend(random_rrdbnet(4), scale=4), image)
    low = enhance_array(TorchBackend(random_rrdbnet(4), scale=4, precision=precision), image)
    assert low.dtype == np.float32
    assert np.abs(low - fp32).max() < 0.05


def test_torch_backend_rejects_unknown_precision():
    with pytest.raises(ValueError, match="precision"):
        TorchBackend(random_rrdbnet(4), scale=4, precision="int8")


def test_backends_are_built_by_name_and_unknown_names_list_the_available_ones():
    backend = build_backend("torch", model=random_rrdbnet(4), scale=4)
    assert isinstance(backend, TorchBackend)
    with pytest.raises(ValueError, match="available: .*'torch'"):
        build_backend("no-such-runtime")


def test_register_backend_adds_a_name_once():
    @register_backend("nearest-test")
    class _Nearest(NearestBackend):
        pass

    try:
        assert isinstance(build_backend("nearest-test", scale=2), _Nearest)
        with pytest.raises(ValueError, match="already registered"):
            register_backend("nearest-test")(NearestBackend)
    finally:
        BACKENDS.pop("nearest-test")


def test_the_default_tile_batch_is_one_on_cpu_and_larger_on_a_gpu():
    from types import SimpleNamespace

    from medsr_dist.infer.engine import AUTO_BATCH_SIZE, auto_batch_size

    cpu = TorchBackend(random_rrdbnet(4), scale=4, device="cpu")
    assert auto_batch_size(cpu) == AUTO_BATCH_SIZE["cpu"] == 1
    cuda_torch = SimpleNamespace(scale=4, size_multiple=1, device=torch.device("cuda"))
    assert auto_batch_size(cuda_torch) == AUTO_BATCH_SIZE["gpu"] > 1
    ort_gpu = SimpleNamespace(scale=4, size_multiple=1, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    ort_cpu = SimpleNamespace(scale=4, size_multiple=1, providers=["CPUExecutionProvider"])
    assert (auto_batch_size(ort_gpu), auto_batch_size(ort_cpu)) == (AUTO_BATCH_SIZE["gpu"], 1)
