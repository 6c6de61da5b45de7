"""The demo pipeline end to end at toy size on a local Ray: sample -> prepare -> train -> enhance -> report.

One module-scoped Ray instance serves every test here (a Ray start costs ~10 s on 2 cores).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
import torch
from typer.testing import CliRunner

from medsr_dist.config import load_config
from medsr_dist.data.synthetic import make_corrupt_files
from medsr_dist.io.image import decode_image
from medsr_dist.storage import Storage
from ray_cluster import init_local_ray

pytestmark = pytest.mark.slow

TOY = [
    "ray.num_cpus=4", "ray.progress=false",
    "sample.n_images=8", "sample.n_holdout=2", "sample.size=96",
    "prepare.rows_per_shard=2", "prepare.split={train: 0.5, val: 0.25, test: 0.25}",
    "degradation.gt_size=32", "degradation.shuffle_buffer=4",
    "model.scale=4", "model.generator={num_feat: 8, num_block: 1, num_grow_ch: 4}", "model.discriminator.num_feat=8",
    "train.num_workers=2", "train.batch_size=1", "train.iterations=4", "train.checkpoint_every=2", "train.val_every=2",
    "train.vgg.weights=random-init-for-testing", "train.ema_decay=0.5",
    "enhance.tile=16", "enhance.tile_overlap=4",
]


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ray_local(s3_server):  # s3_server first: Ray workers must inherit its credentials
    import ray

    init_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, ray_local):
    """Run every demo stage once on a local folder store; the tests below inspect what it wrote."""
    from medsr_dist.pipeline import run_enhance, run_prepare, run_train, write_demo_data, write_demo_report
    from rich.console import Console

    root = tmp_path_factory.mktemp("demo")
    cfg = load_config(None, [f"run.root={root}", *TOY])
    storage = Storage(cfg.storage)
    write_demo_data(cfg, storage)
    for name, data in make_corrupt_files().items():
        if name in ("truncated.png", "empty.png", "corrupt.dcm"):
            storage.write_bytes(storage.join(cfg.sample.archive, "bad", name), data)
    archive_before = digest_tree(Path(cfg.sample.archive))
    console = Console(file=open(root / "console.txt", "w"), width=200)
    prepared = run_prepare(cfg, console)
    trained = run_train(cfg, console)
    enhanced = run_enhance(cfg, console)
    report = write_demo_report(cfg, storage, enhanced.rows)
    return {"cfg": cfg, "root": root, "prepared": prepared, "trained": trained, "enhanced": enhanced,
            "report": report, "archive_before": archive_before}


def test_prepare_records_unreadable_files_and_keeps_the_rest(demo_run):
    prepared = demo_run["prepared"]
    out = Path(demo_run["cfg"].prepare.output)
    # errors name files by pseudonym; the index beside the dataset maps them back to their keys
    keys = {r["item"]: r["key"] for r in map(json.loads, (out / "index.jsonl").read_text().splitlines())}
    bad = sorted(Path(keys[e["key"]]).name for e in prepared.errors)
    assert bad == ["corrupt.dcm", "empty.png", "truncated.png"]
    assert all(e["error"] for e in prepared.errors)
    assert sum(prepared.counts.values()) == 8
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert sorted(Path(keys[r["key"]]).name for r in errors) == bad
    assert json.loads((out / "summary.json").read_text())["skipped"] == {"undecodable": 3}


def test_inputs_are_never_modified(demo_run):
    assert digest_tree(Path(demo_run["cfg"].sample.archive)) == demo_run["archive_before"]


def test_split_is_patient_level_and_sharded(demo_run):
    out = Path(demo_run["cfg"].prepare.output)
    patients = {}
    for split in ("train", "val", "test"):
        shards = sorted((out / split).glob("*.parquet"))
        assert shards, split
        rows = pq.read_table(out / split).to_pylist()
        patients[split] = {r["group"] for r in rows}
        for r in rows:  # lossless training PNG with the source's bit depth
            img = cv2.imdecode(np.frombuffer(r["image"], np.uint8), cv2.IMREAD_UNCHANGED)
            assert img.shape[:2] == (r["height"], r["width"])
            assert img.dtype == (np.uint16 if r["bits"] > 8 else np.uint8)
    assert patients["train"] and patients["val"] and patients["test"]
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])


def test_training_checkpoints_and_exports(demo_run):
    trained = demo_run["trained"]
    assert trained.iterations == 4
    for key in ("l_g_pix", "l_g_percep", "l_g_gan", "l_d_real", "val_psnr", "val_ssim"):
        assert np.isfinite(trained.metrics[key]), key
    ckpt = Path(trained.checkpoint)
    assert (ckpt / "state.pt").is_file() and (ckpt / "model.pth").is_file()
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["iteration"] == 4 and set(state["optimizers"]) == {"net_g", "net_d"}
    export = torch.load(trained.export, weights_only=True)
    assert set(export) == {"params", "params_ema"}
    assert hashlib.sha256(Path(trained.export).read_bytes()).hexdigest() == trained.export_sha256
    meta = json.loads((Path(trained.export).parent / "meta.json").read_text())
    assert meta["family"] == "realesrgan" and meta["scale"] == 4 and meta["sha256"] == trained.export_sha256


def test_enhanced_outputs_keep_form_and_carry_provenance(demo_run):
    cfg, enhanced = demo_run["cfg"], demo_run["enhanced"]
    assert enhanced.counts == {"done": 2}
    for row in enhanced.rows:
        src = decode_image(Path(row["input_key"]).read_bytes(), row["input_key"])
        out = decode_image(Path(row["output_key"]).read_bytes(), row["output_key"])
        assert out.pixels.shape == (src.pixels.shape[0] * 4, src.pixels.shape[1] * 4, src.pixels.shape[2])
        assert (out.meta.format, out.meta.dtype, out.meta.bits_stored, out.meta.photometric) == (
            src.meta.format, src.meta.dtype, src.meta.bits_stored, src.meta.photometric)
        if out.meta.format == "dicom":
            ds = pydicom.dcmread(row["output_key"])
            assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and row["model_sha256"] in ds.DerivationDescription
        else:
            assert out.meta.text["medsr:model_sha256"] == row["model_sha256"]
            assert "not a new acquisition" in out.meta.text["medsr:note"]
        assert np.isfinite(row["consistency_psnr_db"])
    manifest = pq.read_table(enhanced.manifest).to_pylist()
    assert sorted(r["output_key"] for r in manifest) == sorted(r["output_key"] for r in enhanced.rows)


def test_report_has_side_by_side_figures(demo_run):
    report = demo_run["report"]
    assert report["count"] == 2
    for image in report["images"]:
        png = cv2.imread(str(Path(report["dir"]) / image["panel"]))
        assert png is not None and png.shape[1] > 4 * 96  # LR | bicubic | model | ground truth
        assert np.isfinite(image["bicubic"]["psnr"]) and np.isfinite(image["model"]["psnr"])
    assert (Path(report["dir"]) / "report.md").read_text().count("|") > 8


def test_training_resumes_from_the_latest_checkpoint(demo_run):
    """A second run with the same name continues from iteration 4 instead of starting over."""
    from medsr_dist.train.trainer import latest_iteration, run_training

    cfg = load_config(None, [f"run.root={demo_run['root']}", *TOY, "train.iterations=6"])
    storage = Storage(cfg.storage)
    assert latest_iteration(storage, cfg) == 4
    result = run_training(cfg, storage)
    assert result.iterations == 6
    assert latest_iteration(storage, cfg) == 6


def test_the_same_seed_and_data_train_the_same_weights_bit_for_bit(demo_run):
    """A fresh run (2 DDP workers, live degradation actors) from the fixture's prepared data and run.seed exports
    the fixture run's model.pth byte for byte: nothing in the loop depends on timing."""
    from medsr_dist.train.trainer import run_training

    again = run_training(load_config(None, [f"run.root={demo_run['root']}", *TOY, "run.name=again"]))
    assert again.iterations == demo_run["trained"].iterations == 4
    assert again.export_sha256 == demo_run["trained"].export_sha256


