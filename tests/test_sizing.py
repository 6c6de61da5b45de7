"""Model replicas sized from the cluster (enhance/eval/serve ``auto``), and training that cannot fit failing at once."""
from __future__ import annotations

import math
import time

import pytest
import torch

from medsr_dist.config import load_config
from medsr_dist.infer.model_file import read_model_file
from medsr_dist.infer.replica import EngineSettings, ModelReplica
from medsr_dist.runtime import ClusterTooSmallError, balanced_batch_size, check_training_fits, size_replicas
from medsr_dist.storage import Storage


def test_a_two_core_cpu_node_gets_two_single_threaded_replicas_sharing_both_cores_less_half_a_cpu_for_decode_and_encode():
    s = size_replicas([{"CPU": 2.0, "GPU": 0.0}])
    assert (s.min_replicas, s.max_replicas, s.cpus, s.gpus, s.threads) == (2, 2, 0.75, 0.0, 1)
    assert "auto" in s.how and "0.5 CPU each kept for decode/encode" in s.how and "2 replica(s) of 1 thread(s)" in s.how


def test_large_cpu_nodes_get_one_single_threaded_replica_per_cpu_sized_to_fit_every_node():
    s = size_replicas([{"CPU": 16.0}, {"CPU": 16.0}])
    assert (s.max_replicas, s.cpus, s.threads) == (32, 0.96, 1)  # 16 per node: 16 x 0.96 <= 16 - 0.5
    mixed = size_replicas([{"CPU": 4.0}, {"CPU": 8.0}])  # sized on the smaller node, so one fits everywhere
    assert (mixed.max_replicas, mixed.cpus, mixed.threads) == (4 + 8, 0.87, 1)


def test_a_node_whose_memory_holds_fewer_replicas_than_cpus_gets_fewer_replicas_with_more_threads():
    gib = 1024 ** 3
    s = size_replicas([{"CPU": 16.0, "memory": 13.5 * gib}])  # 4 replicas of 3 GiB fit
    assert (s.max_replicas, s.cpus, s.threads) == (4, 3.87, 4)
    assert "13.5 GiB memory for 4 replica(s)" in s.how
    roomy = size_replicas([{"CPU": 16.0, "memory": 64.0 * gib}])
    assert (roomy.max_replicas, roomy.threads) == (16, 1)
    tiny = size_replicas([{"CPU": 8.0, "memory": 2.0 * gib}])  # not even one: one replica all the same
    assert (tiny.max_replicas, tiny.cpus, tiny.threads) == (1, 7.5, 8)


def test_gpu_clusters_get_one_replica_per_gpu():
    s = size_replicas([{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}])
    assert (s.min_replicas, s.max_replicas, s.gpus, s.cpus) == (3, 3, 1.0, 1.0)


def test_explicit_numbers_win_over_auto():
    s = size_replicas([{"CPU": 2.0}], cpus_per_replica=1.0)
    assert (s.max_replicas, s.cpus, s.threads, s.how) == (1, 1.0, 1, "enhance.cpus_per_replica 1")
    two = size_replicas([{"CPU": 2.0}], max_replicas=2)
    assert (two.min_replicas, two.max_replicas, two.cpus, two.threads) == (2, 2, 0.75, 1)
    low = size_replicas([{"CPU": 16.0}], min_replicas=1)
    assert (low.min_replicas, low.max_replicas) == (1, 16)
    with pytest.raises(ValueError, match="eval: the Ray cluster has no CPU"):
        size_replicas([{"CPU": 0.0, "GPU": 1.0}], section="eval")


def test_auto_is_the_default_and_numbers_or_auto_are_accepted_for_every_replica_section():
    cfg = load_config(None, [])
    assert (cfg.enhance.cpus_per_replica, cfg.enhance.min_replicas, cfg.enhance.max_replicas) == ("auto",) * 3
    assert (cfg.eval.cpus_per_replica, cfg.eval.replicas, cfg.serve.cpus_per_replica) == ("auto",) * 3
    cfg = load_config(None, ["enhance.cpus_per_replica=1.5", "enhance.max_replicas=3", "eval.replicas=2"])
    assert (cfg.enhance.cpus_per_replica, cfg.enhance.max_replicas, cfg.eval.replicas) == (1.5, 3, 2)
    with pytest.raises(Exception, match="cpus_per_replica"):
        load_config(None, ["enhance.cpus_per_replica=0"])


