"""DeepSpeed ZeRO strategy (``train.strategy: deepspeed``): one DeepSpeed engine per trained network.

Each trained network (the GAN families' generator and discriminator) gets its own ``deepspeed.initialize``
engine with its own config (``train.deepspeed`` + ``train.deepspeed.engines.<net>`` overrides): ZeRO stage 0
(plain data parallel), 1 (optimiser states partitioned across ranks) or 2 (optimiser states and gradients
partitioned). The family's own ``torch.optim`` optimiser is handed to DeepSpeed as the client optimiser
(DeepSpeed's fused/CPU Adam would compile C++ ops); under ZeRO it steps the rank's fp32 partition, and its
``param_groups`` stay the ones the loop's schedulers change, so scheduled learning rates take effect.

How the Strategy contract maps onto DeepSpeed (0.19.8):

* torch.distributed is initialised by Ray Train (gloo on CPU, nccl on GPU); DeepSpeed reuses that default
  group (``deepspeed.init_distributed(dist_init_required=False)``). Outside Ray Train (``distributed=False``,
  or a single process) a one-process gloo group is created.
* Several ``backward`` calls before one ``step`` (a GAN discriminator's real and fake passes): every engine runs
  with ``managed_gradient_accumulation: false``, DeepSpeed's mode in which ``engine.backward`` only accumulates
  and ``engine.step`` is the accumulation boundary (stages 0/1 reduce there; stage 2 reduce-scatters each
  backward into the rank's gradient partition and finalises at the step). The result is the all-rank mean of
  the summed gradients, as DDP's; ``tests/test_deepspeed.py`` checks it against DDP numerically.
* ``frozen(...)``: parameters ``requires_grad_(False)`` and ``module(name)`` answers the *raw* network while
  frozen, so a frozen discriminator inside the generator's backward never reaches its engine's ZeRO hooks
  (DeepSpeed issue 4923: ZeRO-2 GANs fail otherwise).
* Buffers: DeepSpeed broadcasts parameters only. Spectral-norm ``u``/``v`` and BatchNorm statistics are
  broadcast from rank 0 at setup and, as DDP does (``broadcast_buffers=True``), before every training-mode
  forward of an engine (not of the raw network: a frozen D in the G step runs unsynchronised, as with DDP).
* Precision (``train.deepspeed.precision``): ``fp32``, or ``bf16``/``fp16`` through DeepSpeed's
  ``torch_autocast``: parameters, gradients, gradient communication and optimiser states stay fp32 (so the
  loop's EMA and the plain fp32 export read exact weights); forwards run in the lower precision; fp16 adds
  DeepSpeed's gradient scaler. fp16 needs a GPU (refused at config validation and again here).
* Checkpoints: every rank calls ``save_checkpoint`` of each engine into ``<its dir>/deepspeed/<net>/``
  (a folder per engine: two engines never share a DeepSpeed save dir). Rank 0 writes the module and
  ``client_state`` file, every ZeRO rank its optimiser partition; the file names differ across ranks, so Ray
  Train 2.60, which copies every rank's reported directory into one checkpoint folder, assembles the
  folder DeepSpeed would have written on a shared file system. ``load`` reads it back on every rank.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: sub-folder of a checkpoint directory holding one DeepSpeed save dir per engine
CHECKPOINT_SUBDIR = "deepspeed"
#: DeepSpeed checkpoint tag (each Ray Train checkpoint is its own folder: one tag suffices)
TAG = "state"
#: the key under which the loop's client_state travels (DeepSpeed merges client keys into its own state dict)
CLIENT_KEY = "medsr_client_state"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def engine_settings(ds_cfg, name: str) -> dict[str, Any]:
    """``train.deepspeed`` with the ``engines.<name>`` overrides applied: zero_stage, precision, bucket sizes."""
    settings = {"zero_stage": ds_cfg.zero_stage, "precision": ds_cfg.precision,
                "reduce_bucket_size": ds_cfg.reduce_bucket_size}
    override = ds_cfg.engines.get(name)
    if override is not None:
        settings.update({k: v for k, v in override.model_dump().items() if v is not None})
    return settings


def deepspeed_config(settings: dict[str, Any], micro_batch: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict of one engine (see the module docstring for why each key is set)."""
    precision = settings["precision"]
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        # backward() accumulates, step() is the boundary: any number of backward passes per step
        "managed_gradient_accumulation": False,
        "gradient_clipping": 0.0,
        "steps_per_print": 1 << 30,  # the loop reports; DeepSpeed's own progress lines would only add noise
        "wall_clock_breakdown": False,
        "zero_optimization": {
            "stage": settings["zero_stage"],
            "reduce_bucket_size": settings["reduce_bucket_size"],
            "allgather_bucket_size": settings["reduce_bucket_size"],
            "overlap_comm": False,  # no separate reduction stream on CPU; on GPU it would also need stage 2
            "contiguous_gradients": settings["zero_stage"] == 2,
        },
    }
    if precision != "fp32":
        config["torch_autocast"] = {
            "enabled": True, "dtype": str(_DTYPES[precision]),
            # no module reduces its gradients in the low precision: gradient communication stays fp32
            "lower_precision_safe_modules": [],
        }
    return config


