"""The ONNX export of the latent diffusion family (``medsr export --format onnx`` of an ``ldm`` export).

The sampler loop stays in Python (:mod:`medsr_dist.infer.diffusion_backend`); its three networks are exported
separately, each parity-checked against torch: the U-Net and the VAE encoder/decoder as
``<output stem>.<part>.onnx`` (:func:`export_ldm_onnx`). Registered as the ``ldm`` family's exporter
(:data:`medsr_dist.infer.registry.FAMILY_EXPORTERS`), used by :func:`medsr_dist.infer.export.export_model_file`.
"""
from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import torch
from torch import nn

from medsr_dist.infer.model_file import onnx_part_uri
from medsr_dist.infer.export import META_FAMILY, META_MODEL_NAME, META_SOURCE_SHA256, ExportError, OnnxExport
from medsr_dist.infer.registry import register_family_exporter
from medsr_dist.models.ldm import LatentDiffusionSR, LatentVAE

log = logging.getLogger(__name__)


@register_family_exporter("ldm")
def export_ldm_model_file(model, storage, output: str, *, opset: int = 17, exporter: str = "auto") -> OnnxExport:
    """``medsr export --format onnx`` of an ldm export: the U-Net and the VAE encoder/decoder as
    ``<output stem>.<part>.onnx`` (:func:`export_ldm_onnx`); returns the U-Net's
    :class:`~medsr_dist.infer.export.OnnxExport` (its max abs diff is the largest of the three).
   """
    if exporter not in ("auto", "torchscript"):
        raise ValueError("the ldm ONNX export uses the torchscript exporter (--exporter auto or torchscript)")
    meta = {META_SOURCE_SHA256: model.sha256, META_MODEL_NAME: model.name, META_FAMILY: model.family}
    parts = export_ldm_onnx(model.build(storage), metadata=meta, opset=opset)
    for part, (data, _) in parts.items():
        storage.write_bytes(onnx_part_uri(output, part), data)
    worst = max(d for _, d in parts.values())
    log.info("ldm ONNX export: %s", {p: f"{d:.2e}" for p, (_, d) in parts.items()})
    return OnnxExport(data=parts["unet"][0], uri=onnx_part_uri(output, "unet"), max_abs_diff=worst,
                      check_shape=(2, 8, 12, 8), exporter="torchscript")


class _Encoder(nn.Module):
    def __init__(self, vae: LatentVAE):
        super().__init__()
        self.vae = vae

    def forward(self, image01: torch.Tensor) -> torch.Tensor:  # HR-grid image in [0, 1] -> scaled posterior mean
        return self.vae.encode(image01)


class _Decoder(nn.Module):
    def __init__(self, vae: LatentVAE):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent)


def export_ldm_onnx(module: LatentDiffusionSR, *, metadata: dict[str, str], opset: int = 17,
                    tolerance: float = 1e-4) -> dict[str, tuple[bytes, float]]:
    """ONNX graphs of the three networks, each parity-checked against torch (max abs diff <= ``tolerance``, fp32)
    at a batch and size other than the traced ones (dynamic batch, height, width):

    * ``unet``: ``latent`` (B, 2C, h, w) float32 [x_t, LR latent] and ``timestep`` (B,) int64 -> ``prediction``
      (B, C, h, w);
    * ``vae_encoder``: ``image`` (B, 3, H, W) in [0, 1] (the LR bicubic-upsampled to the HR grid) -> ``latent``
      (B, C, H/f, W/f), the scaled posterior mean;
    * ``vae_decoder``: ``latent`` -> ``image`` (B, 3, H, W), ~[0, 1], not clamped.

    Returns ``{part: (onnx bytes, max abs diff)}``. Raises :class:`~medsr_dist.infer.export.ExportError`.
    """
    import onnx

    module = module.float().eval().cpu()
    vae, unet = module.vae, module.unet
    c, f, g = vae.latent_channels, vae.downsampling, unet.downsampling
    gen = torch.Generator().manual_seed(0)
    parts = {
        "unet": (unet, ["latent", "timestep"], ["prediction"],
                 lambda b, h, w: (torch.randn(b, 2 * c, h * g, w * g, generator=gen),
                                  torch.randint(0, unet.schedule.num_train_timesteps, (b,), generator=gen)),
                 {"latent": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                  "prediction": {0: "batch", 2: "height", 3: "width"}}),
        "vae_encoder": (_Encoder(vae), ["image"], ["latent"],
                        lambda b, h, w: (torch.rand(b, 3, h * f * g, w * f * g, generator=gen),),
                        {"image": {0: "batch", 2: "height", 3: "width"}, "latent": {0: "batch", 2: "lh", 3: "lw"}}),
        "vae_decoder": (_Decoder(vae), ["latent"], ["image"],
                        lambda b, h, w: (torch.randn(b, c, h * g, w * g, generator=gen),),
                        {"latent": {0: "batch", 2: "height", 3: "width"}, "image": {0: "batch", 2: "ih", 3: "iw"}}),
    }
    out = {}
    for part, (net, inputs, outputs, make, axes) in parts.items():
        example = make(1, 2, 2)
        buf = io.BytesIO()
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(net, example, buf, input_names=inputs, output_names=outputs, opset_version=opset,
                                  dynamic_axes=axes, do_constant_folding=True, dynamo=False)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types
            raise ExportError(f"ONNX export of the {part} failed: {type(exc).__name__}: {exc}") from exc
        proto = onnx.load_from_string(buf.getvalue())
        for key, value in {**metadata, "medsr:part": part}.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
        proto.producer_name = "medsr-dist"
        onnx.checker.check_model(proto)
        data = proto.SerializeToString()
        check = make(2, 3, 2)
        with torch.no_grad():
            expected = net(*check).numpy()
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])
        got = sess.run(None, {n: a.numpy() for n, a in zip(inputs, check)})[0]
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        if not diff <= tolerance:
            raise ExportError(f"ONNX Runtime {part} differs from torch by {diff:.3g} (max abs, fp32; shapes "
                              f"{got.shape} / {expected.shape}); tolerance {tolerance:g}")
        out[part] = (data, diff)
    return out
