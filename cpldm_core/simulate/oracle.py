"""The simulator as a perfect generator p(O | T, C): render any compound under any confounders of a world.

:func:`render_condition` is the one place where a World's causal mechanisms meet the pixel renderer: the
compound's effect under the condition (T->P with effect modification C x T and the density interaction
C->P x T), the condition's cells (C->P: density incl. plate edge and gradient, cell size) and optics (C->O:
gains incl. plate edge and gradient, vignetting, blur, background, noise). The simulator renders every site
of its lake through it (:func:`render_world_site`), so the oracle renders the same image as the simulator
for the same (compound, source, batch, well, random stream) by construction.
"""
from __future__ import annotations

import numpy as np

from cpldm_core.errors import UserError
from cpldm_core.simulate.render import render_site
from cpldm_core.simulate.world import World, stream


def render_condition(world: World, compound: str, source: str, batch: str, well: str,
                     rng: np.random.Generator, image_size: int | None = None) -> np.ndarray:
    """Render one site of ``compound`` under the confounders (``source``, ``batch``, ``well``), fresh cells.

    Args:
        world: the simulated world (:func:`cpldm_core.simulate.world.build_world` or
            ``pipelines.simulate.load_world``).
        compound: JCP2022 id of one of the world's compounds (DMSO ``JCP2022_033924`` allowed).
        source, batch: a (source, batch) pair of the world (``source_1``, ``2021_04_26_Batch1``).
        well: any position of the world's plate format (``B07``), used by the world or not: its row and column
            set the plate-edge effects and the within-plate gradients.
        rng: the random stream that draws the cells and the noise (same stream -> same pixels).
        image_size: field side in pixels; ``None`` = the world's. Other sizes keep the magnification
            (``cell_diameter_px``) and the cell density per pixel, i.e. a larger or smaller camera field.
    Returns:
        (5, H, W) uint16 image, channel order (DNA, ER, RNA, AGP, Mito), the representation the simulator
        writes to its TIFFs (H = W = image size).
    Raises:
        UserError: unknown compound, (source, batch) not in the world, or a well off the plate.
    """
    cfg = world.config
    index = world.compound_index(compound)
    world.confounder_row(source, batch)          # fail early, naming the pair
    row, col = world.well_position(well)
    size = cfg.image_size if image_size is None else int(image_size)
    if size < 16:
        raise UserError(f"image_size must be >= 16 px, got {image_size}")
    return render_site(
        rng, world.treatment_effect(index, source, batch, row, col), image_size=size,
        cell_diameter_px=cfg.cell_diameter_px, cells_per_site=cfg.cells_per_site * (size / cfg.image_size) ** 2,
        cell_variability=cfg.cell_variability, photons_per_unit=cfg.photons_per_unit,
        **world.render_params(source, batch, row, col))


def site_stream(world: World, plate: str, well: str, site: int) -> np.random.Generator:
    """The random stream of a simulated site, keyed by (seed, plate, well, site): any site can be rendered
    alone, in any process, in any order, with the same pixels."""
    return stream(world.config.seed, "site", plate, well, site)


def render_world_site(world: World, well, site: int) -> np.ndarray:
    """Render site ``site`` (1-based) of one row of ``world.wells`` (its compound and confounders).

    Returns:
        (5, image_size, image_size) uint16, as :func:`render_condition`.
    """
    return render_condition(world, well.Metadata_JCP2022, well.Metadata_Source, well.Metadata_Batch,
                            well.Metadata_Well, site_stream(world, well.Metadata_Plate, well.Metadata_Well, site))
