"""Cell Painting image preprocessing: TIFF decoding checks, illumination correction, global robust
normalisation to [-1, 1], centre crops and tiles, and the ingest stage's config.

Normalisation is GLOBAL per channel (one low/high pair per channel for the whole dataset), never per image:
per-image rescaling would erase exactly the intensity phenotypes the model has to learn. The statistics are
robust percentiles of pooled pixels from a sample of training sites, recorded with every latent cache so
generated images can be mapped back to uint16 with :func:`denormalise`.

Array conventions: a site is ``(C=5, H, W)`` in channel order ``CHANNELS`` (DNA, ER, RNA, AGP, Mito);
raw pixels are ``uint16`` grey levels; normalised pixels are ``float32`` in [-1, 1].
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Iterable, Literal

import numpy as np

from cpldm_core.configuration import LAKE_NAME, bounds
from cpldm_core.errors import UserError

#: Largest uint16 grey level (TIFFs from the JUMP microscopes are 16-bit).
UINT16_MAX = 65535

#: Default robust percentiles (per channel, pooled over the sample): 0.1 / 99.9 keeps the dim cytoplasm
#: and the bright nuclei apart while ignoring hot pixels and debris. The paper does not state its choice.
DEFAULT_LOW_PERCENTILE = 0.1
DEFAULT_HIGH_PERCENTILE = 99.9

#: Pixels per channel per site kept for the percentile estimate (a strided subsample keeps memory flat).
STATS_PIXELS_PER_SITE = 65536

NORMALISATION_METHOD = "global-per-channel-robust-percentile"


#: Largest decoded plane accepted by default (bytes): 64 MiB is a 5,792 x 5,792 uint16 plane, over 25x a JUMP
#: 1080 x 1080 site and 6x a 2160 x 2160 Phenix one; a 0.8 MB zlib TIFF can otherwise ask for 1.5 GB.
DEFAULT_MAX_PLANE_BYTES = 64 * 2**20


class ImageError(ValueError):
    """A site's image data cannot be used (missing, corrupt, wrong shape or dtype). The message says why."""


