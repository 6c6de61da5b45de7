"""Anisotropic volume -> isotropic: every through-plane slice through the one inference engine, restacked, fused.

For a volume whose low-resolution axis is ``a`` (largest voxel size) and a factor ``k``:

1. For each of the two other axes ``b`` (the orientations whose slices contain ``a``), slice the volume along
   ``b``, map it to [0, 1] (:func:`~medsr_dist.mri.simulate.intensity_window`), interpolate the low-resolution
   axis onto the fine grid (cubic B-spline, :func:`~medsr_dist.mri.simulate.upsample_matrix`), put it as the rows
   (the pairs' convention) and stream the slices through :func:`medsr_dist.infer.engine.enhance_many` with a
   scale-1 backend: the engine tiles and batches tiles across slices.
2. Restack each orientation's refined slices into a volume of the fine grid.
3. Fuse: ``"mean"`` (the seed's voxelwise mean of the two) or ``"fourier"`` (Fourier burst accumulation, below).

The output's affine comes from :func:`~medsr_dist.mri.volume.resampled_affine` with factor ``1/k`` (same field of
view; every input voxel is the centroid of the ``k`` output voxels that subdivide it); its spacing along ``a`` is
``spacing / k`` exactly. The source dtype and scaling are kept for writing.

A **non-integer** ``k`` (e.g. 3.3 mm slices to ~1 mm) resamples onto a fine grid instead of subdividing: ``n``
thick voxels become ``round(n * k)`` fine ones covering the same field of view (spacing ``spacing * n /
round(n * k)``, within half a voxel over the axis of ``spacing / k``), fine voxel ``j`` interpolated at input index
``(j + 1/2) n / round(n k) - 1/2`` (:func:`medsr_dist.mri.profile.upsample_matrix`), and the affine is
``resampled_affine`` with factor ``n / round(n k)``: each input voxel's centre is the centroid of the fine extent
it covers, exactly (:attr:`ReconstructionPlan.fine_step`).

**Fourier burst accumulation** (Delbracio & Sapiro 2015, used for orthogonal SR stacks in SMORE/ECLARE): with
``F_s`` the 3-D FFT of stack ``s``, each frequency takes ``sum_s w_s F_s`` with
``w_s = G(|F_s|)^p / sum_t G(|F_t|)^p``, ``G`` a Gaussian smoothing of the magnitude over ``fba_sigma`` frequency
bins and ``p = fba_power`` (11, the FBA paper's value). Each stack is sharp in the plane it was refined in; the
weighting takes every frequency mostly from the stack that has the most energy there (detail the other blurred
away) instead of averaging it down. Weights are computed in the log domain (``p`` = 11 overflows float32
otherwise).

**Memory** (``V`` = bytes of the float32 output): mean fusion accumulates straight into the output and converts
it to physical values in place: beyond the input, peak = V plus the engine's in-flight slices (``batch_size``
slices and their tiles, engine docstring). Fourier fusion holds one stack and one half spectrum (complex64, ~V)
at a time, then both spectra and the log-magnitude weights (float32, ~V/2 each), fused in place; scipy's rfftn
needs a complex temporary of ~V: peak ~4 V. Measured by jobs/bench_mri.py (tracemalloc, numpy allocations) for a
512 x 512 x 75 -> 512 x 512 x 300 volume (V = 300 MiB): mean 328 MiB (1.09 V), Fourier 1209 MiB (4.0 V).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from medsr_dist.infer.engine import TileSpec, enhance_many
from medsr_dist.mri.profile import fine_count
from medsr_dist.mri.profile import upsample_matrix as spline_matrix
from medsr_dist.mri.simulate import IntensityWindow, check_factor, intensity_window, upsample_matrix
from medsr_dist.mri.volume import Volume, VolumeError, check_orthonormal, low_resolution_axis, resampled_affine

log = logging.getLogger(__name__)

FUSIONS = ("mean", "fourier")


@dataclass(frozen=True)
class ReconstructionPlan:
    """What :func:`reconstruct` will do to a volume, computed before any slice is touched."""

    lr_axis: int
    factor: int | float
    slice_axes: tuple[int, int]
    input_shape: tuple[int, int, int]
    output_shape: tuple[int, int, int]
    output_spacing: tuple[float, float, float]
    window: IntensityWindow

    @property
    def fine_step(self) -> float:
        """Output voxel size along the low-resolution axis over the input's (:func:`fine_step`)."""
        return fine_step(self.factor, self.input_shape[self.lr_axis], self.output_shape[self.lr_axis])

    @property
    def slices(self) -> int:
        """Slices the engine refines (both orientations)."""
        return sum(self.output_shape[b] for b in self.slice_axes)

    @property
    def output_voxels(self) -> int:
        return int(np.prod(self.output_shape))


