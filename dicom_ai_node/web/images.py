"""The Secondary Capture result as a PNG, for the dashboard and API clients."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.pixels.processing import apply_voi_lut


def dicom_to_png(path: Path) -> bytes:
    """Render the first frame of the image in ``path`` as PNG bytes.

    RGB images (the node's Secondary Captures) are written as they are; grayscale ones are
    windowed with their VOI LUT or window, scaled to 8 bits, and inverted when MONOCHROME1.
    Raises ``ValueError`` when the file has no pixel data.
    """
    ds = dcmread(path)
    if "PixelData" not in ds:
        raise ValueError(f"{path.name} has no pixel data")
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if ds.SamplesPerPixel == 3:
        image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    else:
        values = apply_voi_lut(pixels, ds).astype(np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low or 1.0) * 255.0
        if ds.PhotometricInterpretation == "MONOCHROME1":
            scaled = 255.0 - scaled
        image = Image.fromarray(scaled.astype(np.uint8), "L")
    buffer = BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
