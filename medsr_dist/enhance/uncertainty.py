"""The uncertainty map of the diffusion family: ONE hook of the nightly job, looked up by family.

A model of a family in :data:`HOOKS` (``ldm``) drawing K > 1 samples per image gives each output a per-pixel
standard-deviation map. The job's stages meet it in three places only, all here:

- replica (:class:`StdMaps`, built by :func:`replica_hook` for that family only, and only when K > 1): each
  enhanced row gets ``std`` (F, H', W') uint16 and ``uncertainty_p99``;
- commit (:func:`write_uncertainty`): the map written beside the output, its manifest fields returned;
- status (:func:`uncertainty_summary`, :func:`uncertainty_flag`): what ``medsr status`` says of them.

Rows of other families carry :data:`EMPTY` (``std`` :data:`NO_STD`, ``uncertainty_p99`` NaN).
"""
from __future__ import annotations

import math
import posixpath
from collections.abc import Iterator

import numpy as np

from medsr_dist.enhance.sides import output_side
from medsr_dist.infer.rows import NO_OUTPUT, NO_PIXELS
from medsr_dist.io.image import ImageMeta, encode_image
from medsr_dist.uris import is_below

NO_STD = np.zeros((0, 0, 0), np.uint16)  # rows without an uncertainty map (one sample, or not enhanced)


def empty_columns() -> dict:
    """The uncertainty columns of a row without a map (every row leaving a replica has them)."""
    return {"std": NO_STD, "uncertainty_p99": math.nan}


class StdMaps:
    """The replica hook of a backend drawing K > 1 diffusion samples: each image's std tiles are kept until its std
    map is blended (see :meth:`__call__`)."""

    def __init__(self, replica):
        self.replica = replica
        replica.backend.keep_std = True

    def __call__(self, rows: Iterator[dict]) -> Iterator[dict]:
        """Each enhanced row with its std map: ``std`` (F, H', W') uint16 (:func:`~medsr_dist.infer.diffusion_backend.std_to_png16`,
        65535 = a std of 0.25 of the range) and ``uncertainty_p99`` (of the float map), computed from the std
        tiles the sampler kept for it, blended by the engine like the image (no second sampling). A row whose map
        cannot be made becomes an error row: an output asked with K samples is not written without its map."""
        # lazy: diffusion_backend imports torch; only a diffusion replica gets here
        from medsr_dist.infer.diffusion_backend import std_map, std_to_png16, uncertainty_p99

        backend, spec, outscale = self.replica.backend, self.replica.spec, self.replica.settings.outscale
        try:
            for row in rows:
                if row["status"] == "todo" and len(row["output"]):
                    try:
                        maps = np.stack([std_map(backend, frame, spec, outscale=outscale) for frame in row["pixels"]])
                        row.update(std=std_to_png16(maps), uncertainty_p99=uncertainty_p99(maps))
                    except Exception as exc:  # noqa: BLE001 - this row fails alone
                        row.update(status="error", error=f"uncertainty map failed: {type(exc).__name__}: {exc}",
                                   output=NO_OUTPUT, std=NO_STD)
                        row = {**row, "pixels": NO_PIXELS, "header": b""}
                yield row
        finally:
            backend.clear_std()  # tiles of failed rows; every image's own were consumed by its map


def _diffusion_hook(replica) -> StdMaps | None:
    # lazy: diffusion_backend imports torch; only a diffusion family's replica gets here
    from medsr_dist.infer.diffusion_backend import samples_uncertainty

    return StdMaps(replica) if samples_uncertainty(replica.backend) else None


#: {model family: factory of its replica hook (None when this model draws one sample)}.
HOOKS = {"ldm": _diffusion_hook}


def replica_hook(replica) -> StdMaps | None:
    """The uncertainty hook of ``replica``'s model family (None for a family without maps, e.g. a GAN)."""
    factory = HOOKS.get(getattr(replica.model, "family", ""))
    return factory(replica) if factory is not None else None


def write_uncertainty(spec, item: dict, row: dict, meta, scale: float, provenance: dict) -> dict:
    """Write the row's std map (K > 1 diffusion samples) beside its output: ``<output stem>.std.png`` (16-bit
    gray, 65535 = a std of 0.25 of the intensity range, the output's provenance + what the values mean) or,
    for DICOM input, ``<output stem>.std.dcm``: a derived object of its own series
    (:func:`~medsr_dist.infer.diffusion_backend.uncertainty_dicom`). Returns the manifest fields
    (``uncertainty_p99``, ``uncertainty_key``), or {} for rows without a map. ``spec``: the JobSpec."""
    std = np.asarray(item.get("std", NO_STD))
    if not std.size:
        return {}
    # lazy: diffusion_backend imports torch; only rows with a map get here
    from medsr_dist.infer.diffusion_backend import STD_FULL_SCALE, uncertainty_dicom

    samples = int((spec.params.get("sampling") or {}).get("samples", 0))
    stem, _ = posixpath.splitext(row["output_key"])
    text = {**provenance, "medsr:uncertainty": (
        f"per-pixel standard deviation of {samples} diffusion samples of {posixpath.basename(row['output_key'])}; "
        f"stored 65535 = a std of {STD_FULL_SCALE:g} of the intensity range; a hallucination-risk indicator, "
        f"not an error bar")}
    if meta.format == "dicom":
        data = uncertainty_dicom(std, bytes(item["header"]), text, scale=scale, samples=samples,
                                 compression=spec.dicom_compression)
        key = output_side(spec.output).std_key(spec.output, stem, data)
    else:
        key = stem + ".std.png"
        png = ImageMeta(format="png", dtype="uint16", bits_stored=16, channels=1, photometric="MONOCHROME2")
        data = encode_image(std[0].astype(np.float32) / np.float32(65535), png, provenance=text)
    if not is_below(key, spec.output):
        raise ValueError(f"uncertainty key {key} is not under the output prefix {spec.output}")
    spec.storage.write_bytes(key, data)
    return {"uncertainty_p99": float(item["uncertainty_p99"]), "uncertainty_key": key}


def uncertainty_p99_of(row: dict) -> float | None:
    """A manifest row's ``uncertainty_p99`` when it has a std map, else None."""
    return row.get("uncertainty_p99") if row.get("uncertainty_key") else None


def exceeds(row: dict, threshold: float | None) -> bool:
    """Whether a committed row's uncertainty flags it for review (``enhance.uncertainty_threshold``)."""
    return threshold is not None and row.get("uncertainty_p99", 0.0) > threshold


def uncertainty_summary(rows: list[dict]) -> dict | None:
    """Median/max ``uncertainty_p99`` of the outputs that have a std map (ldm, K > 1 samples), or None."""
    values = [r["uncertainty_p99"] for r in rows if r.get("uncertainty_key") and math.isfinite(r["uncertainty_p99"])]
    return {"outputs": len(values), "median": float(np.median(values)), "max": max(values)} if values else None
