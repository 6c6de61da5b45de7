"""The inference engine: tiling, cross-image batching and seamless blending around any :class:`Backend`.

Tiling scheme (per axis, in input pixels; the same along height and width):

* The axis is split into ``n = ceil(length / tile)`` *cores* of nearly equal size (each <= ``tile``).
* Neighbouring tiles are cross-faded over ``2*r`` pixels centred on their core boundary
  (``r = min(blend, core // 2)``) with a raised-cosine ramp. The fade-out of one tile is exactly one minus
  the fade-in of the next, so the weights of all tiles sum to 1 everywhere: the output is accumulated
  directly, with no full-size weight map and no normalisation pass.
* Each tile is sent to the backend as a *window* reaching ``overlap + blend`` pixels beyond its core on
  each side that has a neighbour, so every pixel a tile contributes to has at least ``overlap`` pixels of
  real image context in that tile (RealESRGANer's ``tile_pad`` guarantee; ``blend=0`` is RealESRGANer's hard
  crop). At the image borders the window is clipped, as RealESRGANer clips it: there is no context to add
  there, and computing one costs as much as a pad. Window starts are multiples of ``size_multiple`` so a
  pixel-unshuffling model sees the same pixel phase as on the whole image; all inner windows have the same
  size ``roundup(tile + 2*(overlap + blend) + size_multiple - 1, size_multiple)``, so an axis has at most
  three window sizes (first, inner, last) and an image at most nine tile shapes.
* An axis no longer than one inner window is not cut: it goes through in one piece, reflect-padded at the
  end to a multiple of ``size_multiple`` (RealESRGANer's ``mod_pad``), as is the whole image when ``tile=0``.

Batching: the backend gets tiles of one shape per call. Tiles wait in one pending batch per shape; a batch
runs as soon as it is full. An image with at least ``batch_size`` tiles flushes its partial batches when its
last tile is queued, so large images are finished one at a time (one output accumulator in memory); smaller
images leave theirs for the next images to fill (whole small images batched together), up to
``batch_size`` images in flight.

Why both ``overlap`` and ``blend``: fading over pixels near a window's edge, where the network lacked
context, lets that error into the result, so the fade is placed where both tiles still have ``overlap``
pixels of context. Measured on the test suite's random-weight RRDBNet x4 (70 x 53 image, tile 24), max
deviation from the untiled result / largest extra step across a seam, in 1/255: overlap 0, blend 0:
255 / 255; overlap 0, blend 4: 11 / 0.5; overlap 2, blend 0: 60 / 42; overlap 2, blend 4: 0.43 / 0.13;
overlap 8 with or without blend: < 0.001. (An earlier variant that faded across the whole 8-pixel pad
instead of beyond it gave 1.3/255 where a hard crop gave 3e-5/255.)

How much ``overlap`` a *trained* network needs is another matter: random weights hardly depend on far context,
RealESRGAN_x4plus does (23 RRDB blocks, a receptive field of hundreds of pixels). Measured with
jobs/bench_tile_overlap.py on 384-pixel synthetic images at tile 128, max deviation from untiled in 1/255,
radiograph / fundus: overlap 16: 22 / 28; 32: 6.8 / 7.2; 48: 2.1 / 2.0; 64: 0.72 / 0.52. Smaller tiles need
more (a pixel can lack context on two sides): at tile 64 on 256 pixels, radiograph: RealESRGANer's pad 10: 67;
32: 27; 48: 11; 64: 1.5. Hence :data:`DEFAULT_TILE_OVERLAP` = 64 (docs/PERFORMANCE.md has the cost); the real
x4plus is checked against it in tests/test_tile_context_x4plus.py. A x2 RRDBNet pixel-unshuffles, so its trunk
sees twice as far in input pixels: give it twice as much.

Memory: per image in flight the engine holds the (reflect-padded) input and one float32 output accumulator
of the final size; beyond that only the pending batches (references to tile positions, not pixels) and the
one batch being run with the backend's output for it. Tiles are cut from the input when a batch runs, never
all at once. An image is yielded, in input order, as soon as its last tile is blended.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # the engine itself needs only numpy and OpenCV: importing it does not load torch
    from medsr_dist.infer.backends import Backend

#: Context pixels beyond a tile that keep RealESRGAN_x4plus within 2/255 of its untiled output at tile 64 and
#: within 1/255 from tile 128 up (module docstring).
DEFAULT_TILE_OVERLAP = 64

#: Part of every output's identity (``enhance_params``) and provenance, and of evaluation reports. Bump it with any
#: change that makes the same model, parameters and input give different pixels (tiling plan, blending, padding,
#: quantisation), so a nightly run re-enhances what an older engine made instead of skipping it as done.
#: 2: windows clipped at the image border like RealESRGANer's (revision 1 slid them inwards).
ENGINE_REVISION = 2

__all__ = [
    "ENGINE_REVISION",
    "AxisTiling",
    "TileBatcher",
    "TileSpec",
    "enhance_array",
    "enhance_many",
    "plan_axis",
    "resize_to_outscale",
]


@dataclass(frozen=True)
class TileSpec:
    """How to cut images into tiles and batch them.

    Attributes:
        tile: side of a tile's core in input pixels; 0 sends each whole image through in one piece.
        overlap: input pixels of context the network sees beyond every pixel a tile contributes to
            (RealESRGANer's ``tile_pad``); raise it for models with a wide receptive field (a x2 RRDBNet
            pixel-unshuffles, so its features see half as many pixels of context as a x4 one).
        blend: half-width in input pixels of the cross-fade between neighbouring tiles (0: hard crop).
        batch_size: most tiles per backend call.

    Each tile the backend sees is about ``tile + 2 * (overlap + blend)`` pixels square.
    """

    tile: int = 0
    overlap: int = DEFAULT_TILE_OVERLAP
    blend: int = 4
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.tile < 0:
            raise ValueError(f"tile must be >= 0 (0 = no tiling), got {self.tile}")
        if self.overlap < 0:
            raise ValueError(f"overlap must be >= 0, got {self.overlap}")
        if self.blend < 0:
            raise ValueError(f"blend must be >= 0, got {self.blend}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class AxisTiling:
    """How one image axis is cut into tiles. All positions are in input pixels.

    Tile ``i`` reads input ``[window_starts[i], window_stops[i])`` of the padded axis and contributes to output
    pixels ``contribution(i)`` (times the scale) with weights :meth:`weights`.

    Attributes:
        length: image length along the axis.
        padded_length: length after reflect padding at the end (>= length).
        boundaries: core boundaries ``0 = c_0 < c_1 < ... < c_n = length``.
        window_starts: start of each of the ``n`` windows (multiples of the backend's size_multiple).
        window_stops: end of each window (multiples of size_multiple; the last is ``padded_length``).
        ramps: cross-fade half-width at each boundary (``n + 1`` entries; the first and last are 0).
    """

    length: int
    padded_length: int
    boundaries: tuple[int, ...]
    window_starts: tuple[int, ...]
    window_stops: tuple[int, ...]
    ramps: tuple[int, ...]

    @property
    def count(self) -> int:
        """Number of tiles along the axis."""
        return len(self.window_starts)

    def size(self, i: int) -> int:
        """Extent of window ``i``."""
        return self.window_stops[i] - self.window_starts[i]

    @property
    def window(self) -> int:
        """The largest window extent along the axis."""
        return max(self.size(i) for i in range(self.count))

    @property
    def computed(self) -> int:
        """Input pixels the backend processes along the axis, all windows together (``>= length``)."""
        return sum(self.size(i) for i in range(self.count))

    def contribution(self, i: int) -> tuple[int, int]:
        """Input-pixel range ``[start, stop)`` where tile ``i`` has non-zero weight."""
        return self.boundaries[i] - self.ramps[i], self.boundaries[i + 1] + self.ramps[i + 1]

    def weights(self, i: int, scale: int) -> np.ndarray:
        """Blend weights of tile ``i`` over its contribution range in output pixels.

        Returns:
            (scale * (stop - start),) float32 in [0, 1]: a raised-cosine fade-in over the first
            ``2 * ramps[i] * scale`` pixels, 1 in the middle, the complementary fade-out over the last
            ``2 * ramps[i + 1] * scale`` pixels. Summed over all tiles the weights are 1 at every pixel.
        """
        start, stop = self.contribution(i)
        weights = np.ones((stop - start) * scale, dtype=np.float64)
        fade_in = 2 * self.ramps[i] * scale
        fade_out = 2 * self.ramps[i + 1] * scale
        if fade_in:
            weights[:fade_in] = _raised_cosine(fade_in)
        if fade_out:
            weights[weights.size - fade_out :] = 1.0 - _raised_cosine(fade_out)
        return weights.astype(np.float32)


def _raised_cosine(n: int) -> np.ndarray:
    """(n,) float64 rising from ~0 to ~1, sampled at pixel centres; f(k) + f(n-1-k) = 1."""
    u = (np.arange(n, dtype=np.float64) + 0.5) / n
    return 0.5 - 0.5 * np.cos(np.pi * u)


def plan_axis(length: int, spec: TileSpec, size_multiple: int = 1) -> AxisTiling:
    """Cut an axis of ``length`` input pixels into tiles (see the module docstring for the scheme).

    Guarantees: every pixel a tile contributes to (with non-zero weight) lies at least ``spec.overlap``
    pixels inside that tile's window, unless the window already reaches the image border on that side;
    window starts and stops are multiples of ``size_multiple``.

    Raises:
        ValueError: length < 1 or size_multiple < 1.
    """
    if length < 1:
        raise ValueError(f"cannot tile an axis of length {length}")
    if size_multiple < 1:
        raise ValueError(f"size_multiple must be >= 1, got {size_multiple}")
    m = size_multiple
    reach = spec.overlap + spec.blend  # how far a window extends beyond its core towards a neighbour
    # + m - 1: window starts are rounded down to a multiple of m, which can cost up to m - 1 pixels of reach
    inner = _round_up(spec.tile + 2 * reach + m - 1, m) if spec.tile else 0
    padded = _round_up(length, m)
    if not spec.tile or length <= inner:
        return AxisTiling(length, padded, (0, length), (0,), (padded,), (0, 0))

    n = math.ceil(length / spec.tile)
    boundaries = tuple(round(k * length / n) for k in range(n + 1))
    cores = [b - a for a, b in zip(boundaries[:-1], boundaries[1:])]
    # fades on the two sides of a core must not meet, so a fade is at most half of either adjacent core
    ramps = (0, *(min(spec.blend, cores[k - 1] // 2, cores[k] // 2) for k in range(1, n)), 0)
    starts = tuple(0 if i == 0 else max((boundaries[i] - reach) // m * m, 0) for i in range(n))
    stops = tuple(
        padded if i == n - 1  # the last window ends at the border
        else min(_round_up(boundaries[1] + reach, m), padded) if i == 0  # the first is clipped at 0
        else min(starts[i] + inner, padded)
        for i in range(n)
    )
    tiling = AxisTiling(length, padded, boundaries, starts, stops, ramps)
    for i, (start, stop) in enumerate(zip(starts, stops)):  # the arithmetic above guarantees this; keep it explicit
        lo, hi = tiling.contribution(i)
        assert start % m == 0 and stop % m == 0 and 0 <= start <= lo and hi <= stop <= padded, (tiling, i)
        assert start == 0 or lo - start >= spec.overlap, (tiling, i)
        assert stop == padded or stop - hi >= spec.overlap, (tiling, i)
    return tiling


def resize_to_outscale(
    image: np.ndarray, native_scale: int, outscale: float | None, orig_hw: tuple[int, int]
) -> np.ndarray:
    """Resize a native-scale result to an arbitrary output scale, like RealESRGANer.

    Args:
        image: (H*native_scale, W*native_scale[, C]) float32 in [0, 1], C in {1, 3, 4}.
        native_scale: the scale the network produced.
        outscale: wanted scale; ``None`` or equal to ``native_scale`` returns ``image`` unchanged.
        orig_hw: (H, W) of the original input.

    Returns:
        (round(H*outscale), round(W*outscale)[, C]) float32 clipped to [0, 1] (Lanczos overshoots),
        resized with ``cv2.INTER_LANCZOS4``. (RealESRGANer truncates with ``int()``; rounding avoids losing a
        pixel to floating error, e.g. 3 * 3.3 = 9.899...)

    Raises:
        ValueError: outscale <= 0.
    """
    if outscale is None or outscale == native_scale:
        return image
    if outscale <= 0:
        raise ValueError(f"outscale must be > 0, got {outscale}")
    h, w = orig_hw
    size_wh = (max(1, round(w * outscale)), max(1, round(h * outscale)))
    resized = cv2.resize(image, size_wh, interpolation=cv2.INTER_LANCZOS4)
    if resized.ndim < image.ndim:  # cv2 drops a single channel axis
        resized = resized[..., None]
    return np.clip(resized, 0.0, 1.0, out=resized)


@dataclass
class _ImageJob:
    """One image in flight: its padded model input, its output accumulator and what is left to do."""

    rows: AxisTiling
    cols: AxisTiling
    model_input: np.ndarray  # (Hp, Wp, 1 or 3) float32, reflect-padded; gray stays 1 channel until batching
    output: np.ndarray  # (H*s, W*s, C) float32 accumulator, C = channels of the caller's image
    alpha: np.ndarray | None  # (H, W) float32 for RGBA input
    squeeze: bool  # the caller passed (H, W)
    outscale: float | None
    tiles_left: int = field(init=False)
    #: batches holding a tile of this image that the backend computed again in fp32 (``fp32_fallbacks``)
    fp32_batches: int = 0

    def __post_init__(self) -> None:
        self.tiles_left = self.rows.count * self.cols.count

    def tile_shape(self, row: int, col: int) -> tuple[int, int]:
        return self.rows.size(row), self.cols.size(col)


_Tile = tuple[_ImageJob, int, int]  # (image, row, col)


class TileBatcher:
    """Runs a :class:`Backend` over images of any size: tiles, batches tiles across images, blends.

    Example::

        batcher = TileBatcher(TorchBackend(model, scale=4), TileSpec(tile=256, overlap=64, blend=4, batch_size=8))
        for sr in batcher.run(slices):  # lazily; one result per input, in order
            ...
    """

    def __init__(self, backend: Backend, spec: TileSpec = TileSpec(), *, fallbacks: list[int] | None = None) -> None:
        """``fallbacks``: if given, one entry is appended per finished image, in output order: how many batches
        holding its tiles the backend recomputed in fp32 (its ``fp32_fallbacks`` counter; 0 for backends without)."""
        self.backend = backend
        self.spec = spec
        self.fallbacks = fallbacks

    @cached_property
    def scale(self) -> int:
        return int(self.backend.scale)

    @cached_property
    def size_multiple(self) -> int:
        return int(getattr(self.backend, "size_multiple", 1))

    def grid(self, height: int, width: int) -> tuple[AxisTiling, AxisTiling]:
        """The (rows, cols) tiling the engine uses for an image of ``height x width`` input pixels."""
        return plan_axis(height, self.spec, self.size_multiple), plan_axis(width, self.spec, self.size_multiple)

    def run(self, images: Iterable[np.ndarray], outscale: float | None = None) -> Iterator[np.ndarray]:
        """Upscale every image; see :func:`enhance_array` for the per-image contract.

        ``images`` is consumed lazily: an image is read when its first tile is needed, and its result is
        yielded (in input order) right after the batch holding its last tile has run.
        """
        in_flight: deque[_ImageJob] = deque()
        pending: dict[tuple[int, int], list[_Tile]] = {}  # one partial batch per tile shape
        for job in self._jobs(images, outscale):
            in_flight.append(job)
            for row in range(job.rows.count):
                for col in range(job.cols.count):
                    shape = job.tile_shape(row, col)
                    batch = pending.setdefault(shape, [])
                    batch.append((job, row, col))
                    if len(batch) == self.spec.batch_size:
                        del pending[shape]
                        self._run_batch(shape, batch)
                        yield from self._finished(in_flight)
            # a large image is finished before the next one starts (one output accumulator in memory);
            # small images wait for the next ones to fill their batches, a bounded number of them
            if job.rows.count * job.cols.count >= self.spec.batch_size or len(in_flight) >= self.spec.batch_size:
                yield from self._flush(pending, in_flight)
        yield from self._flush(pending, in_flight)

    def _flush(self, pending: dict[tuple[int, int], list[_Tile]], in_flight: deque[_ImageJob]) -> Iterator[np.ndarray]:
        """Run every partial batch (oldest shape first) and yield the images that are then complete."""
        while pending:
            shape = next(iter(pending))
            self._run_batch(shape, pending.pop(shape))
            yield from self._finished(in_flight)

    def _jobs(self, images: Iterable[np.ndarray], outscale: float | None) -> Iterator[_ImageJob]:
        for image in images:
            yield self._start(image, outscale)

    def _start(self, image: np.ndarray, outscale: float | None) -> _ImageJob:
        image = np.asarray(image)
        if not np.issubdtype(image.dtype, np.floating):
            raise TypeError(f"expected a float image in [0, 1], got dtype {image.dtype}")
        squeeze = image.ndim == 2
        if squeeze:
            image = image[..., None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(f"expected an (H, W) or (H, W, C) image with C in {{1, 3, 4}}, got shape {image.shape}")
        image = image.astype(np.float32, copy=False)
        height, width, channels = image.shape
        rows, cols = self.grid(height, width)
        model_input = image[..., :3] if channels >= 3 else image
        pad = ((0, rows.padded_length - height), (0, cols.padded_length - width), (0, 0))
        if pad[0][1] or pad[1][1]:
            model_input = np.pad(model_input, pad, mode="reflect")
        alpha = image[..., 3] if channels == 4 else None
        output = np.zeros((height * self.scale, width * self.scale, channels), dtype=np.float32)
        return _ImageJob(rows, cols, model_input, output, alpha, squeeze, outscale)

    def _run_batch(self, shape: tuple[int, int], batch: list[_Tile]) -> None:
        win_h, win_w = shape
        tiles = np.empty((len(batch), 3, win_h, win_w), dtype=np.float32)
        for slot, (job, row, col) in enumerate(batch):
            y0, x0 = job.rows.window_starts[row], job.cols.window_starts[col]
            # (h, w, 1 or 3) -> (1 or 3, h, w); a gray tile broadcasts to the 3 channels the model expects
            tiles[slot] = job.model_input[y0 : y0 + win_h, x0 : x0 + win_w].transpose(2, 0, 1)
        s = self.scale
        before = getattr(self.backend, "fp32_fallbacks", 0)
        upscaled = self.backend(tiles)
        if getattr(self.backend, "fp32_fallbacks", 0) != before:
            for job in {id(job): job for job, _, _ in batch}.values():
                job.fp32_batches += 1
        expected = (len(batch), 3, win_h * s, win_w * s)
        if upscaled.shape != expected:
            raise RuntimeError(f"backend {self.backend!r} returned shape {upscaled.shape}, expected {expected}")
        del tiles
        for slot, (job, row, col) in enumerate(batch):
            self._blend(job, row, col, upscaled[slot])
            job.tiles_left -= 1

    def _blend(self, job: _ImageJob, row: int, col: int, tile_out: np.ndarray) -> None:
        """Add one upscaled tile (3, win_h*s, win_w*s), weighted, into the job's output accumulator."""
        s = self.scale
        y0, y1 = job.rows.contribution(row)
        x0, x1 = job.cols.contribution(col)
        oy = (y0 - job.rows.window_starts[row]) * s
        ox = (x0 - job.cols.window_starts[col]) * s
        region = tile_out[:, oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s]
        if job.model_input.shape[2] == 1:
            region = region.mean(axis=0, keepdims=True)  # grayscale stays grayscale
        weights = job.rows.weights(row, s)[:, None, None] * job.cols.weights(col, s)[None, :, None]
        target = job.output[y0 * s : y1 * s, x0 * s : x1 * s, : region.shape[0]]
        target += region.transpose(1, 2, 0) * weights

    def _finished(self, in_flight: deque[_ImageJob]) -> Iterator[np.ndarray]:
        while in_flight and in_flight[0].tiles_left == 0:
            yield self._finish(in_flight.popleft())

    def _finish(self, job: _ImageJob) -> np.ndarray:
        if self.fallbacks is not None:
            self.fallbacks.append(job.fp32_batches)
        output = np.clip(job.output, 0.0, 1.0, out=job.output)
        height, width = job.rows.length, job.cols.length
        if job.alpha is not None:
            # like RealESRGANer: alpha is not a picture the SR model knows; bicubic is enough
            size_wh = (width * self.scale, height * self.scale)
            output[..., 3] = np.clip(cv2.resize(job.alpha, size_wh, interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
        output = resize_to_outscale(output, self.scale, job.outscale, (height, width))
        return output[..., 0] if job.squeeze else output


def enhance_many(
    backend: Backend, images: Iterable[np.ndarray], tile: TileSpec = TileSpec(), *, outscale: float | None = None,
    fallbacks: list[int] | None = None,
) -> Iterator[np.ndarray]:
    """Upscale a stream of images, batching tiles across images. Lazy; yields results in input order.

    Each image and result follow the contract of :func:`enhance_array`; ``fallbacks``: see :class:`TileBatcher`.
    """
    return TileBatcher(backend, tile, fallbacks=fallbacks).run(images, outscale=outscale)


def enhance_array(
    backend: Backend, image: np.ndarray, tile: TileSpec = TileSpec(), *, outscale: float | None = None
) -> np.ndarray:
    """Upscale one image.

    Args:
        backend: the network runner; its ``scale`` is the native scale.
        image: (H, W) or (H, W, C) float in [0, 1], C in {1, 3, 4}, RGB(A) channel order. Gray images go
            through the model replicated to RGB and are averaged back to one channel; for RGBA only the RGB
            goes through the model and alpha is upscaled with cv2 bicubic.
        tile: tiling and batching (``TileSpec()`` = whole image in one pass).
        outscale: final scale when it differs from the native one (Lanczos resize afterwards).

    Returns:
        float32 array in [0, 1] with the input's layout: (H*s, W*s[, C]) with s = ``outscale`` or the
        native scale (sides rounded to the nearest pixel).

    Raises:
        TypeError: integer image (normalise to [0, 1] first).
        ValueError: unsupported shape.
    """
    return next(enhance_many(backend, [image], tile, outscale=outscale))


def on_gpu(backend: Backend) -> bool:
    """Whether ``backend`` runs its network on a GPU (a torch CUDA device or an ONNX Runtime GPU provider)."""
    device = getattr(backend, "device", None)
    if device is not None:
        return getattr(device, "type", str(device)) == "cuda"
    providers = getattr(backend, "providers", None) or []
    return any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in providers)


#: Tiles per backend call when the configuration leaves it open. On CPU one tile at a time is fastest: the
#: activations of a 64-feature RRDBNet outgrow the caches as a batch grows (jobs/bench_enhance.py measured
#: batch 1 ~10 % faster than 4 on 2 cores, docs/PERFORMANCE.md); a GPU needs several tiles to fill its SMs.
AUTO_BATCH_SIZE = {"cpu": 1, "gpu": 8}


def auto_batch_size(backend: Backend) -> int:
    """The default tiles per call for ``backend``: :data:`AUTO_BATCH_SIZE` by device kind."""
    return AUTO_BATCH_SIZE["gpu" if on_gpu(backend) else "cpu"]
