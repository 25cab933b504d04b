"""Noise schedule, v-prediction training loss and seeded samplers for the latent diffusion model.

The schedule is the paper's (METHOD.md "Noise schedule"): scaled-linear betas 0.0015 -> 0.0205 over 1000 steps,
v-prediction ("angular" parameterisation, Salimans & Ho 2022). All samplers (DDPM, DDIM, DPM-Solver++) are the
diffusers schedulers built ``from_config`` of one DDPM configuration, so training and generation share the
exact same alphas.

Determinism contract of :func:`sample`: image ``i``'s initial noise (and, for the stochastic DDPM sampler, its
per-step noise) comes from its own ``torch.Generator`` seeded with ``seeds[i]``; the output for a given
(seed, conditioning) therefore does not depend on which other images share the batch.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from cpldm_core.configuration import LAKE_NAME, bounds
from cpldm_core.errors import UserError

#: Paper's schedule (METHOD.md): scaled-linear betas, 1000 steps, v-prediction.
PAPER_BETA_START = 0.0015
PAPER_BETA_END = 0.0205
PAPER_TRAIN_TIMESTEPS = 1000

SAMPLERS = ("ddpm", "ddim", "dpm++")


@dataclass(frozen=True)
class ScheduleConfig:
    """The DDPM noise schedule every sampler is derived from (saved in the model's metadata as a dict)."""

    beta_start: float = PAPER_BETA_START
    beta_end: float = PAPER_BETA_END
    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = PAPER_TRAIN_TIMESTEPS
    prediction_type: str = "v_prediction"

    def to_dict(self) -> dict:
        return asdict(self)


def _schedule_dict(schedule: ScheduleConfig | dict | None) -> dict:
    if schedule is None:
        return ScheduleConfig().to_dict()
    if isinstance(schedule, ScheduleConfig):
        return schedule.to_dict()
    return ScheduleConfig(**{k: v for k, v in dict(schedule).items() if k in ScheduleConfig.__dataclass_fields__}
                          ).to_dict()


def make_scheduler(kind: str = "ddpm", schedule: ScheduleConfig | dict | None = None, **overrides: Any):
    """A diffusers scheduler for ``kind`` in ``("ddpm", "ddim", "dpm++")`` built from one DDPM config.

    Args:
        kind: ``ddpm`` (training and ancestral sampling), ``ddim`` (eta=0, deterministic) or ``dpm++``
            (``DPMSolverMultistepScheduler``, algorithm ``dpmsolver++``, 2nd order).
        schedule: the training schedule (:class:`ScheduleConfig`, or its dict as stored in a saved model's
            ``metadata["schedule"]``); ``None`` = the paper's.
        overrides: extra scheduler config keys (e.g. ``timestep_spacing="trailing"``).
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    s = _schedule_dict(schedule)
    base = DDPMScheduler(beta_schedule=s["beta_schedule"], beta_start=s["beta_start"], beta_end=s["beta_end"],
                         num_train_timesteps=s["num_train_timesteps"], prediction_type=s["prediction_type"],
                         clip_sample=False)
    if kind == "ddpm":
        return DDPMScheduler.from_config(base.config, **overrides) if overrides else base
    if kind == "ddim":
        return DDIMScheduler.from_config(base.config, **{"set_alpha_to_one": False, **overrides})
    if kind in ("dpm++", "dpmpp", "dpm-solver++"):
        return DPMSolverMultistepScheduler.from_config(
            base.config, **{"algorithm_type": "dpmsolver++", "solver_order": 2, **overrides})
    raise UserError(f"unknown sampler {kind!r}; choose one of {', '.join(SAMPLERS)}")


def v_target(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(a_t) * eps - sqrt(1 - a_t) * x0 (Salimans & Ho 2022, eq. in sec. 4), per sample ``t``."""
    a = alphas_cumprod.to(x0.device, torch.float32)[t].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def add_noise(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps."""
    a = alphas_cumprod.to(x0.device, torch.float32)[t].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for v-prediction (Hang et al. 2023): ``min(SNR_t, gamma) / (SNR_t + 1)``, (B,).

    ``SNR_t = a_t / (1 - a_t)`` with ``a_t`` the cumulative alpha product. The v-MSE equals ``(SNR_t + 1)`` times
    the x0-MSE, so this weight turns the loss into an x0-MSE weighted by ``min(SNR_t, gamma)``: low-noise steps
    (huge SNR) stop dominating the gradient, the high-noise steps keep weight ~SNR_t (small).
    """
    a = alphas_cumprod.to(timesteps.device, torch.float64)[timesteps]
    snr = a / (1.0 - a)
    return (torch.clamp(snr, max=float(gamma)) / (snr + 1.0)).float()


def v_prediction_loss(model: torch.nn.Module, latents: torch.Tensor, compound: torch.Tensor,
                      compound_mask: torch.Tensor | None = None, confounders: torch.Tensor | None = None, *,
                      scheduler=None, cond_dropout: float = 0.0, confounder_dropout: float = 0.0,
                      generator: torch.Generator | None = None, timesteps: torch.Tensor | None = None,
                      null_codes: Sequence[int] | None = None, snr_gamma: float = 0.0,
                      compound_feature_dropout: float = 0.0) -> torch.Tensor:
    """Mean squared error between the model's v and the true v at random timesteps: a scalar float32 tensor.

    Args:
        model: a :class:`~cpldm_core.denoiser.ConfounderAwareDenoiser` (or its DDP wrapper).
        latents: clean latents x0 (B, 8, h, w) float (already VAE-scaled).
        compound, compound_mask, confounders: conditioning, as in the model's ``forward``.
        scheduler: a DDPM scheduler (its ``alphas_cumprod``); ``None`` = :func:`make_scheduler` ("ddpm").
        cond_dropout: probability of dropping a sample's compound tokens (classifier-free guidance).
        confounder_dropout: probability, per sample and confounder, of replacing the code by its null index
            (needs ``null_codes`` (4,), from ``vocab.null_index``).
        generator: torch generator for timesteps, noise and dropout (on the latents' device).
        timesteps: fixed (B,) timesteps instead of uniform draws (used by validation for a low-variance loss).
        snr_gamma: > 0 weights each sample's MSE by :func:`min_snr_weights` (min-SNR-gamma); 0 = plain mean.
        compound_feature_dropout: probability of zeroing each compound input feature (fingerprint bit or token
            dimension), survivors scaled by 1 / (1 - p): inverted dropout on the input, drawn from ``generator``
            (so a seeded run stays reproducible; p = 0 draws nothing).
    """
    scheduler = scheduler if scheduler is not None else make_scheduler("ddpm")
    acp = scheduler.alphas_cumprod
    b = latents.shape[0]
    device = latents.device
    x0 = latents.float()
    if timesteps is None:
        timesteps = torch.randint(0, len(acp), (b,), generator=generator, device=device)
    noise = torch.randn(x0.shape, generator=generator, device=device)
    noisy = add_noise(acp, x0, noise, timesteps)
    target = v_target(acp, x0, noise, timesteps)
    if compound_feature_dropout > 0:
        keep = torch.rand(compound.shape, generator=generator, device=device) >= compound_feature_dropout
        compound = compound * keep.to(compound.dtype) / (1.0 - compound_feature_dropout)
    drop = None
    if cond_dropout > 0:
        drop = torch.rand(b, generator=generator, device=device) < cond_dropout
    if confounders is not None and confounder_dropout > 0:
        if null_codes is None:
            raise ValueError("confounder_dropout needs null_codes (vocab.null_index per confounder)")
        nulls = torch.as_tensor(list(null_codes), dtype=torch.long, device=device).expand_as(confounders)
        hit = torch.rand(confounders.shape, generator=generator, device=device) < confounder_dropout
        confounders = torch.where(hit, nulls, confounders.to(device))
    pred = model(noisy, timesteps, compound, compound_mask=compound_mask, confounders=confounders, drop_mask=drop)
    if snr_gamma > 0:
        per_sample = ((pred.float() - target) ** 2).flatten(1).mean(dim=1)
        return (per_sample * min_snr_weights(acp, timesteps, snr_gamma)).mean()
    return torch.nn.functional.mse_loss(pred.float(), target)


def initial_noise(seeds: Sequence[int], latent_shape: Sequence[int], device: str | torch.device = "cpu"
                  ) -> tuple[torch.Tensor, list[torch.Generator]]:
    """(B, *latent_shape) float32 standard normal noise, row ``i`` drawn from a generator seeded ``seeds[i]``.

    Returns the noise and the per-sample generators (advanced past the initial draw), which stochastic
    samplers keep using so each image's whole trajectory depends on its own seed only.
    """
    gens, rows = [], []
    for seed in seeds:
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        rows.append(torch.randn(tuple(latent_shape), generator=g, dtype=torch.float32))
        gens.append(g)
    return torch.stack(rows).to(device), gens


@torch.no_grad()
def sample(model: torch.nn.Module, scheduler, steps: int, guidance_scale: float, compound: torch.Tensor,
           compound_mask: torch.Tensor | None = None, confounders: torch.Tensor | None = None, *,
           seeds: Sequence[int], latent_shape: Sequence[int] | None = None,
           progress: bool = False) -> torch.Tensor:
    """Generate latents (B, 8, h, w) float32 (VAE-scaled, ready for the autoencoder's ``decode``).

    Args:
        model: a trained :class:`~cpldm_core.denoiser.ConfounderAwareDenoiser` (eval mode).
        scheduler: a scheduler from :func:`make_scheduler` (copied here, so it may be shared across threads).
        steps: number of sampling steps (e.g. 50 for DDIM, 20 for DPM-Solver++).
        guidance_scale: classifier-free guidance weight on the compound; 1 = plain conditional sampling.
            ``v = v_uncond + s * (v_cond - v_uncond)`` where the unconditional branch keeps the confounders
            and replaces the compound by the learned null token.
        compound, compound_mask, confounders: conditioning for each of the B images.
        seeds: B integers; image ``i``'s noise comes from ``torch.Generator().manual_seed(seeds[i])``.
        latent_shape: (8, h, w); default (8, sample_size, sample_size) of the model's U-Net.
    """
    if len(seeds) != compound.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {compound.shape[0]} compounds")
    if latent_shape is None:
        size = int(model.unet.config.sample_size)
        latent_shape = (model.unet.config.in_channels, size, size)
    device = next(model.parameters()).device
    sched = scheduler.__class__.from_config(scheduler.config)
    sched.set_timesteps(int(steps), device=device)
    x, gens = initial_noise(seeds, latent_shape, device)
    x = x * sched.init_noise_sigma
    b = x.shape[0]
    compound = compound.to(device)
    compound_mask = compound_mask.to(device) if compound_mask is not None else None
    confounders = confounders.to(device) if confounders is not None else None
    guided = float(guidance_scale) != 1.0
    if guided:
        compound2 = torch.cat([compound, compound])
        mask2 = torch.cat([compound_mask, compound_mask]) if compound_mask is not None else None
        conf2 = torch.cat([confounders, confounders]) if confounders is not None else None
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(device)
    iterator = sched.timesteps
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc="sampling", leave=False)
    dtype = next(model.parameters()).dtype
    for t in iterator:
        inp = sched.scale_model_input(x, t)
        tt = torch.full((b,), int(t), device=device, dtype=torch.long)
        if guided:
            v = model(torch.cat([inp, inp]).to(dtype), torch.cat([tt, tt]), compound2, compound_mask=mask2,
                      confounders=conf2, drop_mask=drop).float()
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + float(guidance_scale) * (v_cond - v_uncond)
        else:
            v = model(inp.to(dtype), tt, compound, compound_mask=compound_mask, confounders=confounders).float()
        # a list of per-sample generators makes diffusers draw each image's step noise (DDPM; DDIM with
        # eta > 0) from that image's own generator (diffusers.utils.torch_utils.randn_tensor)
        x = sched.step(v, t, x, generator=gens).prev_sample
    return x.float()


# ---------------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainConfig:
    """Configuration of ``cpldm train`` (one model run). Presets: :data:`TRAIN_PRESETS`.

    Batch arithmetic: one optimiser step sees ``batch_size * workers * grad_accum`` latents (the paper's 192 =
    48 per GPU x 4 GPUs x 1, or 48 x 1 GPU x 4 accumulation steps).
    """

    model: str = "scm"                      # scm | scm-free
    unet_preset: str = "small"              # a UNET_PRESETS name
    vae_id: str = field(default="", metadata=LAKE_NAME)  # latents/<vae_id>/; "" = the only one in the lake
    encoder_id: str = field(default="", metadata=LAKE_NAME)  # embeddings partition; "" = the only one in the lake
    compound_input: str = "pooled"          # pooled (embeddings table) | tokens (embeddings/<id>/tokens.zarr)
    compound_tokens: int = 4                # tokens a pooled vector is projected to
    global_condition: bool = False          # conditioning also added to the timestep embedding (every block)
    schedule: ScheduleConfig = ScheduleConfig()
    max_steps: int = 300                    # optimiser steps; 0 = derive from ``epochs``
    epochs: float = 0.0                     # used when max_steps == 0 (paper: 30)
    batch_size: int = field(default=16, metadata=bounds(ge=1))  # latents per worker per micro-batch
    grad_accum: int = field(default=1, metadata=bounds(ge=1))  # micro-batches per optimiser step
    lr: float = field(default=5e-4, metadata=bounds(gt=0))
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0                  # max gradient norm; 0 = off
    ema_decay: float = field(default=0.0, metadata=bounds(ge=0, lt=1))  # 0 = no EMA; the exported model is the EMA when enabled
    lr_schedule: str = "constant"           # after warm-up: constant (paper) | cosine (decay to 0 at max_steps)
    snr_gamma: float = field(default=0.0, metadata=bounds(ge=0))  # > 0: min-SNR-gamma loss weighting; 0 = plain MSE
    cond_dropout: float = field(default=0.1, metadata=bounds(ge=0, le=1))  # P(drop compound tokens): classifier-free guidance
    compound_feature_dropout: float = field(default=0.0, metadata=bounds(ge=0, lt=1))  # P(zero) per compound input feature
    confounder_dropout: float = field(default=0.1, metadata=bounds(ge=0, le=1))  # P(null token) per confounder (scm): held-out-batch validation
    checkpoint_every: int = field(default=100, metadata=bounds(ge=1))  # steps between checkpoints (and history flushes)
    keep_checkpoints: int = 2
    val_every: int = 50                     # steps between validation passes (held-out batches); 0 = off
    val_max_rows: int = 256                 # validation latents (a deterministic subset of held-out rows)
    val_timesteps: int = 8                  # fixed, evenly spaced timesteps averaged in the validation loss
    workers: int = field(default=2, metadata=bounds(ge=1))
    cpus_per_worker: float = 1.0            # Ray resources per worker; torch threads = max(1, int(this))
    data_cpus: float = 0.5                  # Ray CPUs per latent-reading task (must fit beside the workers)
    gpus_per_worker: float = 0.0
    bf16: bool = True                       # autocast to bfloat16 on GPU (ignored on CPU)
    seed: int = field(default=0, metadata=bounds(ge=0))  # initial weights, data order (a fresh permutation per epoch), noise
    max_failures: int = 2                   # Ray Train FailureConfig: worker-group restarts from the checkpoint
    fail_at_step: int = field(default=-1, metadata=bounds(ge=-1))  # testing: one worker raises once at this step (first attempt only)
    audit_rows: bool = False                # write the latent rows each rank trained on (models/<run>/audit/)

    def __post_init__(self):
        if self.model not in ("scm", "scm-free"):
            raise UserError(f"model {self.model!r} must be 'scm' or 'scm-free'")
        if self.compound_input not in ("pooled", "tokens"):
            raise UserError(f"compound_input {self.compound_input!r} must be 'pooled' or 'tokens'")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise UserError("set max_steps > 0 or epochs > 0")
        if self.cpus_per_worker <= 0 or self.data_cpus < 0:
            raise UserError("cpus_per_worker must be > 0 and data_cpus >= 0")
        for name in ("batch_size", "grad_accum", "workers", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise UserError("ema_decay must be in [0, 1)")
        if self.lr_schedule not in ("constant", "cosine"):
            raise UserError(f"lr_schedule {self.lr_schedule!r} must be 'constant' or 'cosine'")
        if self.lr_schedule == "cosine" and self.max_steps <= 0:
            raise UserError("lr_schedule=cosine needs max_steps > 0 (the decay ends at max_steps)")


#: Stage presets. ``tiny``: CI (8x8 latents, seconds). ``demo``: the embedded default (16x16 latents, ~3 min on
#: 2 CPU cores per model). ``small``: longer CPU/GPU runs. ``paper``: METHOD.md (lr 2.5e-5 from the author's
#: config, batch 192 = 48 x 4 workers, 30 epochs, bf16 on GPU). The small presets use a larger lr: with
#: a few hundred steps, 2.5e-5 would barely move the weights.
TRAIN_PRESETS: dict[str, TrainConfig] = {
    # tiny/demo: 2 workers x 0.5 CPU leave 1 CPU of a 2-core machine to Ray Data's latent-reading tasks
    "tiny": TrainConfig(unet_preset="tiny", max_steps=60, batch_size=16, lr=2e-3, warmup_steps=5,
                        cpus_per_worker=0.5, data_cpus=0.25,
                        checkpoint_every=20, val_every=20, val_max_rows=64, val_timesteps=4, compound_tokens=2),
    # demo: min-SNR-5 weighting raised both models' gap closed in every training seed, on this recipe and on the
    # science one (issue 18; benchmarks/results/exp_model_seeds_minsnr, exp_model_seeds_b2_minsnr), at no cost
    "demo": TrainConfig(unet_preset="small", max_steps=240, batch_size=16, lr=1e-3, warmup_steps=20,
                        cpus_per_worker=0.5, data_cpus=0.25, checkpoint_every=80, val_every=40, val_max_rows=128,
                        snr_gamma=5.0),
    "small": TrainConfig(unet_preset="small", max_steps=3000, batch_size=32, lr=3e-4, warmup_steps=200,
                         checkpoint_every=500, val_every=250, ema_decay=0.999),
    "paper": TrainConfig(unet_preset="paper", max_steps=0, epochs=30.0, batch_size=48, grad_accum=1, workers=4,
                         gpus_per_worker=1.0, cpus_per_worker=4.0, data_cpus=1.0, lr=2.5e-5, warmup_steps=500,
                         checkpoint_every=2000, val_every=1000, val_max_rows=2048, ema_decay=0.9999,
                         compound_tokens=4),
}


# ---------------------------------------------------------------------------------------------------- data order
@functools.lru_cache(maxsize=4)
def epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """(n_rows,) int64, read-only: the order in which epoch ``epoch`` visits the training rows, a permutation
    drawn from ``np.random.default_rng([seed, epoch])``: the same for every worker, every attempt and every rerun.
    Cached (a latent-reading task asks for the same epoch batch after batch)."""
    perm = np.random.default_rng([int(seed), int(epoch)]).permutation(int(n_rows))
    perm.flags.writeable = False
    return perm


def global_positions(local_index: np.ndarray, *, rank: int, world: int, batch_size: int, grad_accum: int,
                     start_step: int) -> np.ndarray:
    """Positions in the global sample stream of a rank's ``local_index``-th samples (int64 arrays, 0-based).

    The stream is the concatenation of the epochs' permutations. Optimiser step ``k`` consumes positions
    ``[k * E, (k + 1) * E)`` with ``E = batch_size * world * grad_accum``; within it, micro-batch ``m`` of rank
    ``r`` is the ``batch_size`` positions starting at ``k * E + (m * world + r) * batch_size``. A rank that starts
    (or resumes) at step ``start_step`` numbers its samples from there, so what step ``k`` trains on does not
    depend on restarts, on Ray Data's scheduling or on block sizes."""
    local_index = np.asarray(local_index, dtype=np.int64)
    micro, within = np.divmod(local_index, batch_size)
    step, m = np.divmod(micro, grad_accum)
    step = step + start_step
    return step * (batch_size * world * grad_accum) + (m * world + rank) * batch_size + within


def stream_rows(positions: np.ndarray, n_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(row index into the training table, epoch) of each global stream position: ``epoch = p // n_rows``,
    ``row = epoch_permutation(n_rows, seed, epoch)[p % n_rows]``. Both int64 arrays shaped like ``positions``."""
    positions = np.asarray(positions, dtype=np.int64)
    epochs, offsets = np.divmod(positions, int(n_rows))
    rows = np.empty_like(positions)
    for e in np.unique(epochs):
        hit = epochs == e
        rows[hit] = epoch_permutation(n_rows, seed, int(e))[offsets[hit]]
    return rows, epochs


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the torch generator a rank draws step ``step``'s timesteps, noise and dropout from: reseeded per
    step, so a run restored from a checkpoint draws what the uninterrupted run drew."""
    return int(np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1, np.uint64)[0] >> 1)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay used after optimiser step ``step`` (0-based): ``min(decay, (1 + step) / (10 + step))``.

    The warm-up matters for short runs: with a fixed 0.999 the exported EMA of a 960-step run still holds
    0.999^960 = 38% of the random initial weights (measured in benchmarks/exp_model.py: that arm was worse than
    no EMA in every noise band). With the warm-up the initial weights' share after 960 steps is ~1e-4.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up to ``config.lr`` over ``warmup_steps``,
    then constant (``lr_schedule=constant``, the paper gives no decay) or a half-cosine from ``lr`` at the end of
    warm-up to 0 at ``max_steps`` (``lr_schedule=cosine``)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule != "cosine":
        return config.lr
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
