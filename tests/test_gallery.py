"""Gallery core (composites, contrast, layout) against naive numpy references, and the condition picker."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
from PIL import Image

from cpldm_core.evaluation import gallery as g


def test_channel_limits_are_the_percentiles_of_all_pixels_of_all_images():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 60000, size=(5, 8, 8)).astype(np.uint16), rng.normal(300, 50, size=(5, 4, 6))]
    limits = g.channel_limits(images, 2.0, 98.0)
    for c in range(5):
        pixels = np.concatenate([images[0][c].ravel().astype(float), images[1][c].ravel()])
        np.testing.assert_allclose(limits[c], np.percentile(pixels, [2.0, 98.0]), rtol=1e-6)
    # a constant channel gets a non-zero span (no division by zero)
    flat = g.channel_limits([np.ones((5, 3, 3))])
    assert (flat[:, 1] > flat[:, 0]).all()


def test_composite_equals_a_per_pixel_loop():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 4000, size=(5, 6, 7)).astype(np.uint16)
    limits = np.array([[100, 3000], [0, 4000], [500, 1500], [1000, 3900], [200, 800]], np.float32)
    out = g.composite(image, limits)
    assert out.shape == (6, 7, 3) and out.dtype == np.float32
    reference = np.zeros((6, 7, 3))
    for y in range(6):
        for x in range(7):
            for k in range(3):
                total = 0.0
                for c in range(5):
                    v = (float(image[c, y, x]) - limits[c, 0]) / (limits[c, 1] - limits[c, 0])
                    total += min(1.0, max(0.0, v)) * g.CHANNEL_COLOURS[c, k]
                reference[y, x, k] = min(1.0, total)
    np.testing.assert_allclose(out, reference, atol=1e-6)
    # one channel alone shows in its own colour: DNA only -> pure blue
    dna = np.zeros((5, 2, 2), np.float32)
    dna[0] = 10.0
    np.testing.assert_allclose(g.composite(dna, np.array([[0, 10]] * 5, np.float32))[0, 0], [0, 0, 1])


def test_gallery_figure_writes_a_png_with_one_cell_per_panel_and_channel():
    rng = np.random.default_rng(2)
    panels = [g.Panel(rng.integers(0, 1000, size=(5, 16, 16)).astype(np.uint16), "a"), g.Panel(None, "missing")]
    buffer = io.BytesIO()
    limits = g.gallery_figure([("real", panels), ("model", panels[:1])], buffer, per_channel=True)
    assert limits.shape == (5, 2)
    png = Image.open(io.BytesIO(buffer.getvalue()))
    assert png.format == "PNG" and png.size[0] > png.size[1]   # 12 columns x 2 rows


def test_conditions_are_distinct_batches_and_wells_of_the_first_draws():
    from pipelines.gallery import pick_conditions

    draws = pd.DataFrame({"Metadata_Draw": range(9), "Metadata_Source": "s",
                          "Metadata_Batch": ["b1", "b2", "b1", "b1", "b3", "b2", "b4", "b5", "b2"],
                          "Metadata_Well": ["A1", "A1", "A1", "B2", "C3", "D4", "A1", "A1", "E5"]})
    got = pick_conditions(draws, n_batches=4, n_wells=2)
    # b1: draws 0 (A1) and 3 (B2; draw 2 repeats A1); b2: draws 1, 5; b3: 4; b4: 6; b5 is the fifth batch
    assert sorted(got["Metadata_Draw"]) == [0, 1, 3, 4, 5, 6]
    assert set(got["Metadata_Batch"]) == {"b1", "b2", "b3", "b4"}
