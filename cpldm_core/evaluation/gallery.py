"""Image gallery of an evaluation (the paper's Figure 3): pure contrast, composite and layout code.

Images are ``(5, H, W)`` grey levels in :data:`storage_schemas.columns.CHANNELS` order (DNA, ER, RNA, AGP, Mito),
uint16 or float. One figure shares one contrast per channel (:func:`channel_limits` over every image shown), so a
batch effect that brightens a channel is visible as such instead of being stretched away per panel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cpldm_core.evaluation.report import _plt
from storage_schemas.columns import CHANNELS

#: RGB colour of each channel in the composite (CHANNELS order). DNA blue, ER green, RNA cyan-ish, AGP red,
#: Mito magenta: the usual Cell Painting pseudo-colours; overlapping colours add and are clipped at 1.
CHANNEL_COLOURS = np.array([[0.0, 0.0, 1.0],     # DNA
                            [0.0, 1.0, 0.0],     # ER
                            [0.0, 0.5, 0.5],     # RNA
                            [1.0, 0.0, 0.0],     # AGP
                            [0.5, 0.0, 0.5]],    # Mito
                           dtype=np.float32)
#: Percentiles of the pixels of all images of a figure that map to black and full intensity, per channel.
LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.5


def channel_limits(images: np.ndarray | list, low: float = LOW_PERCENTILE, high: float = HIGH_PERCENTILE
                   ) -> np.ndarray:
    """``(n, 5, H, W)`` images (or a list of ``(5, H, W)`` of any sizes) -> ``(5, 2)`` float32 grey levels
    (black, white) per channel: the ``low`` / ``high`` percentiles of all their pixels."""
    stack = [np.asarray(x, dtype=np.float32) for x in images]
    if not stack:
        raise ValueError("channel_limits: no images")
    pixels = [np.concatenate([x[c].ravel() for x in stack]) for c in range(stack[0].shape[0])]
    limits = np.array([np.percentile(p, [low, high]) for p in pixels], dtype=np.float32)
    limits[:, 1] = np.maximum(limits[:, 1], limits[:, 0] + 1e-6)   # a constant channel must not divide by 0
    return limits


def scale_channels(image: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` grey levels -> ``(C, H, W)`` float32 in [0, 1]: ``(x - black) / (white - black)``, clipped."""
    x = np.asarray(image, dtype=np.float32)
    lo, hi = limits[:, 0].reshape(-1, 1, 1), limits[:, 1].reshape(-1, 1, 1)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def composite(image: np.ndarray, limits: np.ndarray, colours: np.ndarray = CHANNEL_COLOURS) -> np.ndarray:
    """``(C, H, W)`` grey levels -> ``(H, W, 3)`` float32 RGB in [0, 1]: the sum over channels of the scaled
    channel times its colour (``colours``: ``(C, 3)``), clipped at 1."""
    scaled = scale_channels(image, limits)
    rgb = np.tensordot(scaled, np.asarray(colours, dtype=np.float32), axes=([0], [0]))   # (H, W, 3)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


@dataclass
class Panel:
    """One image of a gallery: ``image`` (5, H, W) grey levels (None: nothing to show) and its caption."""

    image: np.ndarray | None
    caption: str = ""


def gallery_figure(rows: list[tuple[str, list[Panel]]], path_or_buffer, per_channel: bool = False,
                   title: str = "", limits: np.ndarray | None = None, panel_inches: float = 1.8) -> np.ndarray:
    """A grid of images: one row per (label, panels). ``per_channel=False``: one composite per panel;
    ``True``: each panel becomes 6 columns, the composite then the 5 channels in grey. Contrast: ``limits``
    (5, 2), default :func:`channel_limits` of every image shown. Writes a PNG; returns the limits used."""
    plt = _plt()
    shown = [p.image for _, panels in rows for p in panels if p.image is not None]
    limits = channel_limits(shown) if limits is None else limits
    width = max((len(panels) for _, panels in rows), default=1) * (1 + len(CHANNELS) * per_channel)
    fig, grid = plt.subplots(len(rows), width, squeeze=False,
                             figsize=(panel_inches * width + 1.2, panel_inches * len(rows) + 0.8))
    for ax in grid.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for r, (label, panels) in enumerate(rows):
        grid[r, 0].set_ylabel(label, fontsize=9)
        for k, panel in enumerate(panels):
            col = k * (1 + len(CHANNELS) * per_channel)
            if panel.image is None:
                grid[r, col].text(0.5, 0.5, "no image", ha="center", va="center", fontsize=8, color="grey")
                continue
            grid[r, col].imshow(composite(panel.image, limits), interpolation="nearest")
            grid[r, col].set_title(panel.caption, fontsize=7)
            if per_channel:
                scaled = scale_channels(panel.image, limits)
                for c, name in enumerate(CHANNELS):
                    grid[r, col + 1 + c].imshow(scaled[c], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                    if r == 0:
                        grid[r, col + 1 + c].set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path_or_buffer, format="png", dpi=80)
    plt.close(fig)
    return limits