# ---------------------------------------------------------------------------------------------- decoding
def decode_tiff(data: bytes, name: str = "", max_bytes: int = DEFAULT_MAX_PLANE_BYTES) -> np.ndarray:
    """Decode one single-channel TIFF to a ``(H, W) uint16`` array.

    Real JUMP TIFFs are LZW-compressed, which ``tifffile`` decodes through ``imagecodecs``. The shape and
    dtype are checked from the TIFF header before any pixel is decoded: a plane of more than ``max_bytes``
    decoded bytes, or of another dtype than uint16 (8-bit and float exports), is refused without decoding.
    Raises :class:`ImageError` naming ``name`` when the bytes are empty, truncated or not a 2-D uint16 image.
    """
    import tifffile

    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            shape, dtype = tuple(series.shape), np.dtype(series.dtype)
            decoded = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if dtype != np.uint16:
                raise ImageError(f"{name}: expected uint16 pixels, got {dtype}")
            if decoded > max_bytes:
                raise ImageError(f"{name}: the TIFF header asks for {decoded:,} bytes ({shape} {dtype}), over the "
                                 f"{max_bytes:,}-byte limit (max_plane_bytes)")
            arr = tif.asarray()
    except ImageError:
        raise
    except Exception as exc:  # tifffile raises many types on corrupt/truncated input
        raise ImageError(f"{name}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ImageError(f"{name}: expected a 2-D single-channel image, got shape {arr.shape}")
    if arr.dtype != np.uint16:
        raise ImageError(f"{name}: expected uint16 pixels, got {arr.dtype}")
    return arr


def stack_channels(channels: list[np.ndarray], names: list[str] | None = None) -> np.ndarray:
    """Stack 5 decoded channels into ``(5, H, W) uint16``; all must share one shape."""
    shapes = {c.shape for c in channels}
    if len(shapes) != 1:
        detail = ", ".join(f"{n}={c.shape}" for n, c in zip(names or range(len(channels)), channels))
        raise ImageError(f"channels have different shapes: {detail}")
    return np.stack(channels, axis=0)


def apply_illumination(img: np.ndarray, illum: np.ndarray) -> np.ndarray:
    """Illumination correction as CellProfiler's ``CorrectIlluminationApply`` (method Divide).

    Args:
        img: ``(5, H, W)`` uint16 or float raw pixels.
        illum: ``(5, H, W)`` float illumination functions (JUMP ``*_Illum<Channel>.npy``, ~1 on average).
    Returns:
        ``(5, H, W) float32`` corrected pixels, same grey-level units as ``img``.
    """
    if illum.shape != img.shape:
        raise ImageError(f"illumination function shape {illum.shape} does not match image shape {img.shape}")
    safe = np.where(illum > 0, illum, 1.0).astype(np.float32)
    return img.astype(np.float32) / safe


# ---------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Normalisation:
    """Global per-channel intensity mapping ``[low, high] -> [-1, 1]`` (grey levels, after illumination)."""

    low: tuple[float, ...]
    high: tuple[float, ...]
    method: str = NORMALISATION_METHOD
    low_percentile: float = DEFAULT_LOW_PERCENTILE
    high_percentile: float = DEFAULT_HIGH_PERCENTILE
    n_sites: int = 0

    def to_dict(self) -> dict:
        return {"method": self.method, "low": [float(v) for v in self.low], "high": [float(v) for v in self.high],
                "low_percentile": self.low_percentile, "high_percentile": self.high_percentile,
                "n_sites": self.n_sites}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalisation":
        return cls(low=tuple(float(v) for v in d["low"]), high=tuple(float(v) for v in d["high"]),
                   method=d.get("method", NORMALISATION_METHOD),
                   low_percentile=float(d.get("low_percentile", DEFAULT_LOW_PERCENTILE)),
                   high_percentile=float(d.get("high_percentile", DEFAULT_HIGH_PERCENTILE)),
                   n_sites=int(d.get("n_sites", 0)))


def subsample_pixels(img: np.ndarray, max_pixels: int = STATS_PIXELS_PER_SITE) -> np.ndarray:
    """``(C, H, W)`` -> ``(C, n)`` float32 pixels on a regular stride (deterministic), ``n <= max_pixels``."""
    flat = img.reshape(img.shape[0], -1)
    stride = max(1, int(np.ceil(flat.shape[1] / max_pixels)))
    return flat[:, ::stride].astype(np.float32)


def robust_percentiles(images: Iterable[np.ndarray], low_percentile: float = DEFAULT_LOW_PERCENTILE,
                       high_percentile: float = DEFAULT_HIGH_PERCENTILE,
                       max_pixels_per_site: int = STATS_PIXELS_PER_SITE) -> Normalisation:
    """Per-channel percentiles of the pooled pixels of ``images`` (each ``(C, H, W)``, any numeric dtype).

    Pixels of every site are pooled (not averaged per site), so the result is the percentile of the
    dataset's intensity distribution. ``high`` is forced above ``low`` (a flat channel maps to -1..1 over
    one grey level instead of dividing by zero).
    """
    if not 0 <= low_percentile < high_percentile <= 100:
        raise UserError(f"percentiles must satisfy 0 <= low < high <= 100, got {low_percentile}, {high_percentile}")
    pooled = [subsample_pixels(np.asarray(img), max_pixels_per_site) for img in images]
    if not pooled:
        raise UserError("no images to compute normalisation statistics from")
    pixels = np.concatenate(pooled, axis=1)
    low = np.percentile(pixels, low_percentile, axis=1)
    high = np.percentile(pixels, high_percentile, axis=1)
    high = np.maximum(high, low + 1.0)
    return Normalisation(low=tuple(float(v) for v in low), high=tuple(float(v) for v in high),
                         low_percentile=low_percentile, high_percentile=high_percentile, n_sites=len(pooled))


def normalise(img: np.ndarray, low, high) -> np.ndarray:
    """``(C, H, W)`` grey levels -> ``(C, H, W) float32`` in [-1, 1]: ``2 (x - low) / (high - low) - 1``, clipped.

    ``low``/``high`` are per-channel sequences of length C (grey levels).
    """
    low = np.asarray(low, dtype=np.float32).reshape(-1, *([1] * (img.ndim - 1)))
    high = np.asarray(high, dtype=np.float32).reshape(-1, *([1] * (img.ndim - 1)))
    if low.shape[0] != img.shape[0]:
        raise ValueError(f"normalise: {low.shape[0]} channel statistics for an image with {img.shape[0]} channels")
    x = (img.astype(np.float32) - low) / (high - low)
    return np.clip(2.0 * x - 1.0, -1.0, 1.0).astype(np.float32)


def denormalise(x: np.ndarray, low, high) -> np.ndarray:
    """Inverse of :func:`normalise`: ``(C, H, W)`` or ``(B, C, H, W)`` in [-1, 1] -> uint16 grey levels.

    Values are clipped to [-1, 1] first, so clipped input maps to the ``low``/``high`` grey levels.
    """
    x = np.asarray(x, dtype=np.float32)
    shape = (-1, *([1] * 2))
    low = np.asarray(low, dtype=np.float32).reshape(shape)
    high = np.asarray(high, dtype=np.float32).reshape(shape)
    grey = (np.clip(x, -1.0, 1.0) + 1.0) / 2.0 * (high - low) + low
    return np.clip(np.rint(grey), 0, UINT16_MAX).astype(np.uint16)


# ---------------------------------------------------------------------------------------------- crops
def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Centre ``size x size`` crop of a ``(..., H, W)`` array (the paper trains on 384 px centre crops).

    When ``H - size`` is odd the extra pixel is left at the bottom/right.
    """
    h, w = img.shape[-2:]
    if size > h or size > w:
        raise ImageError(f"image of {h}x{w} px is smaller than the {size} px crop")
    top, left = (h - size) // 2, (w - size) // 2
    return img[..., top:top + size, left:left + size]


def tile_origins(h: int, w: int, size: int, grid: int) -> list[tuple[int, int]]:
    """Top-left corners of the central ``grid x grid`` block of non-overlapping ``size`` tiles, row-major.

    A fixed grid (not "as many tiles as fit") gives every site the same number of crops, so ingest can
    allocate latent rows from the catalog alone, before any image is read.
    """
    if grid * size > h or grid * size > w:
        raise ImageError(f"image of {h}x{w} px is smaller than a {grid}x{grid} grid of {size} px tiles")
    oy, ox = (h - grid * size) // 2, (w - grid * size) // 2
    return [(oy + i * size, ox + j * size) for i in range(grid) for j in range(grid)]


def tiles(img: np.ndarray, size: int, grid: int) -> np.ndarray:
    """``(C, H, W)`` -> ``(grid**2, C, size, size)`` central tiles, row-major (see :func:`tile_origins`)."""
    h, w = img.shape[-2:]
    return np.stack([img[..., y:y + size, x:x + size] for y, x in tile_origins(h, w, size, grid)], axis=0)


def crops_per_site(mode: str, grid: int) -> int:
    return 1 if mode == "centre" else grid * grid


def crops_of(img: np.ndarray, mode: str, size: int, grid: int = 2) -> np.ndarray:
    """``(C, H, W)`` -> ``(n, C, size, size)``: one centre crop (``mode='centre'``) or ``grid**2`` tiles."""
    if mode == "centre":
        return centre_crop(img, size)[None]
    if mode == "tile":
        return tiles(img, size, grid)
    raise UserError(f"crop mode {mode!r} is not one of 'centre', 'tile'")


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class IngestConfig:
    """``cpldm ingest``: TIFFs -> normalised crops -> channel-group VAE latents in Zarr.

    Attributes:
        vae: a VAE in this lake (``vae/<vae>/``, e.g. ``fitted-small``), a local diffusers directory, or a
            model-hub id (``stabilityai/sdxl-vae``, the only form that is downloaded); empty -> the lake's only VAE.
        vae_subfolder: subfolder for ``from_pretrained`` (``vae`` for a full SDXL pipeline repo).
        vae_id: name of the latent cache (``latents/<vae_id>/``); empty -> derived from ``vae``.
        channel_groups: two 3-channel groups (indices into CHANNELS) sharing one channel; latents are
            concatenated in this order (group 0 -> latent channels 0-3, group 1 -> 4-7).
        subset: ``train`` = seen compounds in train batches only (what training may see), ``all`` = every site.
        crop_mode / crop_size / tile_grid: ``centre`` (one crop per site) or ``tile`` (the central
            ``tile_grid x tile_grid`` non-overlapping tiles, row-major; ``Metadata_Crop`` numbers them).
        illumination: ``auto`` applies JUMP illum functions when the catalog has ``URL_Illum*``, ``off`` never.
        low_percentile / high_percentile / stats_sites: global normalisation statistics, computed once over
            a deterministic sample of ``stats_sites`` training sites.
        rows_per_shard: latent rows per Zarr shard (a plate's block is a whole number of shards).
        read_concurrency / num_cpus_read / encode_concurrency / num_gpus / num_cpus_encode / batch_size: Ray resources.
        fuse_read_encode: read and encode in the same actors (``read_concurrency`` of them, each with
            ``num_cpus_read + num_cpus_encode`` CPUs) instead of a reader pool feeding an encoder pool, for CPU
            encoding. Measured on 2 cores: 1.10x a plain loop vs 1.08x for the pools, within the run-to-run
            spread (docs/benchmarks.md). Not with GPUs.
        seed: sampling seed (stats sample).
        max_plane_bytes: largest decoded TIFF plane accepted (bytes, read from the header before decoding);
            larger sites are rejected.
    """

    vae: str = ""
    vae_subfolder: str | None = None
    vae_id: str = field(default="", metadata=LAKE_NAME)
    channel_groups: tuple[tuple[int, ...], ...] = ((0, 1, 2), (2, 3, 4))
    subset: Literal["train", "all"] = "train"
    crop_mode: Literal["centre", "tile"] = "centre"
    crop_size: int = field(default=384, metadata=bounds(ge=8))
    tile_grid: int = field(default=2, metadata=bounds(ge=1))
    illumination: Literal["auto", "off"] = "auto"
    low_percentile: float = field(default=DEFAULT_LOW_PERCENTILE, metadata=bounds(ge=0, le=100))
    high_percentile: float = field(default=DEFAULT_HIGH_PERCENTILE, metadata=bounds(ge=0, le=100))
    stats_sites: int = field(default=64, metadata=bounds(ge=1))
    rows_per_shard: int = field(default=256, metadata=bounds(ge=1))
    read_concurrency: int = field(default=1, metadata=bounds(ge=1))
    num_cpus_read: float = 0.5
    encode_concurrency: int = field(default=1, metadata=bounds(ge=1))
    num_gpus: float = 0.0
    num_cpus_encode: float = 1.0
    batch_size: int = 16
    fuse_read_encode: bool = False
    seed: int = 0
    max_plane_bytes: int = field(default=DEFAULT_MAX_PLANE_BYTES, metadata=bounds(ge=1))

    def __post_init__(self):
        if self.crop_size % 8:
            raise ValueError(f"crop_size must be a multiple of 8 (the VAE downsamples 8x), got {self.crop_size}")
        if self.rows_per_shard < 1 or self.batch_size < 1:
            raise ValueError("rows_per_shard and batch_size must be >= 1")
        if self.fuse_read_encode and self.num_gpus:
            raise ValueError("fuse_read_encode is for CPU encoding: with num_gpus > 0 keep CPU readers feeding "
                             "GPU encoders (fuse_read_encode=false)")


INGEST_PRESETS: dict[str, IngestConfig] = {
    # CI: seconds on 2 cores
    # tiny and demo name no VAE: they use the lake's only one (what `cpldm fit-vae` made, whatever its preset)
    "tiny": IngestConfig(crop_size=64, stats_sites=16, rows_per_shard=16, batch_size=8),
    # embedded default (cpldm demo): simulated lake, small fitted VAE. 64 px crops because the demo generates
    # ~5,000 images on 2 CPU cores: decoding is ~70 ms per 64 px image there and 4x that at 128 px
    "demo": IngestConfig(crop_size=64, stats_sites=64, rows_per_shard=64, batch_size=16),
    # the paper's setting: 384 px centre crops through the SDXL VAE on GPUs
    "paper": IngestConfig(vae="stabilityai/sdxl-vae", vae_id="sdxl-vae", crop_size=384, stats_sites=512,
                          rows_per_shard=256, batch_size=32, num_gpus=1.0, encode_concurrency=4,
                          read_concurrency=16),
}
