"""What the job's CPU stages know of a run (:class:`JobSpec`), and the rules every stage applies to a key.

Contract: :class:`JobSpec` is pickled into every task; :func:`rel_key` normalises an input key (refusing ``..`` and
absolute segments); :func:`under` says whether an output lies under the output prefix (DICOMweb URIs included);
:func:`item_kind` names the kind of item a key is (``image`` or ``volume``), the key of the ``{kind: handler}``
tables of the stages; :func:`keyed_by` / :func:`row_model` give the model and parameters a kind's outputs are keyed
by; :func:`error_reason` turns an exception into a row's reason.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass

from medsr_dist.enhance.volumes import is_volume_key
from medsr_dist.infer.model_file import ModelFile
from medsr_dist.infer.provenance import VOLUME_KIND, output_provenance, params_json, provenance_source
from medsr_dist.io.image import ImageDecodeError
from medsr_dist.pacs.dicomweb import PacsError
from medsr_dist.storage import Storage
from medsr_dist.uris import relative_key

IMAGE_KIND = "image"


@dataclass(frozen=True)
class JobSpec:
    """What the CPU stages need to know; pickled into every task (the Storage ships only its config).

    ``max_input_pixels`` / ``max_output_pixels``: header limits (frames included; see :class:`ReadDecode`);
    ``max_input_bytes``: file size limit (listing size, before reading), also the Deflated DICOM inflate bound;
    ``log_keys``: whether logs may name input keys (else item ids); ``dicom_compression``: of derived DICOM.
    """

    storage: Storage
    input: str
    output: str
    model: ModelFile
    params: dict
    run_id: str
    threshold_db: float
    max_input_pixels: int = 100_000_000
    max_output_pixels: int = 400_000_000
    max_input_bytes: int = 1 << 30
    decode_timeout_s: float = 0.0  # > 0 with decode_memory_bytes > 0: decode in a capped child (io/bounded.py)
    decode_memory_bytes: int = 0
    max_attempts: int = 3
    log_keys: bool = False
    dicom_compression: str = "none"
    uncertainty_threshold: float | None = None  # flag rows whose uncertainty_p99 exceeds it (K > 1 samples)
    manifest: str = ""
    volumes: dict | None = None  # volume items' model and parameters (medsr_dist/enhance/volumes.py plan_volume_job)
    provenance_source: str = "item_id"  # enhance.provenance_source: what outputs name their input by (item_id | key)

    @property
    def params_json(self) -> str:
        return params_json(self.params)

    @property
    def records(self) -> str:
        """Where ``_manifest/`` (manifests, item records, lease, watermark) lives: ``enhance.manifest``, else the
        output prefix."""
        return (self.manifest or self.output).rstrip("/")


def rel_key(spec: JobSpec, key: str) -> str:
    """The input's key below ``enhance.input``, normalised (the input's own name when the input is one file).

    Raises ValueError for keys with ``..`` or absolute segments (see :func:`~medsr_dist.uris.relative_key`)."""
    if key.rstrip("/") == spec.input.rstrip("/"):
        return posixpath.basename(key.rstrip("/"))
    return relative_key(key, spec.input)


def item_kind(spec: JobSpec, key: str) -> str:
    """The kind of item ``key`` is: :data:`~medsr_dist.infer.provenance.VOLUME_KIND` for a NIfTI file or a series
    folder when the run has volume items (:func:`~medsr_dist.enhance.volumes.is_volume_key`), else
    :data:`IMAGE_KIND`."""
    return VOLUME_KIND if spec.volumes is not None and is_volume_key(key) else IMAGE_KIND


def _image_model(spec: JobSpec) -> dict:
    return {"model_name": spec.model.name, "model_sha256": spec.model.sha256, "params": spec.params_json}


def _volume_model(spec: JobSpec) -> dict:
    vm = spec.volumes["model"]
    return {"model_name": vm.name if vm is not None else "", "model_sha256": vm.sha256 if vm is not None else "",
            "params": params_json(spec.volumes["params"])}


def _image_keyed_by(spec: JobSpec) -> tuple[str, dict]:
    return spec.model.sha256, spec.params


def _volume_keyed_by(spec: JobSpec) -> tuple[str, dict]:
    if spec.volumes["model"] is None:  # no volume model: keyed like an image (the row is an error anyway)
        return _image_keyed_by(spec)
    return spec.volumes["model"].sha256, spec.volumes["params"]


#: {kind: (model and parameters its outputs are keyed by, its manifest row's model columns)}.
_MODEL_OF = {IMAGE_KIND: (_image_keyed_by, _image_model), VOLUME_KIND: (_volume_keyed_by, _volume_model)}


def keyed_by(spec: JobSpec, key: str) -> tuple[str, dict]:
    """(model sha256, parameters) an input's output is keyed by: the volume model's for volume items."""
    return _MODEL_OF[item_kind(spec, key)][0](spec)


def row_model(spec: JobSpec, key: str) -> dict:
    """``model_name``, ``model_sha256`` and ``params`` of an input's manifest row: the volume model's
    (``enhance.volumes.checkpoint``, or enhance.checkpoint when it is the scale-1 one) and the volume parameters
    for volume items, empty when no volume model is available (the row's error says why); the job model's else."""
    return _MODEL_OF[item_kind(spec, key)][1](spec)


def error_reason(exc: BaseException) -> str:
    """A row's reason for ``exc``: a decode error's own reason, a PACS error's text (endpoint, request, HTTP status,
    the PACS's reason), else the exception's type and message (sanitise it before it reaches a row)."""
    if isinstance(exc, ImageDecodeError):
        return exc.reason
    if isinstance(exc, PacsError):  # names the endpoint, the request, the HTTP status and the PACS's reason
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def image_provenance(spec: JobSpec, input_key: str, iid: str, input_sha256: str, scale_text: str) -> dict[str, str]:
    """The provenance written into a 2-D output file (and repeated in its manifest row); ``iid``: the item id."""
    return output_provenance(model_name=spec.model.name, model_sha256=spec.model.sha256, scale=scale_text,
                             params_json=spec.params_json, source=provenance_source(spec.provenance_source, input_key, iid),
                             source_sha256=input_sha256)