def fine_step(factor: int | float, n_in: int, n_out: int) -> float:
    """Output voxel size along the low-resolution axis over the input's: ``1 / k`` for an integer ``k``,
    ``n_in / n_out`` (the field of view kept) for a non-integer one (module doc)."""
    return 1.0 / factor if isinstance(factor, int) else n_in / n_out


def plan_reconstruction(volume: Volume, factor: float, lr_axis: int | None = None) -> ReconstructionPlan:
    """Check the volume and work out the geometry.

    Raises:
        VolumeError: non-orthonormal affine, no single low-resolution axis (when ``lr_axis`` is None), an axis too
            short to interpolate (< 2 voxels along ``lr_axis``).
        ValueError: factor not a number > 1.
    """
    factor = check_factor(factor)
    check_orthonormal(volume.affine, volume.source)
    axis = low_resolution_axis(volume.spacing, volume.source) if lr_axis is None else int(lr_axis)
    if axis not in (0, 1, 2):
        raise ValueError(f"lr_axis must be 0, 1 or 2, got {lr_axis}")
    n = volume.shape[axis]
    if n < 2:
        raise VolumeError(f"{volume.source}: {n} voxel(s) along the low-resolution axis; need at least 2")
    out_shape = list(volume.shape)
    out_shape[axis] = n * factor if isinstance(factor, int) else fine_count(n, factor)
    spacing = volume.spacing.copy()
    spacing[axis] = spacing[axis] / factor if isinstance(factor, int) else spacing[axis] * n / out_shape[axis]
    return ReconstructionPlan(
        lr_axis=axis, factor=factor, slice_axes=tuple(b for b in range(3) if b != axis),  # type: ignore[arg-type]
        input_shape=volume.shape, output_shape=tuple(out_shape), output_spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        window=intensity_window(volume.data, factor, n),
    )


def interpolated_slices(volume: Volume, plan: ReconstructionPlan, slice_axis: int) -> Iterator[np.ndarray]:
    """The slices along ``slice_axis``, in [0, 1], low-resolution axis interpolated onto the fine grid and placed
    as the rows: each (n * k, m) float32, m the remaining axis' length. Lazy: one slice at a time."""
    n = plan.input_shape[plan.lr_axis]
    matrix = (upsample_matrix(n, plan.factor) if isinstance(plan.factor, int)
              else spline_matrix(n, plan.output_shape[plan.lr_axis])).astype(np.float32)
    others = [a for a in range(3) if a != slice_axis]
    for index in range(volume.shape[slice_axis]):
        plane = np.take(volume.data, index, axis=slice_axis)  # the two remaining axes in order
        if others[0] != plan.lr_axis:
            plane = plane.T  # the low-resolution axis is the plane's second axis: make it the rows
        yield matrix @ plan.window.to_unit(plane)


def _restore_orientation(refined: np.ndarray, plan: ReconstructionPlan, slice_axis: int) -> np.ndarray:
    """Undo the rows convention: the refined slice in the order of the volume's remaining axes."""
    others = [a for a in range(3) if a != slice_axis]
    return refined if others[0] == plan.lr_axis else refined.T


def _index(axis: int, i: int) -> tuple:
    return (slice(None),) * axis + (i,)


