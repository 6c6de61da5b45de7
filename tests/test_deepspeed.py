"""The DeepSpeed strategy (``train.strategy: deepspeed``): same results as DDP, checkpoints that resume exactly.

Two layers:
* process-group tests (no Ray): 2 processes in a gloo group run a tiny GAN step written against the Strategy
  protocol (G step with D frozen, D real and fake backward passes before one D step, MultiStepLR) under DDP and
  under DeepSpeed ZeRO 0/1/2 from the same initial weights; then a save -> merge -> load round trip.
* Ray Train tests (slow, heavy lock): the real loop with 2 workers and ZeRO-2 (see the bottom of this file).
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn.utils import spectral_norm

from medsr_dist.config import ConfigError, load_config
from ray_cluster import own_train_workers
from test_train_distributed import TINY, fixed_pairs  # tests/ is on sys.path (rootdir-style import)

WORLD = 2
STEPS = 4
LR = 1e-3


# ------------------------------------------------------------------------------------------------------------
# config validation (before any Ray work)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("train.deepspeed.zero_stage=3", "ZeRO stage 3 is not supported"),
    ("train.deepspeed.engines={net_d: {zero_stage: 4}}", "train.deepspeed.engines.net_d.zero_stage"),
    ("train.deepspeed.precision=fp16", "fp16 needs GPUs"),
    ("train.mixed_precision=true", "set train.deepspeed.precision"),
    ("train.deepspeed.precision=fp8", "train.deepspeed.precision"),
])
def test_config_refuses_what_deepspeed_strategy_cannot_do(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["train.strategy=deepspeed", override])


def test_config_accepts_deepspeed_sections():
    cfg = load_config(None, ["train.strategy=deepspeed", "train.deepspeed.zero_stage=1", "train.deepspeed.precision=bf16",
                             "train.deepspeed.engines={net_d: {zero_stage: 0}}"])
    from medsr_dist.train.deepspeed_strategy import deepspeed_config, engine_settings

    d = deepspeed_config(engine_settings(cfg.train.deepspeed, "net_d"), micro_batch=4, world_size=2)
    assert d["zero_optimization"]["stage"] == 0 and d["train_batch_size"] == 8
    assert d["torch_autocast"]["dtype"] == "torch.bfloat16"
    assert deepspeed_config(engine_settings(cfg.train.deepspeed, "net_g"), 4, 2)["zero_optimization"]["stage"] == 1
    # fp16 is a GPU option: accepted when the run says it trains on GPUs
    load_config(None, ["train.strategy=deepspeed", "train.deepspeed.precision=fp16", "train.use_gpu=true"])


# ------------------------------------------------------------------------------------------------------------
# a tiny GAN in a 2-process gloo group
# ------------------------------------------------------------------------------------------------------------
class TinyG(nn.Module):
    """(B, 3, h, w) -> (B, 3, 2h, 2w)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(8, 12, 3, padding=1),
                                  nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)


class TinyD(nn.Module):
    """Spectral norm (u/v buffers) and BatchNorm (running statistics): the buffers DeepSpeed does not broadcast."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(spectral_norm(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)),
                                  nn.BatchNorm2d(8),
                                  nn.LeakyReLU(0.2), spectral_norm(nn.Conv2d(8, 1, 3, padding=1)))

    def forward(self, x):
        return self.body(x)


def gan_step(s, lq, gt) -> dict[str, float]:
    """Real-ESRGAN's step shape against the Strategy protocol: G with D frozen, then D real + D fake, one D step."""
    bce = nn.functional.binary_cross_entropy_with_logits
    s.zero_grad("net_g")
    with s.frozen("net_d"):
        with s.autocast():
            out = s.module("net_g")(lq)
            pred = s.module("net_d")(out)  # the raw D while frozen: its engine must not see this backward
            l_g = nn.functional.l1_loss(out, gt) + 0.1 * bce(pred, torch.ones_like(pred))
        s.backward("net_g", l_g)
    s.step("net_g")
    s.zero_grad("net_d")
    with s.autocast():
        real = s.module("net_d")(gt)
        l_real = bce(real, torch.ones_like(real))
    s.backward("net_d", l_real)
    with s.autocast():
        fake = s.module("net_d")(out.detach())
        l_fake = bce(fake, torch.zeros_like(fake))
    s.backward("net_d", l_fake)
    s.step("net_d")
    return {"l_g": l_g.item(), "l_d": (l_real + l_fake).item()}


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)  # different data on every rank
    gt = torch.rand(2, 3, 16, 16, generator=g)
    return nn.functional.avg_pool2d(gt, 2), gt