def _buffers_by_dtype(net: nn.Module) -> list[list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in net.buffers():
        groups.setdefault(b.dtype, []).append(b)
    return list(groups.values())


@torch.no_grad()
def broadcast_buffers(net: nn.Module, src: int = 0) -> None:
    """Copy every buffer of ``net`` from rank ``src`` to all ranks (one flat broadcast per dtype)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for group in _buffers_by_dtype(net):
        flat = _flatten_dense_tensors(group)
        dist.broadcast(flat, src=src)
        for b, synced in zip(group, _unflatten_dense_tensors(flat, group)):
            b.copy_(synced)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` on this rank (Adam: exp_avg, exp_avg_sq, step)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


class DeepSpeedStrategy:
    """The :class:`~medsr_dist.train.strategy.Strategy` over DeepSpeed engines (see the module docstring).

    Args:
        cfg: the run's :class:`~medsr_dist.config.MedsrConfig` (``train.deepspeed``, ``train.batch_size``).
        device: where the networks live (``ray.train.torch.get_device()`` inside Ray Train).
        distributed: True inside Ray Train (which has initialised torch.distributed); False outside it: the
            process group in place is used, or one of a single process is created.

    Raises (at :meth:`setup`):
        ValueError: fp16 on a CPU device; an ``engines`` override naming no trained network.
    """

    name = "deepspeed"

    def __init__(self, cfg, device: torch.device | str = "cpu", *, distributed: bool = True):
        self.cfg = cfg
        self.ds_cfg = cfg.train.deepspeed
        self.device = torch.device(device)
        self.distributed = distributed
        self.trained: list[str] = []
        self._raw: dict[str, nn.Module] = {}
        self._engines: dict[str, nn.Module] = {}
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._frozen: dict[str, int] = {}  # net -> nesting depth of frozen() contexts
        self.settings: dict[str, dict[str, Any]] = {}
        precision = self.ds_cfg.precision
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"train.deepspeed.precision: fp16 needs a GPU (device is {self.device}); use bf16 or fp32")
        self._autocast_dtype = _DTYPES.get(precision)

    # ---- setup and access ----
    def _init_process_group(self) -> None:
        import torch.distributed as dist

        if self.device.type == "cpu":
            # before deepspeed's first import: it picks its accelerator once (a GPU host training on CPU)
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        for name in ("DeepSpeed", "deepspeed"):
            logging.getLogger(name).setLevel(logging.WARNING)  # INFO lines on every engine and checkpoint
        # The CPU accelerator's TorchBackend JIT-compiles a shared-memory all-reduce (C++, ~1 min on 2 cores, needs
        # a compiler) used only by DeepSpeed-Inference's inference_all_reduce; training all-reduces through
        # torch.distributed. Marking the op incompatible (DeepSpeed keeps this dict for the process) skips the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not dist.is_initialized():
            if self.distributed:
                raise RuntimeError("train.strategy=deepspeed: torch.distributed is not initialised; run inside Ray "
                                   "Train's TorchTrainer (it sets the process group up) or pass distributed=False")
            # one process outside Ray Train (tests, benchmarks): a process group of one
            dist.init_process_group("gloo" if self.device.type == "cpu" else "nccl", store=dist.HashStore(),
                                    rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)

    def setup(self, nets: dict[str, nn.Module], trained: list[str],
              optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any]) -> None:
        import torch.distributed as dist

        unknown = [n for n in trained if n not in nets]
        if unknown:
            raise ValueError(f"trained networks {unknown} are not among the family's networks {sorted(nets)}")
        stray = sorted(set(self.ds_cfg.engines) - set(trained))
        if stray:
            raise ValueError(f"train.deepspeed.engines: {stray} name no trained network (trained: {sorted(trained)})")
        missing = [n for n in trained if n not in optimizers]
        if missing:
            raise ValueError(f"trained networks {missing} have no optimiser")
        self._init_process_group()
        import deepspeed

        self.trained = list(trained)
        world = dist.get_world_size()
        for name, net in nets.items():
            net.to(self.device)
            self._raw[name] = net
            if name not in self.trained:
                net.eval().requires_grad_(False)
                continue
            net.train()
            broadcast_buffers(net)  # parameters are broadcast by deepspeed.initialize, buffers are not
            settings = engine_settings(self.ds_cfg, name)
            self.settings[name] = settings
            engine, _, _, _ = deepspeed.initialize(
                model=net, optimizer=optimizers[name], dist_init_required=False,
                config=deepspeed_config(settings, self.cfg.train.batch_size, world),
            )
            # DDP's broadcast_buffers: rank 0's buffers before every training forward of the wrapper
            engine.register_forward_pre_hook(self._sync_buffers_hook(net))
            self._engines[name] = engine
            self._optimizers[name] = optimizers[name]

    @staticmethod
    def _sync_buffers_hook(net: nn.Module):
        def hook(module, args):
            if net.training:
                broadcast_buffers(net)
        return hook

    def module(self, name: str) -> nn.Module:
        if name in self._engines and not self._frozen.get(name):
            return self._engines[name]
        return self._raw[name]

    def raw(self, name: str) -> nn.Module:
        return self._raw[name]

    def engine(self, name: str):
        """The DeepSpeed engine of trained net ``name``."""
        return self._engines[name]

    def optimizer(self, name: str) -> torch.optim.Optimizer:
        """The client optimiser: what DeepSpeed steps (on the rank's partition under ZeRO) and what the
        loop's schedulers change."""
        return self._optimizers[name]

    @property
    def names(self) -> list[str]:
        return list(self._raw)

    def optimizer_state_bytes(self, name: str) -> int:
        """Bytes of net ``name``'s optimiser state held by this rank (1/N of the whole under ZeRO 1/2)."""
        return optimizer_state_bytes(self._optimizers[name])

    # ---- optimisation ----
    @contextlib.contextmanager
    def frozen(self, *names: str):
        params = [p for n in names for p in self._raw[n].parameters()]
        flags = [p.requires_grad for p in params]
        for n in names:
            self._frozen[n] = self._frozen.get(n, 0) + 1
        try:
            for p in params:
                p.requires_grad_(False)
            yield
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
            for n in names:
                self._frozen[n] -= 1

    def _trained_engine(self, name: str):
        if name not in self._engines:
            raise ValueError(f"{name} is not a trained network (trained: {self.trained})")
        if self._frozen.get(name):
            raise RuntimeError(f"{name} is frozen here: it cannot take a backward or step")
        return self._engines[name]

    def zero_grad(self, name: str) -> None:
        engine = self._trained_engine(name)
        if engine.zero_optimization():
            engine.optimizer.zero_grad(set_to_none=True)
        else:
            engine.zero_grad()

    def backward(self, name: str, loss: torch.Tensor) -> None:
        self._trained_engine(name).backward(loss)

    def step(self, name: str) -> None:
        self._trained_engine(name).step()

    def autocast(self):
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

    def no_sync(self, name: str):
        """A no-op: every backward already accumulates without an all-reduce until :meth:`step` (stage 2
        reduce-scatters into partitions per backward, which adds up to the same mean gradient)."""
        self._trained_engine(name)
        return contextlib.nullcontext()

    # ---- state ----
    def save(self, directory: str, client_state: dict) -> bool:
        """Every rank: ``save_checkpoint`` of each engine into ``directory/deepspeed/<net>/``; ``client_state``
        goes with the first engine's module file (written by rank 0). True when this rank wrote files."""
        root = os.path.join(directory, CHECKPOINT_SUBDIR)
        for i, name in enumerate(self.trained):
            save_dir = os.path.join(root, name)
            # DeepSpeed creates save_dir on global rank 0 only (it assumes one shared folder); here each rank
            # writes into its own local directory
            os.makedirs(os.path.join(save_dir, TAG), exist_ok=True)
            self._engines[name].save_checkpoint(save_dir, tag=TAG, client_state={CLIENT_KEY: client_state} if i == 0 else {})
        wrote = any(files for _, _, files in os.walk(root))
        if not wrote:  # nothing of this rank: leave no empty folders behind
            shutil.rmtree(root, ignore_errors=True)
        return wrote

    def load(self, directory: str) -> dict:
        """Every rank: ``load_checkpoint`` of each engine from ``directory/deepspeed/<net>/`` (module, optimiser
        partition); returns the client_state saved with the first engine.

        Raises:
            FileNotFoundError: the directory holds no DeepSpeed checkpoint of a trained network (e.g. one
                written by the ddp strategy).
        """
        client: dict | None = None
        for i, name in enumerate(self.trained):
            load_dir = os.path.join(directory, CHECKPOINT_SUBDIR, name)
            if not os.path.isfile(os.path.join(load_dir, "latest")):
                raise FileNotFoundError(
                    f"{load_dir}: no DeepSpeed checkpoint of {name} (train.strategy=deepspeed resumes only from "
                    f"checkpoints it wrote; {os.listdir(directory) if os.path.isdir(directory) else 'no such folder'})")
            path, states = self._engines[name].load_checkpoint(
                load_dir, tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise FileNotFoundError(f"{load_dir}: DeepSpeed could not load the checkpoint of {name}")
            if i == 0:
                client = dict((states or {}).get(CLIENT_KEY, {}))
        return client or {}

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
