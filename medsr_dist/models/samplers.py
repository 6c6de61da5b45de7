"""Noise schedule and samplers of the latent diffusion family, all built from ONE ``DDPMScheduler`` config.

Training noises latents with :func:`noise_scheduler` (diffusers ``DDPMScheduler``, the reference's T = 300 and
linear betas 1e-4..0.02 by default). Inference builds its sampler from that scheduler's own config
(``from_config``), so the betas, T, prediction type and timestep spacing cannot drift apart:

* ``ddpm``: ancestral sampling (``DDPMScheduler.step``), fresh noise at every step; ``steps = T`` is the reference.
* ``ddim``: ``DDIMScheduler`` with eta = 0 (deterministic given the initial noise), ``set_alpha_to_one`` so the
  last step lands on the predicted x0.
* ``dpmsolver++``: ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)``, deterministic.

Pitfalls handled here (and why):

* ``clip_sample`` is always off: it clips the predicted x0 to [-1, 1], which is right for pixels and wrong for
  latents (scaled latents have unit std, so |z| > 1 is ordinary).
* With T = 300 and these betas alpha_bar_T = 0.048: x_T still holds sqrt(0.048) = 22 % of the latent, so sampling
  "from pure noise" starts from a distribution the network never saw at its last training step. The config offers
  ``zero_terminal_snr`` (diffusers' ``rescale_betas_zero_snr``: alpha_bar_T = 0 exactly) which needs v-prediction.
* ``timestep_spacing``: diffusers' DDPM/DDIM default ``leading`` never visits t = T-1 when steps < T (DDIM-50 of
  T = 300 starts at t = 294); ``trailing`` (our default) starts at T-1 as the zero-SNR paper recommends.

Determinism: every sample's noise comes from its own ``torch.Generator`` seeded by :func:`sample_seed` from
(content hash of the sample's conditioning input, sample index, run seed). A tile's noise therefore does not
depend on which other tiles share its batch, nor on the order of a nightly run.

Tensors: latents (B, C, h, w) float32; the denoiser takes (B, 2C, h, w) = [x_t, condition latent] and a (B,)
timestep tensor and returns (B, C, h, w) (epsilon or v, per ``prediction_type``).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from medsr_dist.config import SAMPLERS, NoiseScheduleConfig

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def noise_scheduler(cfg: NoiseScheduleConfig):
    """The ONE ``DDPMScheduler`` (training noise, and the config every sampler is built from)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule, beta_start=cfg.beta_start,
        beta_end=cfg.beta_end, prediction_type=cfg.prediction_type, clip_sample=False, variance_type="fixed_small",
        timestep_spacing=cfg.timestep_spacing, rescale_betas_zero_snr=cfg.zero_terminal_snr,
    )


def make_sampler(cfg: NoiseScheduleConfig, sampler: str):
    """A fresh sampler scheduler (they are stateful: one per sampling run) built from :func:`noise_scheduler`'s config.

    Raises:
        ValueError: unknown sampler name.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    base = noise_scheduler(cfg)
    if sampler == "ddpm":
        return base
    if sampler == "ddim":
        return DDIMScheduler.from_config(base.config, set_alpha_to_one=True, clip_sample=False)
    if sampler == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(base.config, algorithm_type="dpmsolver++", solver_order=2,
                                                       final_sigmas_type="zero")
    raise ValueError(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the U-Net learns to predict: the noise (epsilon) or v = sqrt(ab) * eps - sqrt(1 - ab) * x0."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return noise


def content_hash(x: torch.Tensor) -> bytes:
    """sha256 of one sample's float32 bytes (its shape included): the 'input content hash' of its noise seed."""
    a = x.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(repr(tuple(a.shape)).encode())
    h.update(a.numpy().tobytes())
    return h.digest()


def sample_seed(content: bytes, sample_index: int, run_seed: int) -> int:
    """63-bit seed of one sample's noise from (content hash, sample index, run seed)."""
    h = hashlib.sha256(b"medsr-ldm-noise\0" + content + int(sample_index).to_bytes(4, "little")
                       + int(run_seed).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest()[:8], "little") >> 1


def generators(contents: Sequence[bytes], sample_index: int, run_seed: int, device: torch.device | str = "cpu"):
    """One seeded ``torch.Generator`` per sample (on ``device``)."""
    gens = []
    for c in contents:
        g = torch.Generator(device=device)
        g.manual_seed(sample_seed(c, sample_index, run_seed))
        gens.append(g)
    return gens


def initial_noise(shape: Sequence[int], gens: list[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """(B, C, h, w) standard normal noise, sample i drawn from ``gens[i]`` alone (batch-composition independent)."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(tuple(shape), generator=gens, device=torch.device(device), dtype=dtype)


@torch.no_grad()
def sample(denoise: Denoiser, cond: torch.Tensor, cfg: NoiseScheduleConfig, sampler: str, steps: int,
           gens: list[torch.Generator]) -> torch.Tensor:
    """Run ``sampler`` for ``steps`` steps from seeded noise, conditioned on ``cond``.

    Args:
        denoise: (B, 2C, h, w) [x_t, cond], (B,) int64 timesteps -> (B, C, h, w) prediction.
        cond: (B, C, h, w) condition latent (the encoded, scaled LR).
        gens: one generator per sample: the initial noise and DDPM's per-step noise come from it.
    Returns:
        (B, C, h, w) the sampled (scaled) latent x_0.
    Raises:
        ValueError: unknown sampler, or more steps than training timesteps.
    """
    sched = make_sampler(cfg, sampler)
    if not 1 <= steps <= cfg.num_train_timesteps:
        raise ValueError(f"steps must be in 1..{cfg.num_train_timesteps}, got {steps}")
    sched.set_timesteps(steps, device=cond.device)
    x = initial_noise(cond.shape, gens, cond.device, cond.dtype) * sched.init_noise_sigma
    kwargs = {"generator": gens} if sampler == "ddpm" else ({"eta": 0.0} if sampler == "ddim" else {})
    b = cond.shape[0]
    for t in sched.timesteps:
        inp = torch.cat([sched.scale_model_input(x, t), cond], dim=1)
        pred = denoise(inp, t.reshape(1).expand(b).to(torch.int64))
        x = sched.step(pred.to(x.dtype), t, x, **kwargs).prev_sample
    return x


def terminal_alpha_bar(cfg: NoiseScheduleConfig) -> float:
    """alpha_bar at the last training step (0.048 for the reference; 0 with zero_terminal_snr)."""
    return float(noise_scheduler(cfg).alphas_cumprod[-1])
