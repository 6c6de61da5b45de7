"""`ray job submit -- python jobs/train.py …` against a real local Ray head, as users run it on a cluster."""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medsr_dist.data.prepare import to_training_png
from medsr_dist.data.synthetic import make_radiograph
from ray_cluster import local_ray_head, submit_job

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def write_toy_dataset(root: Path) -> None:
    for split, seeds in (("train", range(4)), ("val", range(4, 6))):
        rows = [{"key": f"p{s}_000.png", "patient_id": f"p{s}",
                 "image": to_training_png(make_radiograph(s, 64)[:, :, None], 16)} for s in seeds]
        (root / "dataset" / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), root / "dataset" / split / "part-0.parquet")


def test_train_job_submitted_with_ray_job_cli(tmp_path):
    working_dir = tmp_path / "wd"  # only what the job needs travels (not .venv, not demo-run)
    for name in ("medsr_dist", "jobs", "configs"):
        shutil.copytree(REPO / name, working_dir / name, ignore=shutil.ignore_patterns("__pycache__"))
    run_root = tmp_path / "run"
    write_toy_dataset(run_root)
    with local_ray_head(tmp_path / "head", num_cpus=4) as head:
        status, logs = submit_job(
            head,
            # the demo's first stage (psnr family, MSRResNet on bicubic pairs) at toy size
            ["python", "jobs/train.py", "--config", "configs/demo_psnr.yaml", f"run.root={run_root}", "run.name=job",
             "ray.progress=false", "degradation.gt_size=32", "model.generator={type: MSRResNet, num_feat: 8, num_block: 1}",
             "train.batch_size=1", "train.iterations=2", "train.checkpoint_every=2"],
            working_dir,
            timeout_s=600,
        )
    assert status == "SUCCEEDED", logs
    assert sorted((run_root / "train" / "job").glob("checkpoint_*/state.pt"))
    assert (run_root / "train" / "export" / "model.pth").is_file()
    assert "exported model" in logs
