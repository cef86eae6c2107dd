"""Where on an image the model's evidence is: the hot region of its Grad-CAM heat map.

The region is given in the source image's pixel coordinates as PS3.3 C.18.6.1.2 defines
them for SCOORD: (column, row) pairs, (0, 0) the top left corner of the top left pixel, so
that viewers can draw it on the image (TID 1410 Image Region, PS3.16).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_ai_node.infer.preprocess import frame_attributes, pixel_aspect
from dicom_ai_node.report.render import heatmap_on_image

# The hot region: the connected pixels around the peak whose value is at least this share
# of the peak.
HOT = 0.5


def hot_region_outline(
    source: Dataset,
    frame_number: int | None,
    heatmap: npt.NDArray[np.float32] | None,
    keep_aspect: bool,
) -> npt.NDArray[np.float32]:
    """The outline of the heat map's hot region on ``source`` as a closed POLYLINE.

    The outline is the rectangle around the connected area (4-neighbourhood) that holds the
    peak and is at least ``HOT`` of it: five (column, row) points, the last equal to the
    first. Without a heat map (or a flat one) the outline is the whole image: the result
    concerns the image, but no part of it in particular.
    """
    rows, cols = int(source.Rows), int(source.Columns)
    box = (0.0, 0.0, float(cols), float(rows))
    if heatmap is not None:
        aspect = pixel_aspect(frame_attributes(source, (frame_number or 1) - 1))
        heat = heatmap_on_image(heatmap, rows, cols, aspect, keep_aspect)
        peak = float(heat.max())
        if peak > 0 and float(heat.min()) < peak:
            area = _connected(heat >= HOT * peak, np.unravel_index(int(heat.argmax()), heat.shape))
            ys, xs = np.nonzero(area)
            scale_y, scale_x = rows / heat.shape[0], cols / heat.shape[1]
            box = (
                float(xs.min()) * scale_x,
                float(ys.min()) * scale_y,
                float(xs.max() + 1) * scale_x,
                float(ys.max() + 1) * scale_y,
            )
    left, top, right, bottom = box
    return np.array(
        [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]],
        dtype=np.float32,
    )


def _connected(mask: npt.NDArray[np.bool_], seed: tuple[np.intp, ...]) -> npt.NDArray[np.bool_]:
    """The 4-connected part of ``mask`` that contains ``seed`` (grown by dilation)."""
    area = np.zeros_like(mask)
    area[seed] = True
    while True:
        grown = area.copy()
        grown[1:, :] |= area[:-1, :]
        grown[:-1, :] |= area[1:, :]
        grown[:, 1:] |= area[:, :-1]
        grown[:, :-1] |= area[:, 1:]
        grown &= mask
        if np.array_equal(grown, area):
            return area
        area = grown
