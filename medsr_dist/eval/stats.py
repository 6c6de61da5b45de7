"""Summary statistics of per-image scores and paired comparisons between models.

Every model is scored on the same images, so models are compared *paired*: the per-image differences
``model - baseline`` are averaged, and a percentile bootstrap over images (resampling the differences
with replacement, seeded) gives the confidence interval of that mean. Pairing removes the image-to-image
variation that both models share (a hard image is hard for both), which an unpaired comparison of the two
means would count as noise.

Non-finite values (PSNR of identical images is ``inf``) and missing values (an image a model failed on) are
left out; ``n`` always says how many values a number rests on.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["PairedComparison", "Summary", "paired_bootstrap", "summarize"]

_CHUNK = 2000  # bootstrap resamples drawn at once (bounds memory at chunk * n indices)


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof=1; NaN for n < 2), min and max of ``n`` finite values."""

    n: int
    mean: float
    std: float
    min: float
    max: float

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(values: Sequence[float | None]) -> np.ndarray:
    array = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return array[np.isfinite(array)]


def summarize(values: Sequence[float | None]) -> Summary:
    """Summary of the finite values among ``values`` (``None``/NaN/inf are left out); NaNs when none is left."""
    finite = _finite(values)
    if finite.size == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    std = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
    return Summary(int(finite.size), float(finite.mean()), std, float(finite.min()), float(finite.max()))


@dataclass(frozen=True)
class PairedComparison:
    """Mean of the paired differences ``model - baseline`` with its bootstrap confidence interval.

    Attributes:
        n: images where both values are finite.
        mean_difference: mean of the differences (NaN when n = 0).
        ci_low, ci_high: percentile bootstrap interval at ``confidence`` (both equal the mean when n = 1;
            NaN when n = 0).
        confidence: e.g. 0.95.
        samples: bootstrap resamples.
        seed: seed of the resampling (same data and seed: same interval).
    """

    n: int
    mean_difference: float
    ci_low: float
    ci_high: float
    confidence: float
    samples: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of zero (a difference the data support)."""
        return self.n > 1 and (self.ci_low > 0 or self.ci_high < 0)


def paired_bootstrap(
    values: Sequence[float | None],
    baseline: Sequence[float | None],
    *,
    samples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """Paired comparison of ``values`` with ``baseline`` (same images, same order).

    Args:
        values, baseline: per-image scores; pairs where either is missing or non-finite are left out.
        samples: bootstrap resamples (>= 1).
        confidence: interval level in (0, 1).
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        The comparison; the interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
        percentiles of the resampled means.

    Raises:
        ValueError: different lengths, samples < 1 or confidence outside (0, 1).
    """
    if len(values) != len(baseline):
        raise ValueError(f"paired values need the same length, got {len(values)} and {len(baseline)}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    a = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    b = np.array([np.nan if v is None else float(v) for v in baseline], dtype=np.float64)
    diff = (a - b)[np.isfinite(a) & np.isfinite(b)]
    n = int(diff.size)
    if n == 0:
        return PairedComparison(0, math.nan, math.nan, math.nan, confidence, samples, seed)
    mean = float(diff.mean())
    if n == 1:
        return PairedComparison(1, mean, mean, mean, confidence, samples, seed)
    rng = np.random.default_rng(seed)
    means = np.empty(samples, dtype=np.float64)
    for start in range(0, samples, _CHUNK):
        count = min(_CHUNK, samples - start)
        means[start : start + count] = diff[rng.integers(0, n, size=(count, n))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return PairedComparison(n, mean, float(low), float(high), confidence, samples, seed)