def build(strategy_name: str, zero_stage: int = 2, precision: str = "fp32"):
    """Same initial weights on every rank and every strategy; Adam + MultiStepLR (a milestone inside the run)."""
    from medsr_dist.train.strategy import make_strategy

    torch.manual_seed(0)
    nets = {"net_g": TinyG(), "net_d": TinyD()}
    opts = {k: torch.optim.Adam(v.parameters(), lr=LR, betas=(0.9, 0.99)) for k, v in nets.items()}
    scheds = {k: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2], gamma=0.1) for k, o in opts.items()}
    cfg = load_config(None, [f"train.strategy={strategy_name}", f"train.deepspeed.zero_stage={zero_stage}",
                             f"train.deepspeed.precision={precision}", "train.batch_size=2"])
    if strategy_name == "ddp":
        from medsr_dist.train.strategy import DDPStrategy

        s = DDPStrategy("cpu", wrap=nn.parallel.DistributedDataParallel)
    else:
        s = make_strategy(cfg, "cpu", distributed=False)
    s.setup(nets, ["net_g", "net_d"], opts, scheds)
    return s, scheds


def run_steps(s, scheds, rank: int, first: int, last: int) -> None:
    for step in range(first, last):
        gan_step(s, *batch(rank, step))
        for sched in scheds.values():
            sched.step()


def state_of(s) -> dict:
    return {k: {n: t.detach().clone() for n, t in s.raw(k).state_dict().items()} for k in ("net_g", "net_d")}


