"""Pixels for the Secondary Capture: the source image as a viewer shows it, the heat map
blended over it, and the result burned in as text.

Grey levels follow the grayscale pipeline of PS3.3 C.11 (Modality LUT, then the VOI LUT
or window in the file, then MONOCHROME1 inverted), as the infer stage implements it; the
result is 8-bit RGB, the only colour depth highdicom's SC image accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from dicom_ai_node.infer.card import InputSpec, PreprocessSpec
from dicom_ai_node.infer.preprocess import frame_attributes, pixel_aspect, to_model_input

Grey = npt.NDArray[np.float32]
RGB = npt.NDArray[np.uint8]
Lines = Sequence[tuple[str, tuple[int, int, int]]]

# Where the result text goes: in a band of its own above or below the image, or over the
# image's top left corner. Viewers draw their own text in the corners and at the edges of
# the viewport (OHIF v3: patient and study top left and right, series, window and zoom
# bottom left and right), over whatever the image has there; a band keeps ours clear of
# the image and, centred, clear of the corners. "below" is the default: the image first,
# the result as its caption, and nothing at the top where OHIF puts its cine controls.
ScLayout = Literal["below", "above", "overlay"]
SC_LAYOUTS: tuple[ScLayout, ...] = ("below", "above", "overlay")
DEFAULT_SC_LAYOUT: ScLayout = "below"

# Rendered images get a long side in this range: small sources are enlarged so burned-in
# text stays legible, very large ones reduced to keep the object small.
MIN_SIDE, MAX_SIDE = 512, 2048
# Heat map values below LOW are not drawn; opacity rises to MAX_ALPHA at HIGH and above.
LOW, HIGH, MAX_ALPHA = 0.3, 0.7, 0.5
# Display: the window in the file (else the image's range), MONOCHROME1 inverted, [0, 1].
_DISPLAY = PreprocessSpec(window="file", invert_monochrome1=True, keep_aspect=True)


def output_size(rows: int, cols: int, aspect: float) -> tuple[int, int]:
    """(rows, cols) of the rendering: physical aspect kept (``aspect`` is the height /
    width of one source pixel), long side within MIN_SIDE..MAX_SIDE."""
    height, width = rows * aspect, float(cols)
    scale = min(max(height, width, MIN_SIDE), MAX_SIDE) / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def heatmap_on_image(
    heatmap: npt.NDArray[np.float32], rows: int, cols: int, aspect: float, keep_aspect: bool
) -> npt.NDArray[np.float32]:
    """The part of the heat map that covers the source image, as a (rows, cols) array.

    The heat map has the model input's size; the inverse of
    :func:`dicom_ai_node.infer.preprocess.fit_to_input`, which with ``keep_aspect`` scales
    the source (``rows`` x ``cols`` pixels of physical ``aspect``) to fit and centres it on
    padding, cuts the padding off.
    """
    height, width = heatmap.shape
    if keep_aspect:
        scale = min(height / (rows * aspect), width / cols)
        inner_h = max(1, min(height, round(rows * aspect * scale)))
        inner_w = max(1, min(width, round(cols * scale)))
        top, left = (height - inner_h) // 2, (width - inner_w) // 2
        heatmap = heatmap[top : top + inner_h, left : left + inner_w]
    return np.clip(heatmap, 0.0, 1.0).astype(np.float32)


def blend(grey: Grey, heat: Grey | None) -> RGB:
    """Grey image with a jet-like colour map blended where the heat map is significant."""
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if heat is not None:
        colour = np.stack(
            [np.clip(1.5 - np.abs(4 * heat - k), 0.0, 1.0) for k in (3, 2, 1)], axis=-1
        )
        alpha = (MAX_ALPHA * np.clip((heat - LOW) / (HIGH - LOW), 0.0, 1.0))[..., None]
        rgb = (1 - alpha) * rgb + alpha * colour
    return np.round(rgb * 255).astype(np.uint8)


def burn_in(rgb: RGB, lines: Lines, layout: ScLayout = DEFAULT_SC_LAYOUT) -> RGB:
    """Draw text lines (text, colour) as ``layout`` says: centred on a black band added
    above or below the image, or top left on a dark box over it ("overlay"). Text height
    is ~3.5% of the image's long side, reduced if a line would not fit the width."""
    rows, cols = rgb.shape[:2]
    size = max(12, round(0.035 * max(rows, cols)))
    margin = max(4, size // 3)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = ImageFont.load_default(size=size)
    widest = max(measure.textlength(text, font=font) for text, _ in lines)
    if widest > cols - 4 * margin:
        size = max(8, int(size * (cols - 4 * margin) / widest))
        font = ImageFont.load_default(size=size)
        widest = max(measure.textlength(text, font=font) for text, _ in lines)
    step = round(size * 1.25)
    height = 2 * margin + step * len(lines)
    if layout == "overlay":
        image = Image.fromarray(rgb)
        draw = ImageDraw.Draw(image, "RGBA")
        draw.rectangle((margin, margin, 3 * margin + widest, height), fill=(0, 0, 0, 170))
        for i, (text, colour) in enumerate(lines):
            draw.text((2 * margin, 1.5 * margin + i * step), text, font=font, fill=colour)
        return np.asarray(image, dtype=np.uint8)
    band = Image.new("RGB", (cols, height))
    draw = ImageDraw.Draw(band)
    for i, (text, colour) in enumerate(lines):
        left = (cols - draw.textlength(text, font=font)) / 2
        draw.text((left, margin + i * step), text, font=font, fill=colour)
    parts = [rgb, np.asarray(band, dtype=np.uint8)]
    return np.concatenate(parts if layout == "below" else parts[::-1], axis=0)


def render(
    source: Dataset,
    frame_number: int | None,
    heatmap: npt.NDArray[np.float32] | None,
    lines: Lines,
    keep_aspect: bool,
    layout: ScLayout = DEFAULT_SC_LAYOUT,
) -> RGB:
    """The complete Secondary Capture pixels: grey image, heat map, text (placed as
    ``layout`` says, see :func:`burn_in`).

    The grey image comes from the infer stage's own pipeline with the file's window
    (:func:`~dicom_ai_node.infer.preprocess.to_model_input`), so what is shown is what the
    model was given, only larger and at the display window.
    """
    frame = (frame_number or 1) - 1
    rows, cols = int(source.Rows), int(source.Columns)
    aspect = pixel_aspect(frame_attributes(source, frame))
    out_rows, out_cols = output_size(rows, cols, aspect)
    grey = to_model_input(
        source, InputSpec(height=out_rows, width=out_cols, channels=1), _DISPLAY, frame
    )[..., 0]
    heat = None
    if heatmap is not None:
        heat = _resize(
            heatmap_on_image(heatmap, rows, cols, aspect, keep_aspect), out_rows, out_cols
        )
    return burn_in(blend(grey, heat), lines, layout)


def _resize(values: Grey, rows: int, cols: int) -> Grey:
    if values.shape == (rows, cols):
        return values
    image = Image.fromarray(values.astype(np.float32))
    return np.asarray(image.resize((cols, rows), Image.Resampling.BILINEAR), dtype=np.float32)
