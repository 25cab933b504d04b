"""The channel-group autoencoder: 5 Cell Painting channels through a 3-channel ``AutoencoderKL``.

The paper reuses the Stable Diffusion XL VAE (3 input channels, 8x spatial compression, 4 latent channels).
The 5 channels are split into two 3-channel groups that share one channel (default (DNA, ER, RNA) and
(RNA, AGP, Mito)); each group is encoded separately and the two 4-channel latents are concatenated to 8
channels. Decoding reverses it; the shared channel is decoded twice and merged (mean by default).

Also here: architecture presets for a small ``AutoencoderKL`` fitted on the lake's own images (the embedded
default when no SDXL weights are available), the ``fit-vae`` stage config, and a pure training loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from cpldm_core.configuration import LAKE_NAME
from cpldm_core.errors import UserError

#: Latent channels and spatial compression of the SD/SDXL VAE family (4 down-blocks -> 2^3 = 8x).
LATENT_CHANNELS_PER_GROUP = 4
DOWNSAMPLE = 8

#: scaling_factor in stabilityai/sdxl-vae's config.json (latents * scaling_factor have ~unit variance).
SDXL_VAE_SCALING = 0.13025

DEFAULT_GROUPS = ((0, 1, 2), (2, 3, 4))


@dataclass(frozen=True)
class VaeArchitecture:
    """Width/depth of a diffusers ``AutoencoderKL`` with 3 image channels and 4 latent channels."""

    block_out_channels: tuple[int, ...] = (32, 64, 128, 128)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    scaling_factor: float = 1.0


#: ``sdxl`` has the SDXL VAE's exact shape (random weights: for throughput benchmarks, never for science).
VAE_ARCHITECTURES: dict[str, VaeArchitecture] = {
    "tiny": VaeArchitecture(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8),
    "small": VaeArchitecture(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=32),
    "sdxl": VaeArchitecture(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                            scaling_factor=SDXL_VAE_SCALING),
}


def build_vae(arch: VaeArchitecture | str, sample_size: int = 128):
    """A randomly initialised diffusers ``AutoencoderKL`` (3 -> 4 latent channels, 8x down) of ``arch``."""
    from diffusers import AutoencoderKL

    if isinstance(arch, str):
        try:
            arch = VAE_ARCHITECTURES[arch]
        except KeyError:
            raise UserError(f"unknown VAE architecture {arch!r}; choose one of {sorted(VAE_ARCHITECTURES)}") from None
    n = len(arch.block_out_channels)
    if 2 ** (n - 1) != DOWNSAMPLE:
        raise UserError(f"VAE needs 4 levels for 8x downsampling, got {n}")
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS_PER_GROUP,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(arch.block_out_channels), layers_per_block=arch.layers_per_block,
        norm_num_groups=arch.norm_num_groups, sample_size=sample_size, scaling_factor=arch.scaling_factor,
    )


def check_groups(groups: Sequence[Sequence[int]], n_channels: int = 5) -> tuple[tuple[int, ...], ...]:
    """Validate channel groups: two groups of 3 indices covering all ``n_channels`` channels."""
    groups = tuple(tuple(int(i) for i in g) for g in groups)
    if len(groups) != 2 or any(len(g) != 3 for g in groups):
        raise UserError(f"channel_groups must be two groups of 3 channel indices, got {groups}")
    covered = set(groups[0]) | set(groups[1])
    if covered != set(range(n_channels)) or any(len(set(g)) != 3 for g in groups):
        raise UserError(f"channel_groups {groups} must cover channels 0..{n_channels - 1} with no repeats in a group")
    return groups


class ChannelGroupAutoencoder(torch.nn.Module):
    """Two 3-channel groups of a 5-channel image through one 3-channel ``AutoencoderKL``.

    Args:
        vae: diffusers ``AutoencoderKL`` with 3 input/output channels.
        groups: channel indices of each group; latent channels ``4k..4k+3`` belong to group ``k``.
        merge: how the channels decoded more than once are combined (``mean``; ``first`` keeps group 0's).
    """

    def __init__(self, vae, groups=DEFAULT_GROUPS, merge: Literal["mean", "first"] = "mean"):
        super().__init__()
        if vae.config.in_channels != 3 or vae.config.out_channels != 3:
            raise UserError(f"the VAE must have 3 input and output channels, has {vae.config.in_channels}/"
                            f"{vae.config.out_channels}")
        if merge not in ("mean", "first"):
            raise UserError(f"merge must be 'mean' or 'first', got {merge!r}")
        self.vae = vae
        self.groups = check_groups(groups)
        self.merge = merge
        self.n_channels = 1 + max(max(g) for g in self.groups)

    @classmethod
    def from_pretrained(cls, path_or_id: str, subfolder: str | None = None, groups=DEFAULT_GROUPS,
                        merge: str = "mean", **kwargs) -> "ChannelGroupAutoencoder":
        """Load ``AutoencoderKL.from_pretrained(path_or_id, subfolder=...)`` (SDXL VAE or a fitted one)."""
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(path_or_id, subfolder=subfolder, **kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load an AutoencoderKL from {path_or_id!r} (subfolder={subfolder!r}): "
                            f"{exc}") from None
        return cls(vae.eval(), groups=groups, merge=merge)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return LATENT_CHANNELS_PER_GROUP * len(self.groups)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 5, H, W)`` float32 in [-1, 1] -> ``(B, 8, H/8, W/8)`` latents times ``scaling_factor``.

        ``sample=False`` takes the posterior mode (deterministic: what the latent cache stores).
        """
        if x.ndim != 4 or x.shape[1] != self.n_channels:
            raise ValueError(f"encode expects (B, {self.n_channels}, H, W), got {tuple(x.shape)}")
        x = x.to(device=self.vae.device, dtype=self.vae.dtype)
        out = []
        for g in self.groups:
            dist = self.vae.encode(x[:, list(g)]).latent_dist
            out.append(dist.sample(generator) if sample else dist.mode())
        return torch.cat(out, dim=1) * self.scaling_factor

    def encode_cached(self, x: torch.Tensor) -> np.ndarray:
        """``(B, 5, H, W)`` float32 in [-1, 1] -> ``(B, 8, H/8, W/8)`` float16 numpy: the posterior mode times
        ``scaling_factor``, rounded to float16 exactly as the ingest latent cache stores it."""
        return self.encode(x).float().cpu().numpy().astype(np.float16)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, 8, h, w)`` scaled latents -> ``(B, 5, 8h, 8w)`` float32 in [-1, 1] (clamped)."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"decode expects (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        z = z.to(device=self.vae.device, dtype=self.vae.dtype) / self.scaling_factor
        b, _, h, w = z.shape
        total = torch.zeros(b, self.n_channels, h * DOWNSAMPLE, w * DOWNSAMPLE, device=z.device, dtype=torch.float32)
        count = torch.zeros(self.n_channels, device=z.device, dtype=torch.float32)
        for k, g in enumerate(self.groups):
            rec = self.vae.decode(z[:, LATENT_CHANNELS_PER_GROUP * k:LATENT_CHANNELS_PER_GROUP * (k + 1)]).sample
            for j, ch in enumerate(g):
                if self.merge == "first" and count[ch] > 0:
                    continue
                total[:, ch] += rec[:, j].float()
                count[ch] += 1
        return (total / count.view(1, -1, 1, 1)).clamp(-1.0, 1.0)


def group_samples(x: np.ndarray, groups=DEFAULT_GROUPS) -> np.ndarray:
    """``(N, 5, H, W)`` -> ``(N * n_groups, 3, H, W)``: every group of every crop as a 3-channel sample."""
    return np.concatenate([x[:, list(g)] for g in check_groups(groups)], axis=0)


# ---------------------------------------------------------------------------------------------- fit-vae
@dataclass(frozen=True)
class FitVaeConfig:
    """``cpldm fit-vae``: fit a small AutoencoderKL on the lake's training crops (both channel groups).

    Attributes:
        vae_id: output name (``vae/<vae_id>/``; also the default ``vae`` of the ingest preset).
        architecture: key of ``VAE_ARCHITECTURES``.
        crop_size: training crop side in px (random crops of normalised sites).
        crops_per_site / max_sites: data size; sites are a deterministic sample of training sites.
        steps / batch_size / lr / kl_weight: optimisation (AdamW; loss = MSE + kl_weight * KL).
        low_percentile / high_percentile: normalisation, as in ingest.
        num_cpus / num_gpus: resources of the Ray task that trains.
        seed: sampling and initialisation seed.
    """

    vae_id: str = field(default="fitted-small", metadata=LAKE_NAME)
    architecture: str = "small"
    crop_size: int = 32
    crops_per_site: int = 8
    max_sites: int = 64
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    kl_weight: float = 1e-6
    low_percentile: float = 0.1
    high_percentile: float = 99.9
    num_cpus: float = 2.0
    num_gpus: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.crop_size % DOWNSAMPLE:
            raise ValueError(f"crop_size must be a multiple of {DOWNSAMPLE}, got {self.crop_size}")


FIT_VAE_PRESETS: dict[str, FitVaeConfig] = {
    "tiny": FitVaeConfig(vae_id="fitted-tiny", architecture="tiny", crop_size=32, crops_per_site=2, max_sites=16,
                         steps=20, batch_size=8, lr=2e-3, num_cpus=1.0),
    # ~30 us per pixel per step for the small widths on one CPU core (measured 0.21 s to encode 256^2, x9 for
    # decode + backward): 300 steps x 8 crops of 32^2 ~= 75 s on 2 cores, the demo's budget
    "demo": FitVaeConfig(),
}


def random_crops(img: np.ndarray, size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random ``size`` crops of a ``(C, H, W)`` array -> ``(n, C, size, size)``."""
    h, w = img.shape[-2:]
    if size > h or size > w:
        raise UserError(f"crop_size {size} is larger than the {h}x{w} px images")
    ys = rng.integers(0, h - size + 1, n)
    xs = rng.integers(0, w - size + 1, n)
    return np.stack([img[:, y:y + size, x:x + size] for y, x in zip(ys, xs)])


def fit_small_vae(vae, samples: np.ndarray, steps: int, batch_size: int, lr: float, kl_weight: float,
                  seed: int = 0, device: str = "cpu",
                  on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train ``vae`` in place on 3-channel samples; returns the per-step history.

    Args:
        vae: diffusers ``AutoencoderKL`` (3 channels).
        samples: ``(N, 3, S, S) float32`` in [-1, 1] (both channel groups of the training crops).
        steps, batch_size, lr, kl_weight: AdamW steps on ``MSE(recon, x) + kl_weight * KL(q(z|x) || N(0, I))``.
    Returns:
        ``[{"step", "loss", "mse", "kl"}, ...]``. After training, ``vae.config.scaling_factor`` is set to
        ``1 / std`` of the posterior means over ``samples`` (as Stable Diffusion chose its 0.18215), so scaled
        latents have unit variance for the diffusion model.
    """
    if samples.ndim != 4 or samples.shape[1] != 3:
        raise ValueError(f"samples must be (N, 3, S, S), got {samples.shape}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    data = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    history = []
    for step in range(steps):
        idx = rng.integers(0, len(data), min(batch_size, len(data)))
        x = data[idx].to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        row = {"step": step, "loss": loss.item(), "mse": mse.item(), "kl": kl.item()}
        history.append(row)
        if on_step is not None:
            on_step(step, row)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(data[i:i + 64].to(device)).latent_dist.mode().cpu()
                           for i in range(0, len(data), 64)])
    std = float(means.std())
    vae.register_to_config(scaling_factor=1.0 / std if std > 0 and math.isfinite(std) else 1.0)
    return history


def reconstruction_errors(model: ChannelGroupAutoencoder, x: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Round-trip ``(N, 5, S, S)`` crops; returns ``(reconstructions (N,5,S,S) float32, mse (N, 5) per channel)``."""
    recs = []
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32))
        recs.append(model.decode(model.encode(xb)).cpu().numpy())
    rec = np.concatenate(recs) if recs else np.zeros_like(x)
    return rec, ((rec - x) ** 2).mean(axis=(2, 3))