def _group_worker(rank: int, port: int, out_dir: str, task: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict = {}
    if task == "equivalence":
        for name, stage in (("ddp", None), ("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2)):
            s, scheds = build(name, stage or 0)
            seen: list[dict] = []
            # what D's forward sees as buffers (after the strategy's broadcast, before D updates them)
            hook = s.raw("net_d").register_forward_pre_hook(
                lambda m, a: seen.append({n: b.clone() for n, b in m.named_buffers()}))
            run_steps(s, scheds, rank, 0, STEPS)
            hook.remove()
            results[f"{name}{'' if stage is None else stage}"] = {
                "state": state_of(s), "seen": seen, "lr": s.optimizer("net_g").param_groups[0]["lr"],
                "opt_bytes": sum(s.optimizer_state_bytes(k) for k in ("net_g", "net_d")) if name == "deepspeed" else None}
    elif task == "resume":
        s, scheds = build("deepspeed", 2)
        run_steps(s, scheds, rank, 0, 2)
        ckpt = Path(out_dir) / f"rank{rank}"  # each rank its own local directory, as in Ray Train
        ckpt.mkdir()
        wrote = s.save(str(ckpt), {"iteration": 2, "schedulers": {k: v.state_dict() for k, v in scheds.items()}})
        s.barrier()
        merged = Path(out_dir) / "merged"  # what Ray Train's upload of every rank's directory makes
        if rank == 0:
            for r in range(WORLD):
                shutil.copytree(Path(out_dir) / f"rank{r}", merged, dirs_exist_ok=True)
        s.barrier()
        run_steps(s, scheds, rank, 2, STEPS)
        results["uninterrupted"] = state_of(s)
        s2, scheds2 = build("deepspeed", 2)  # fresh nets, optimisers, engines: a restarted worker
        client = s2.load(str(merged))
        for k, sched in scheds2.items():
            sched.load_state_dict(client["schedulers"][k])
        results["client_iteration"] = client["iteration"]
        results["wrote"] = wrote
        run_steps(s2, scheds2, rank, 2, STEPS)
        results["resumed"] = state_of(s2)
        results["files"] = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
        # bf16 on CPU: forwards autocast to bf16, weights (what EMA and export read) stay fp32 and train
        s3, scheds3 = build("deepspeed", 2, "bf16")
        before = state_of(s3)
        with s3.autocast():
            results["bf16_forward_dtype"] = s3.module("net_g")(batch(rank, 0)[0]).dtype
        run_steps(s3, scheds3, rank, 0, 2)
        after = state_of(s3)
        results["bf16_param_dtypes"] = {p.dtype for k in ("net_g", "net_d") for p in s3.raw(k).parameters()}
        results["bf16_moved"] = max((after["net_g"][k] - v).abs().max().item() for k, v in before["net_g"].items())
    torch.save(results, os.path.join(out_dir, f"result{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # Leave without interpreter teardown: one loaded run saw a child abort there ("terminate called without an
    # active exception", a native thread destroyed at exit) after its results were written.
    os._exit(0)


def run_group(tmp_path: Path, task: str) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_group_worker, args=(port, str(tmp_path), task), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"result{r}.pt", weights_only=False) for r in range(WORLD)]


def test_deepspeed_zero_stages_match_ddp_on_a_gan_step(tmp_path):
    """Same init, different data per rank, 4 GAN steps (two D backward passes per D step, LR milestone at 2):
    DeepSpeed ZeRO 0, 1 and 2 end with DDP's weights and buffers on rank 0 within fp32 reduction-order noise
    (measured <= 3e-8; asserted atol 1e-6 + rtol 1e-5 on weights that moved ~2e-3), and every rank's engine
    forwards see rank 0's buffers."""
    results = run_group(tmp_path, "equivalence")
    torch.manual_seed(0)
    init = {"net_g": TinyG().state_dict(), "net_d": TinyD().state_dict()}
    ddp = results[0]["ddp"]["state"]
    moved = max((ddp["net_g"][k] - v).abs().max().item() for k, v in init["net_g"].items())
    assert moved > 1e-3  # the runs trained: the comparison is not between two untouched inits
    for variant in ("deepspeed0", "deepspeed1", "deepspeed2"):
        for net in ("net_g", "net_d"):
            for key, value in ddp[net].items():
                torch.testing.assert_close(results[0][variant]["state"][net][key], value, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, v=variant, n=net, k=key: f"{v} {n}.{k}: {m}")
        # the milestone's LR change reached the optimiser DeepSpeed steps
        assert results[0][variant]["lr"] == pytest.approx(LR * 0.1)
        # rank 1's D forwards saw rank 0's buffers (BatchNorm statistics differ per rank without the broadcast)
        seen0, seen1 = results[0][variant]["seen"], results[1][variant]["seen"]
        assert len(seen0) == len(seen1) == 3 * STEPS
        for i, (b0, b1) in enumerate(zip(seen0, seen1)):
            if i % 3 == 0:
                continue  # the G step's forward of the frozen raw D: no broadcast there (as DDP's raw D)
            for name in b0:
                torch.testing.assert_close(b1[name], b0[name], rtol=0, atol=0, msg=f"{variant} forward {i} {name}")
    # ZeRO 1/2 hold half of the Adam state per rank; stage 0 all of it
    full = results[0]["deepspeed0"]["opt_bytes"]
    for variant in ("deepspeed1", "deepspeed2"):
        assert results[0][variant]["opt_bytes"] + results[1][variant]["opt_bytes"] == pytest.approx(full, rel=0.02)
        assert results[0][variant]["opt_bytes"] < 0.6 * full


def test_deepspeed_checkpoint_from_per_rank_directories_resumes_exactly(tmp_path):
    """ZeRO-2: each rank saves into its own directory, the directories merged (as Ray Train uploads them) load
    into fresh engines, and 2 more steps give bit-identical weights to the uninterrupted run."""
    results = run_group(tmp_path, "resume")
    for r in range(WORLD):
        assert results[r]["wrote"] and results[r]["client_iteration"] == 2
        for net in ("net_g", "net_d"):
            for key, value in results[r]["uninterrupted"][net].items():
                torch.testing.assert_close(results[r]["resumed"][net][key], value, rtol=0, atol=0, msg=f"{net}.{key}")
    # one optimiser partition per rank; rank 0 alone writes the module (+ client state) files
    files0, files1 = set(results[0]["files"]), set(results[1]["files"])
    assert not files0 & files1
    assert any("zero_pp_rank_1" in f for f in files1) and any("zero_pp_rank_0" in f for f in files0)
    assert {"deepspeed/net_g/latest", "deepspeed/net_d/latest"} <= files0
    assert results[0]["bf16_forward_dtype"] == torch.bfloat16
    assert results[0]["bf16_param_dtypes"] == {torch.float32} and results[0]["bf16_moved"] > 1e-4


# ------------------------------------------------------------------------------------------------------------
# the real loop under Ray Train: 2 workers, ZeRO-2, tiny Real-ESRGAN generator and discriminator
# ------------------------------------------------------------------------------------------------------------
GLOBAL_BATCH = 4  # 2 workers x batch 2
DS = ["train.strategy=deepspeed", "train.deepspeed.zero_stage=2", "train.num_workers=2", "train.batch_size=2"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def fit(ray, tmp_path: Path, name: str, overrides: list[str], pairs: list[dict]):
    from medsr_dist.storage import Storage
    from medsr_dist.train.trainer import make_trainer

    cfg = load_config(None, [*TINY, f"run.root={tmp_path}", f"run.name={name}", *overrides])
    return make_trainer(cfg, Storage(), {"train": ray.data.from_items(pairs)}).fit()


def deepspeed_nets(checkpoint_dir: str | Path) -> dict:
    """Module weights of each engine in a DeepSpeed strategy checkpoint (written by rank 0)."""
    root = Path(checkpoint_dir) / "deepspeed"
    return {net: torch.load(root / net / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
            for net in ("net_g", "net_d")}


def assert_nets_close(a: dict, b: dict, **tol) -> None:
    for net in ("net_g", "net_d"):
        assert a[net].keys() == b[net].keys()
        for key, value in a[net].items():
            torch.testing.assert_close(b[net][key], value, msg=lambda m, n=net, k=key: f"{n}.{k}: {m}", **tol)


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory):
    """4 iterations of ZeRO-2 in one go (checkpoints at 2 and 4)."""
    tmp = tmp_path_factory.mktemp("ds-uninterrupted")
    result = fit(ray_local, tmp, "whole", [*DS, "train.iterations=4", "train.checkpoint_every=2"],
                 fixed_pairs(4 * GLOBAL_BATCH))
    assert result.metrics["iteration"] == 4
    return result


@pytest.mark.slow
def test_ray_zero2_checkpoint_resume_equals_uninterrupted_run(ray_local, uninterrupted, tmp_path):
    """2 iterations, stop, a new fit() of the same run resumes from the checkpoint every rank wrote part of and
    runs iterations 3-4 on the same data: the weights equal those of the uninterrupted run."""
    pairs = fixed_pairs(4 * GLOBAL_BATCH)
    first = fit(ray_local, tmp_path, "split", [*DS, "train.iterations=2", "train.checkpoint_every=2"], pairs)
    files = {str(p.relative_to(first.checkpoint.path)) for p in Path(first.checkpoint.path).rglob("*") if p.is_file()}
    # one folder assembled from both ranks: rank 0's module files + export, each rank's ZeRO partition
    for net in ("net_g", "net_d"):
        assert {f"deepspeed/{net}/latest", f"deepspeed/{net}/state/mp_rank_00_model_states.pt",
                f"deepspeed/{net}/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                f"deepspeed/{net}/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
    assert {"model.pth", "meta.json"} <= files
    second = fit(ray_local, tmp_path, "split", [*DS, "train.iterations=4", "train.checkpoint_every=2"],
                 pairs[2 * GLOBAL_BATCH:])
    assert second.metrics["resumed_from"] == 2 and second.metrics["iteration"] == 4
    whole, resumed = deepspeed_nets(uninterrupted.checkpoint.path), deepspeed_nets(second.checkpoint.path)
    assert_nets_close(whole, resumed, rtol=1e-5, atol=1e-7)
    # the EMA (fp32, outside the engines) and the plain export agree too
    export_w = torch.load(Path(uninterrupted.checkpoint.path) / "model.pth", weights_only=True)
    export_r = torch.load(Path(second.checkpoint.path) / "model.pth", weights_only=True)
    for key in ("params", "params_ema"):
        for name, value in export_w[key].items():
            assert value.dtype == torch.float32
            torch.testing.assert_close(export_r[key][name], value, rtol=1e-5, atol=1e-7)
    for name, value in resumed["net_g"].items():  # the export's params are the engine's weights
        torch.testing.assert_close(export_r["params"][name], value, rtol=0, atol=0)


@pytest.mark.slow
def test_ray_ddp_and_zero2_agree_from_the_same_init(ray_local, uninterrupted, tmp_path):
    """DDP and DeepSpeed ZeRO-2 from the same seed on the same data: after 4 GAN steps the generator and
    discriminator agree within rtol 1e-4 / atol 1e-6 (the tolerance of the DDP 1x2B == 2xB test)."""
    ddp = fit(ray_local, tmp_path, "ddp", ["train.strategy=ddp", "train.num_workers=2", "train.batch_size=2",
                                           "train.iterations=4", "train.checkpoint_every=4"],
              fixed_pairs(4 * GLOBAL_BATCH))
    state = torch.load(Path(ddp.checkpoint.path) / "state.pt", weights_only=True)
    ds = deepspeed_nets(uninterrupted.checkpoint.path)
    assert_nets_close(state["nets"], ds, rtol=1e-4, atol=1e-6)
    torch.manual_seed(0)
    from medsr_dist.models.registry import load_family

    init = load_family("realesrgan").build_networks(load_config(None, TINY))["net_g"].state_dict()
    assert any(not torch.allclose(init[k], v) for k, v in ds["net_g"].items())  # they trained


@pytest.mark.slow
def test_ray_zero2_survives_a_killed_worker(ray_local, tmp_path):
    """SIGKILL one worker after the first checkpoint: Ray Train restarts the group, every rank loads its ZeRO-2
    partition from the merged checkpoint, and the run ends at the configured iteration."""
    import signal
    import threading
    import time

    run_dir = tmp_path / "train" / "faults"
    killed: list[int] = []

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 300
        snapshot = run_dir / "checkpoint_manager_snapshot.json"  # written once a checkpoint is registered
        while time.monotonic() < deadline and not (snapshot.is_file() and "checkpoint_" in snapshot.read_text()):
            time.sleep(0.2)
        workers = own_train_workers()  # this test's Ray only, not a Ray Train run beside it
        if workers:
            os.kill(workers[-1].pid, signal.SIGKILL)
            killed.append(workers[-1].pid)

    def slow(batch: dict) -> dict:  # defined here so Ray pickles it by value
        time.sleep(0.2)
        return batch

    data = ray_local.data.from_items(fixed_pairs(64)).map_batches(slow, batch_size=1)
    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    from medsr_dist.storage import Storage
    from medsr_dist.train.trainer import make_trainer

    cfg = load_config(None, [*TINY, f"run.root={tmp_path}", "run.name=faults", "train.strategy=deepspeed",
                             "train.num_workers=2", "train.batch_size=1", "train.iterations=16",
                             "train.checkpoint_every=4", "train.max_failures=2"])
    result = make_trainer(cfg, Storage(), {"train": data}).fit()
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert result.metrics["iteration"] == 16
    assert result.metrics["resumed_from"] >= 4  # restored from a checkpoint, not started over
    assert torch.load(Path(result.checkpoint.path) / "deepspeed" / "net_g" / "state" / "mp_rank_00_model_states.pt",
                      weights_only=False)["medsr_client_state"]["iteration"] == 16
