"""The hot region of a heat map, outlined in the source image's pixel coordinates."""

from __future__ import annotations

import numpy as np

from dicom_ai_node.report.region import hot_region_outline


def blob(center: tuple[float, float], sigma: float) -> np.ndarray:
    """A 64 x 64 Gaussian heat map, peak 1 at ``center`` (row, column fractions)."""
    y, x = np.mgrid[0:64, 0:64] / 63
    heat: np.ndarray = np.exp(-((y - center[0]) ** 2 + (x - center[1]) ** 2) / (2 * sigma**2))
    return heat.astype(np.float32)


def test_outline_surrounds_the_peak_in_source_pixels(ct_series) -> None:
    source = ct_series[0]  # 96 x 96, the heat map 64 x 64
    outline = hot_region_outline(source, None, blob(center=(0.4, 0.6), sigma=0.08), True)
    assert outline.shape == (5, 2) and (outline[0] == outline[-1]).all()
    (left, top), (right, bottom) = outline.min(axis=0), outline.max(axis=0)
    peak_col, peak_row = 0.6 * 96, 0.4 * 96
    assert left < peak_col < right and top < peak_row < bottom
    # half the peak of a Gaussian of sigma 0.08: about 2.35 sigma wide, 18 source pixels
    assert 14 <= right - left <= 24 and 14 <= bottom - top <= 24


def test_no_heat_map_outlines_the_whole_image(ct_series) -> None:
    outline = hot_region_outline(ct_series[0], None, None, True)
    assert outline.min(axis=0).tolist() == [0, 0] and outline.max(axis=0).tolist() == [96, 96]
    flat = np.ones((64, 64), dtype=np.float32)
    assert (hot_region_outline(ct_series[0], None, flat, True) == outline).all()


def test_only_the_blob_holding_the_peak(ct_series) -> None:
    heat = np.maximum(blob(center=(0.2, 0.2), sigma=0.05), 0.9 * blob((0.8, 0.8), 0.05))
    right, bottom = hot_region_outline(ct_series[0], None, heat, True)[2]
    assert right < 48 and bottom < 48  # the second, weaker blob is not in the box
