"""Zarr v3 array layouts of the lake (names, dtypes, chunk and shard shapes, required attributes)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ZarrLayout:
    """One Zarr array.

    ``chunk`` and ``shard`` are given for the leading (row) axis; trailing axes are whole.
    A shard of rows is the unit a Ray task writes, so no two tasks ever write the same shard.
    """

    path: str                 # relative to the lake root; placeholders in braces
    array: str                # array name inside the group
    dtype: str
    axes: tuple[str, ...]
    rows_per_chunk: int
    rows_per_shard: int
    attributes: tuple[str, ...]
    description: str


LATENTS = ZarrLayout(
    path="latents/{vae_id}/latents.zarr",
    array="latents",
    dtype="float16",
    axes=("row", "latent_channel", "y", "x"),   # (N, 8, H/8, W/8), already multiplied by scaling_factor
    rows_per_chunk=1,
    rows_per_shard=256,                          # 256 x 8 x 48 x 48 x 2 B = 9.4 MB at the paper's 384 px crops
    attributes=("vae_id", "scaling_factor", "channel_groups", "normalisation", "crop", "config"),
    description="channel-group VAE latents of the training crops",
)

SYNTHETIC_IMAGES = ZarrLayout(
    path="synthetic/{run}/images.zarr",
    array="images",
    dtype="uint16",
    axes=("row", "channel", "y", "x"),           # (N, 5, H, W), channels DNA, ER, RNA, AGP, Mito
    rows_per_chunk=1,
    rows_per_shard=64,
    attributes=("run", "model_run", "channels", "normalisation", "config"),
    description="generated 5-channel images, one per design row",
)

COMPOUND_TOKENS = ZarrLayout(
    path="embeddings/{encoder_id}/tokens.zarr",
    array="tokens",
    dtype="float16",
    axes=("row", "token", "dim"),                # (N, T, D) token embeddings for cross-attention
    rows_per_chunk=256,
    rows_per_shard=4096,
    attributes=("encoder_id", "max_tokens", "config"),
    description="token-level compound embeddings (MolT5); row order = embeddings table order",
)

ZARR_LAYOUTS = {"latents": LATENTS, "synthetic_images": SYNTHETIC_IMAGES, "compound_tokens": COMPOUND_TOKENS}