def test_a_replica_runs_as_many_torch_threads_as_it_was_granted(tiny_model_dir):
    model = read_model_file(f"{tiny_model_dir}/model.pth")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ModelReplica.load(model, Storage(), EngineSettings(threads=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_training_that_does_not_fit_is_refused_with_the_keys_and_numbers():
    with pytest.raises(ClusterTooSmallError, match=r"training needs 4 CPUs but the Ray cluster has 2: train.num_workers 1 "
                                                   r"x train.cpus_per_worker 2 \+ degradation.num_actors 1 x "
                                                   r"degradation.cpus_per_actor 1 \+ 1"):
        check_training_fits([{"CPU": 2.0}], num_workers=1, cpus_per_worker=2, use_gpu=False, num_actors=1,
                            cpus_per_actor=1)
    with pytest.raises(ClusterTooSmallError, match=r"train.cpus_per_worker 4 CPUs do not fit the nodes \(3/3 CPUs\)"):
        check_training_fits([{"CPU": 3.0}, {"CPU": 3.0}], num_workers=1, cpus_per_worker=4, use_gpu=False,
                            num_actors=1, cpus_per_actor=1)
    with pytest.raises(ClusterTooSmallError, match="want a GPU each but the Ray cluster has 1"):
        check_training_fits([{"CPU": 8.0, "GPU": 1.0}], num_workers=2, cpus_per_worker=1, use_gpu=True,
                            num_actors=1, cpus_per_actor=1)
    # the demo's sizing: 2 trainers + 1 actor + 1 task on ray.num_cpus 4
    check_training_fits([{"CPU": 4.0}], num_workers=2, cpus_per_worker=1, use_gpu=False, num_actors=1, cpus_per_actor=1)


@pytest.mark.slow
def test_training_that_cannot_fit_a_local_two_cpu_ray_fails_at_once_instead_of_waiting_at_zero_rows(tmp_path):
    """The issue's case: train.num_workers=1 train.cpus_per_worker=2 on a 2-CPU local Ray sat at "0 rows"."""
    import ray

    from medsr_dist.train.trainer import run_training

    cfg = load_config(None, [f"run.root={tmp_path}", "train.num_workers=1", "train.cpus_per_worker=2",
                             f"train.dataset={tmp_path / 'absent-dataset'}"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        started = time.monotonic()
        with pytest.raises(ClusterTooSmallError, match="train.num_workers 1 x train.cpus_per_worker 2"):
            run_training(cfg)
        assert time.monotonic() - started < 60  # refused before any worker or read task starts
    finally:
        ray.shutdown()


def test_auto_min_replicas_is_what_fits_in_the_free_resources_when_the_cluster_is_shared():
    """A nightly run on a cluster whose Serve application holds 2 of 4 CPUs: it starts on the replicas that fit in
    what is free (the pool grows to the whole-cluster count later) instead of waiting for ones that cannot start."""
    shared = size_replicas([{"CPU": 4.0}], cpus_per_replica=0.5, free={"CPU": 2.0, "GPU": 0.0})
    assert (shared.min_replicas, shared.max_replicas) == (3, 7)  # (2 - 0.5) / 0.5 now; (4 - 0.5) / 0.5 in all
    assert "3 fit in the resources free now, the pool grows to 7" in shared.how
    idle = size_replicas([{"CPU": 4.0}], cpus_per_replica=0.5, free={"CPU": 4.0, "GPU": 0.0})
    assert (idle.min_replicas, idle.max_replicas) == (7, 7) and "free now" not in idle.how
    full = size_replicas([{"CPU": 4.0}], free={"CPU": 0.25, "GPU": 0.0})  # nothing fits now: still one to wait for
    assert (full.min_replicas, full.max_replicas, full.cpus) == (1, 4, 0.87)
    gpu = size_replicas([{"CPU": 8.0, "GPU": 2.0}], free={"CPU": 6.0, "GPU": 1.0})
    assert (gpu.min_replicas, gpu.max_replicas) == (1, 2)
    assert size_replicas([{"CPU": 4.0}], min_replicas=2, max_replicas=3, cpus_per_replica=1.0,
                         free={"CPU": 0.0}).min_replicas == 2  # an explicit number is kept


def test_a_pass_splits_its_items_evenly_over_the_replicas_in_batches_of_at_most_images_per_batch():
    assert balanced_batch_size(12, 4, 2) == 3  # 4 batches of 3, two per replica (not 3 batches of 4: 8 vs 4 images)
    assert balanced_batch_size(48, 4, 2) == 4
    assert balanced_batch_size(5, 4, 2) == 3  # 3 + 2
    assert balanced_batch_size(1, 4, 2) == 1
    assert balanced_batch_size(100, 4, 1) == 4
    assert balanced_batch_size(0, 4, 2) == 4
    for items in range(1, 60):
        for most in (1, 2, 4, 8):
            for replicas in (1, 2, 3, 4):
                size = balanced_batch_size(items, most, replicas)
                batches = [min(size, items - start) for start in range(0, items, size)]
                loads = [sum(batches[r::replicas]) for r in range(replicas)]
                assert 1 <= size <= most
                rounds = math.ceil(items / (replicas * most))  # the fewest batches per replica batches of `most` allow
                # the busiest replica holds less than one image per round above an even split
                assert max(loads) <= math.ceil(items / replicas) + rounds - 1, (items, most, replicas, size)
