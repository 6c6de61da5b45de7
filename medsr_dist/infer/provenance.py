"""Provenance and parameters of an output: ONE builder for the nightly job, Serve and volume items.

Contract: the parameters dicts (:func:`enhance_params`, :func:`serve_params`, :func:`volume_params`) are part of an
output's identity (``output_id`` hashes their sorted JSON) and of its provenance; :func:`output_provenance` is the
text written into an output file and repeated in its manifest row. The dicts produced here are byte for byte those of
medsr-dist before the split (same keys, same order): changing one changes every output id.
"""
from __future__ import annotations

import json

from medsr_dist import __version__
from medsr_dist.infer.engine import ENGINE_REVISION

NOTE = "Enhanced by a super-resolution model: an enhancement, not a new acquisition. Compare with the original."
#: The note of a volume item's output (:mod:`medsr_dist.enhance.volumes`).
VOLUME_NOTE = "Isotropic reconstruction by a super-resolution model: an enhancement, not a new acquisition."
#: ``params["kind"]`` of a volume item.
VOLUME_KIND = "volume"


def _engine_params(tiling, backend: str, precision: str) -> dict:
    """The engine's part of every parameters dict: tiling (of an EnhanceConfig or EngineSettings), backend,
    precision and :data:`~medsr_dist.infer.engine.ENGINE_REVISION`."""
    return {"tile": tiling.tile, "tile_overlap": tiling.tile_overlap, "tile_blend": tiling.tile_blend,
            "backend": backend, "precision": precision, "engine": ENGINE_REVISION}


def enhance_params(e, model, *, precision: str | None = None) -> dict:
    """The parameters that determine an output's pixels (part of its identity and provenance), with the
    engine's revision (:data:`~medsr_dist.infer.engine.ENGINE_REVISION`): a run of a newer engine does not take an
    older engine's outputs for its own.

    ``e``: the EnhanceConfig; ``model``: the ModelFile. ``precision`` is the one the replicas will run
    (:func:`~medsr_dist.infer.model_file.runnable_precision`: a CPU asked for fp16 runs fp32, and says so); ``None``
    takes ``enhance.precision`` as written.
    """
    params = {"scale": model.scale, "outscale": e.outscale or model.scale,
              **_engine_params(e, e.backend, precision or e.precision)}
    if model.sampling is not None:  # an iterative sampler: DDIM-50's output is not DDPM-300's (model.with_sampling)
        params["sampling"] = model.sampling  # sampler, steps, samples K, output, seed
        params["schedule"] = dict(model.generator.get("schedule") or {})  # zero_terminal_snr, prediction type, T
    return params


def serve_params(model, settings, scale: float) -> dict:
    """The parameters of a Serve response (``settings``: the replica's EngineSettings; ``scale``: the request's)."""
    params = {"scale": model.scale, "outscale": scale, **_engine_params(settings, settings.backend, settings.precision)}
    if model.sampling is not None:  # ldm: the sampler, steps and seed that drew this answer (as the nightly job's)
        params["sampling"] = model.sampling
    return params


def volume_params(e, mri, model, precision: str, backend: str | None = None) -> dict:
    """The parameters that determine a volume output (its identity and provenance); ``backend``: the one chosen
    for the volume model (default ``e.backend``)."""
    return {"kind": VOLUME_KIND, "factor": mri.factor, "fusion": mri.fusion, "profile": mri.profile,
            "scale": model.scale, **_engine_params(e, backend or e.backend, precision)}


def output_provenance(*, model_name: str, model_sha256: str, params_json: str, source: str, source_sha256: str,
                      scale: str | None = None, note: str = NOTE, software: str = "", extra: dict | None = None
                      ) -> dict[str, str]:
    """The provenance written into an output file (and repeated in its manifest row): note, model, its sha256,
    the scale (when given), the parameters' sorted JSON, the source and its sha256, the software (``software``:
    a suffix such as `` (serve)``), then ``extra`` keys."""
    out = {"medsr:note": note, "medsr:model": model_name, "medsr:model_sha256": model_sha256}
    if scale is not None:
        out["medsr:scale"] = scale
    out.update({"medsr:params": params_json, "medsr:source": source, "medsr:source_sha256": source_sha256,
                "medsr:software": f"medsr-dist {__version__}{software}"})
    out.update(extra or {})
    return out


def provenance_source(mode: str, input_key: str, iid: str) -> str:
    """What an output's provenance names its input by (``medsr:source``), per ``enhance.provenance_source``
    (``mode``): the item id (``item_id``, the default: the manifest maps it back to the key, under the manifest's
    access control) or the input key itself (``key``). Keys often hold patient names or accession numbers, and
    outputs travel further than manifests. (Serve names its source ``request``.)"""
    if mode not in ("item_id", "key"):
        raise ValueError(f"enhance.provenance_source must be item_id or key, not {mode!r}")
    return input_key if mode == "key" else iid


def params_json(params: dict) -> str:
    """How parameters are written (provenance, manifests): sorted JSON."""
    return json.dumps(params, sort_keys=True)
