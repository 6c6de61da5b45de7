"""Export an inference network to ONNX (``medsr export --format onnx``) for the onnxruntime (and later TensorRT) backend.

The graph takes ``input``: (B, 3, H, W) float32 RGB in [0, 1] with dynamic B, H and W (H and W multiples of the
model's size_multiple) and returns ``output``: (B, 3, H*scale, W*scale) float32, *not* clamped (backends clamp,
as the torch backend does). The export carries its own description in the ONNX metadata (``medsr:*`` keys: source
weights sha256, scale, size multiple, model name), so a backend can refuse an export that no longer matches the
weights it claims to come from.

Every export is checked before it is written: ONNX Runtime (CPU) and torch run the same random batch, at a size
other than the one traced, and must agree to within ``PARITY_TOLERANCE`` in fp32.
"""
from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from medsr_dist.infer.registry import FAMILY_EXPORTERS

if TYPE_CHECKING:
    from torch import nn

    from medsr_dist.infer.model_file import ModelFile
    from medsr_dist.storage import Storage

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # max abs difference, ONNX Runtime vs torch, fp32, [0, 1] images
DEFAULT_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"

# metadata_props keys of an export
META_SOURCE_SHA256 = "medsr:source_sha256"
META_SCALE = "medsr:scale"
META_SIZE_MULTIPLE = "medsr:size_multiple"
META_MODEL_NAME = "medsr:model"
META_FAMILY = "medsr:family"


class ExportError(RuntimeError):
    """The export failed or does not reproduce the torch network."""


@dataclass(frozen=True)
class OnnxExport:
    """An ONNX export and its parity check.

    Attributes:
        data: the serialised ONNX model.
        uri: where it was written (None when not written).
        max_abs_diff: ONNX Runtime vs torch on the check batch (fp32).
        check_shape: the (B, 3, H, W) input of the parity check.
        exporter: ``torchscript`` or ``dynamo``.
    """

    data: bytes
    uri: str | None
    max_abs_diff: float
    check_shape: tuple[int, int, int, int]
    exporter: str


def _trace(net: nn.Module, example, opset: int, exporter: str) -> bytes:
    import torch

    if exporter == "torchscript":
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation on every call
            torch.onnx.export(
                net, (example,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                              OUTPUT_NAME: {0: "batch", 2: "out_height", 3: "out_width"}},
                do_constant_folding=True, dynamo=False,
            )
        return buf.getvalue()
    batch, height, width = torch.export.Dim("batch"), torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
    program = torch.onnx.export(net, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                opset_version=opset, dynamic_shapes=({0: batch, 2: height, 3: width},), dynamo=True)
    program.optimize()
    return program.model_proto.SerializeToString()


def export_onnx(
    net: nn.Module,
    *,
    scale: int,
    size_multiple: int = 1,
    metadata: dict[str, str] | None = None,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    tolerance: float = PARITY_TOLERANCE,
) -> OnnxExport:
    """Export ``net`` (float32, CPU) to ONNX with dynamic batch/height/width and check it against torch.

    Args:
        net: maps (B, 3, h, w) float RGB in [0, 1] to (B, 3, h*scale, w*scale).
        scale: native upscaling factor (written to the metadata and checked on the output shape).
        size_multiple: input sides must be multiples of this (RRDBNet x2: 2, x1: 4).
        metadata: extra ``metadata_props`` (str -> str).
        opset: ONNX opset.
        exporter: ``torchscript`` (torch's TorchScript-based exporter: about 1 s for RRDBNet on a CPU),
            ``dynamo`` (the torch.export-based one: same parity, 15-20x slower to export here) or ``auto``
            (torchscript while torch still ships it).
        tolerance: largest accepted max abs difference between ONNX Runtime and torch on the check batch.

    Returns:
        :class:`OnnxExport` (``uri`` None).

    Raises:
        ExportError: the exporter failed, or ONNX Runtime disagrees with torch by more than ``tolerance``.
    """
    import onnx
    import torch

    net = net.eval().float().cpu()
    m = size_multiple
    example = torch.rand(1, 3, 16 * m, 16 * m, generator=torch.Generator().manual_seed(0))
    if exporter == "auto":
        exporter = "torchscript"
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be auto, torchscript or dynamo, got {exporter!r}")
    try:
        with torch.no_grad():
            data = _trace(net, example, opset, exporter)
    except Exception as exc:  # noqa: BLE001 - the exporters raise many types
        raise ExportError(f"ONNX export ({exporter}) failed: {type(exc).__name__}: {exc}") from exc
    proto = onnx.load_from_string(data)
    props = {META_SCALE: str(scale), META_SIZE_MULTIPLE: str(size_multiple), **(metadata or {})}
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    proto.producer_name = "medsr-dist"
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()

    # Parity at a batch size and shape that differ from the traced ones: proves the axes are really dynamic.
    check = torch.rand(2, 3, 13 * m, 21 * m, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(check).numpy()
    got = run_onnx(data, check.numpy())
    if got.shape != expected.shape or got.shape[2] != check.shape[2] * scale:
        raise ExportError(f"ONNX output shape {got.shape}, expected {expected.shape}")
    diff = float(np.abs(got - expected).max())
    if not diff <= tolerance:
        raise ExportError(f"ONNX Runtime differs from torch by {diff:.3g} (max abs, fp32); tolerance {tolerance:g}")
    log.info("ONNX export (%s, opset %d): %d bytes, max abs diff vs torch %.3g", exporter, opset, len(data), diff)
    return OnnxExport(data=data, uri=None, max_abs_diff=diff, check_shape=tuple(check.shape), exporter=exporter)


def run_onnx(data: bytes, batch: np.ndarray) -> np.ndarray:
    """Run an ONNX model once on the CPU provider (for checks): (B, 3, h, w) float32 -> raw output."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def export_model_file(
    model: ModelFile,
    storage: Storage,
    output: str | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
) -> OnnxExport:
    """Export a :class:`~medsr_dist.infer.model_file.ModelFile` to ONNX and write it (atomically).

    ``output`` defaults to ``model.onnx_uri`` (``model.onnx`` beside the weights), where the onnxruntime
    backend looks for it.

    Raises:
        ValueError: no output given and the model has no default place for an export (zoo models).
        ExportError: see :func:`export_onnx`.
    """
    output = output or model.onnx_uri
    if not output:
        raise ValueError(f"{model.uri}: say where to write the ONNX export (--output)")
    # a family with several inference networks (ldm: U-Net + VAE encoder/decoder) exports them itself
    if model.family in FAMILY_EXPORTERS:
        return FAMILY_EXPORTERS.get(model.family)(model, storage, output, opset=opset, exporter=exporter)
    net = model.build(storage)
    metadata = {META_SOURCE_SHA256: model.sha256, META_MODEL_NAME: model.name, META_FAMILY: model.family}
    result = export_onnx(net, scale=model.scale, size_multiple=model.size_multiple, metadata=metadata,
                         opset=opset, exporter=exporter)
    storage.write_bytes(output, result.data)
    return OnnxExport(data=result.data, uri=output, max_abs_diff=result.max_abs_diff, check_shape=result.check_shape,
                      exporter=result.exporter)