def test_every_worker_gets_the_same_samples_in_the_same_order_on_every_run(ray_local, tmp_path):
    """train.reproducible_order: the live stream (12 shards read in parallel, an actor pool degrading them) split
    across 2 workers as Ray Train splits it delivers the same pairs in the same order each time (the shards' read
    tasks and the actors finish in a different order each time)."""
    import concurrent.futures

    import pyarrow as pa

    from medsr_dist.train.trainer import build_train_stream, ingest_config

    data = tmp_path / "ds" / "train"
    data.mkdir(parents=True)
    for i in range(12):  # one image per shard: 12 read tasks
        img = (np.random.default_rng(i).random((40, 40)) * 255).astype(np.uint8)
        pq.write_table(pa.table({"key": [f"img{i:02d}.png"], "image": [cv2.imencode(".png", img)[1].tobytes()]}),
                       data / f"part-{i:02d}.parquet")
    cfg = load_config(None, [*TOY, f"run.root={tmp_path}", f"train.dataset={tmp_path / 'ds'}", "train.iterations=12",
                             "degradation.num_actors=2", "degradation.shuffle_buffer=0"])

    def delivered() -> list[list[str]]:
        iterators = ingest_config(cfg).configure({"train": build_train_stream(cfg, Storage(cfg.storage))},
                                                 world_size=2, worker_handles=None, worker_node_ids=None)

        def consume(rank: int) -> list[str]:
            return [hashlib.sha256(gt.tobytes()).hexdigest()[:12]
                    for batch in iterators[rank]["train"].iter_batches(batch_size=1) for gt in batch["gt"]]

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            return list(pool.map(consume, range(2)))

    first, second = delivered(), delivered()
    assert len(first[0]) == len(first[1]) >= 12  # 12 iterations x batch 1 per worker, and more
    assert len(set(first[0]) | set(first[1])) > 12  # degraded per (key, epoch): pairs differ across epochs
    assert second == first


def test_cli_fail_on_error_sets_exit_status(demo_run):
    from medsr_dist.cli import app

    args = ["prepare", f"run.root={demo_run['root']}", *TOY, f"prepare.output={demo_run['root']}/ds2"]
    assert CliRunner().invoke(app, args).exit_code == 0
    result = CliRunner().invoke(app, [*args[:1], "--fail-on-error", *args[1:]])
    assert result.exit_code == 1


def test_prepare_and_train_read_and_write_s3(demo_run, s3_bucket, storage_s3, s3_server):
    """The same stages on an S3-compatible store: archive in, Parquet dataset and checkpoints out."""
    from medsr_dist.data.prepare import prepare_dataset

    cfg = load_config(None, [f"run.root={s3_bucket}/medsr", *TOY, f"storage.endpoint_url={s3_server}"])
    local_archive = Path(demo_run["cfg"].sample.archive)
    for path in sorted(local_archive.glob("*.*"))[:4]:
        storage_s3.write_bytes(storage_s3.join(cfg.sample.archive, path.name), path.read_bytes())
    result = prepare_dataset(cfg, storage_s3)
    assert sum(result.counts.values()) == 4 and not result.errors
    shards = storage_s3.list_files(cfg.prepare.output, include=["*.parquet"])
    assert any("/train/" in s for s in shards)
    assert storage_s3.exists(storage_s3.join(cfg.prepare.output, "summary.json"))