def reconstruct(volume: Volume, backend, factor: float, *, tile: TileSpec = TileSpec(), fusion: str = "mean",
                lr_axis: int | None = None, fba_power: float = 11.0, fba_sigma: float = 1.0) -> Volume:
    """Reconstruct an isotropic volume from an anisotropic one (module doc).

    Args:
        volume: the anisotropic input; not modified.
        backend: a scale-1 :class:`~medsr_dist.infer.backends.Backend` (refines (B, 3, h, w) -> same size).
        factor: ``k > 1``: the output spacing along the low-resolution axis is its spacing / k (a non-integer
            ``k``: as near as a whole number of voxels over the field of view allows, module doc).
        tile: the engine's tiling and batching.
        fusion: ``"mean"`` or ``"fourier"``.
        lr_axis: override the low-resolution axis (default: the largest spacing).
        fba_power, fba_sigma: Fourier burst accumulation's exponent and magnitude smoothing (frequency bins).

    Returns:
        A :class:`Volume` of shape ``plan.output_shape`` (physical values), affine with the fine spacing.

    Raises:
        ValueError: backend scale is not 1, unknown fusion, bad factor.
        VolumeError: see :func:`plan_reconstruction`.
    """
    if int(getattr(backend, "scale", 0)) != 1:
        raise ValueError(f"through-plane refinement needs a scale-1 backend, got scale {getattr(backend, 'scale', None)}")
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    plan = plan_reconstruction(volume, factor, lr_axis)
    log.info("reconstruct %s: %s -> %s, low-resolution axis %d, x%s, %s fusion", volume.source, plan.input_shape,
             plan.output_shape, plan.lr_axis, plan.factor, fusion)
    if fusion == "mean":
        fused = np.zeros(plan.output_shape, dtype=np.float32)
        for b in plan.slice_axes:
            for i, refined in enumerate(enhance_many(backend, interpolated_slices(volume, plan, b), tile)):
                fused[_index(b, i)] += 0.5 * _restore_orientation(refined, plan, b)
    else:
        spectra = []
        for b in plan.slice_axes:
            stack = np.empty(plan.output_shape, dtype=np.float32)
            for i, refined in enumerate(enhance_many(backend, interpolated_slices(volume, plan, b), tile)):
                stack[_index(b, i)] = _restore_orientation(refined, plan, b)
            spectra.append(_spectrum(stack))
            del stack
        fused = fourier_burst_accumulation(spectra, plan.output_shape, power=fba_power, sigma=fba_sigma)
        del spectra
    fused *= np.float32(plan.window.high - plan.window.low)  # back to physical values, in place (no second V)
    fused += np.float32(plan.window.low)
    out = volume.with_data(fused, resampled_affine(volume.affine, plan.lr_axis, plan.fine_step))
    out.facts.update(lr_axis=plan.lr_axis, factor=plan.factor, fusion=fusion)
    return out


def _spectrum(stack: np.ndarray) -> np.ndarray:
    from scipy import fft

    return fft.rfftn(stack, workers=-1)


def fourier_burst_accumulation(spectra: list[np.ndarray], shape: tuple[int, ...], *, power: float = 11.0,
                               sigma: float = 1.0) -> np.ndarray:
    """Fuse volumes given by their half spectra (``scipy.fft.rfftn`` of float32 volumes of ``shape``).

    ``w_s = G(|F_s|)^p / sum_t G(|F_t|)^p`` per frequency (``G``: Gaussian of ``sigma`` bins, wrapping at the
    spectrum's borders; ``sigma=0``: none). The spectra are consumed (overwritten) to bound memory.

    Returns:
        The fused volume, float32 of ``shape``. Equal inputs give that input back (weights sum to 1).
    """
    from scipy import fft, ndimage

    logs = []
    for spectrum in spectra:
        magnitude = np.abs(spectrum).astype(np.float32)
        if sigma > 0:
            magnitude = ndimage.gaussian_filter(magnitude, sigma, mode="wrap")
        logs.append(np.log(np.maximum(magnitude, np.float32(1e-20)), out=magnitude) * np.float32(power))
    if len(spectra) == 2:  # in place: w_0 = 1 / (1 + exp(p log G_1 - p log G_0)); F = F_1 + w_0 (F_0 - F_1)
        weight = np.subtract(logs[1], logs[0], out=logs[1])
        del logs
        np.clip(weight, -80.0, 80.0, out=weight)
        np.exp(weight, out=weight)
        weight += 1.0
        np.reciprocal(weight, out=weight)
        fused = spectra[0]
        fused -= spectra[1]
        fused *= weight
        fused += spectra[1]
        del weight
        spectra[1] = None
    else:  # softmax over the stacks in the log domain
        top = np.maximum.reduce(logs)
        total = np.zeros_like(top)
        for lg in logs:
            lg -= top
            np.exp(lg, out=lg)  # now the unnormalised weight, in (0, 1]
            total += lg
        fused = None
        for i, (spectrum, weight) in enumerate(zip(spectra, logs)):
            weight /= total
            spectrum *= weight
            fused = spectrum if fused is None else fused.__iadd__(spectrum)
            spectra[i] = None
        del logs, total, top
    return fft.irfftn(fused, s=shape, workers=-1).astype(np.float32, copy=False)
