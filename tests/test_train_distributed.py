"""The training loop under Ray Train: DDP is equivalent to one large batch, and a killed worker is survived."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medsr_dist.config import load_config
from medsr_dist.storage import Storage
from medsr_dist.train.trainer import make_trainer
from ray_cluster import own_train_workers  # tests/ is on sys.path (rootdir-style import)

pytestmark = pytest.mark.slow

TINY = [
    "ray.progress=false", "degradation.gt_size=16", "degradation.shuffle_buffer=0", "model.scale=4",
    "model.generator={num_feat: 8, num_block: 1, num_grow_ch: 4}", "model.discriminator.num_feat=8",
    "train.vgg.weights=random-init-for-testing", "train.ema_decay=0.5", "train.cpus_per_worker=1",
]


def fixed_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        gt = rng.random((3, 16, 16), dtype=np.float32)
        lq = gt.reshape(3, 4, 4, 4, 4).mean(axis=(2, 4)).astype(np.float32)
        pairs.append({"lq": lq, "gt": gt, "gt_usm": np.clip(gt * 1.1, 0, 1).astype(np.float32)})
    return pairs


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def final_state(result) -> dict:
    return torch.load(Path(result.checkpoint.path) / "state.pt", weights_only=True)


def test_two_workers_equal_one_worker_with_double_batch(ray_local, tmp_path):
    """1 worker x batch 2B and 2 workers x batch B give the same weights after a step (same seed, same data)."""
    import ray

    pairs = fixed_pairs(4)
    states = {}
    for workers, batch in ((1, 4), (2, 2)):
        cfg = load_config(None, [*TINY, f"run.root={tmp_path}", f"run.name=ddp{workers}", f"train.num_workers={workers}",
                                 f"train.batch_size={batch}", "train.iterations=1", "train.checkpoint_every=1"])
        result = make_trainer(cfg, Storage(), {"train": ray.data.from_items(pairs)}).fit()
        states[workers] = final_state(result)
        assert result.metrics["iteration"] == 1
    one, two = states[1], states[2]
    for net in ("net_g", "net_d"):
        for key, value in one["nets"][net].items():
            torch.testing.assert_close(two["nets"][net][key], value, rtol=1e-4, atol=1e-6, msg=f"{net}.{key}")
    for key, value in one["ema"].items():
        torch.testing.assert_close(two["ema"][key], value, rtol=1e-4, atol=1e-6)
    # the step really changed the weights (the comparison above is not between two untouched inits)
    torch.manual_seed(0)
    from medsr_dist.models.realesrgan import build_generator

    init = build_generator(load_config(None, TINY)).state_dict()
    assert any(not torch.allclose(init[k], v) for k, v in one["nets"]["net_g"].items())


def test_killed_worker_is_restored_from_last_checkpoint(ray_local, tmp_path):
    """SIGKILL one training worker mid-run: Ray Train restarts the group from the last checkpoint and the run
    still ends at the configured iteration."""
    import ray

    cfg = load_config(None, [*TINY, f"run.root={tmp_path}", "run.name=faults", "train.num_workers=2",
                             "train.batch_size=1", "train.iterations=24", "train.checkpoint_every=4",
                             "train.max_failures=2"])
    run_dir = Path(cfg.train.output) / "faults"
    killed: list[int] = []

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 300
        snapshot = run_dir / "checkpoint_manager_snapshot.json"  # written once a checkpoint is registered
        while time.monotonic() < deadline and not (snapshot.is_file() and "checkpoint_" in snapshot.read_text()):
            time.sleep(0.2)
        # the worker processes of this run (Ray names them after the actor class)
        workers = own_train_workers()  # this test's Ray only, not a Ray Train run beside it
        if workers:
            os.kill(workers[0].pid, signal.SIGKILL)
            killed.append(workers[0].pid)

    def slow(batch: dict) -> dict:  # defined here so Ray pickles it by value (tests/ is not on workers' path)
        time.sleep(0.2)
        return batch

    data = ray.data.from_items(fixed_pairs(64)).map_batches(slow, batch_size=1)
    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    result = make_trainer(cfg, Storage(), {"train": data}).fit()
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert result.metrics["iteration"] == 24
    assert result.metrics["resumed_from"] >= 4  # restored from a checkpoint, not started over
    assert final_state(result)["iteration"] == 24
