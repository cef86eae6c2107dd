"""From a DICOM image (one frame) to the array a model package's network takes.

The steps follow the grayscale and colour pipelines of DICOM PS3.4 N.2 (Pixel Transformation
Sequence), in this order:

1. decode the frame (every transfer syntax pydicom can decode, JPEG family through the
   pylibjpeg plugins), YBR converted to RGB (PS3.3 C.7.6.3.1.2);
2. grayscale: the Modality LUT or rescale slope/intercept (PS3.3 C.11.1), giving modality
   values such as Hounsfield units; then the VOI transformation (PS3.3 C.11.2): a fixed window
   from the model card, or the VOI LUT / window in the file, or the values' own range; then
   MONOCHROME1 inversion so that higher is always brighter (PS3.3 C.7.6.3.1.2);
   colour: PALETTE COLOR through its lookup tables (PS3.3 C.7.6.3.1.5), then scaled by the
   stored bit depth; converted to the card's channel count;
3. resized to the input size keeping the physical aspect ratio given by Pixel Spacing
   (PS3.3 C.7.6.2.1.1, or Imager Pixel Spacing for projection radiography, PS3.3 C.8.11.4)
   and padded, then normalised.

No TensorFlow here: this module runs in the decoding threads and in the trainer alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut

from dicom_ai_node.infer.card import InputSpec, PreprocessSpec, Window

FloatImage = npt.NDArray[np.float32]
_Float = TypeVar("_Float", bound=np.floating[Any])

#: ITU-R BT.601 luma weights, used to turn RGB into one channel.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

#: Functional groups of an enhanced multi-frame image that carry what a classic image holds at
#: the top level (PS3.3 C.7.6.16.2): rescale, window and pixel spacing per frame.
_FRAME_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence", "PixelMeasuresSequence")


def number_of_frames(ds: Dataset) -> int:
    """Number of frames in the image (PS3.3 C.7.6.6, absent means one)."""
    return int(ds.get("NumberOfFrames") or 1)


def to_model_input(
    ds: Dataset, input_spec: InputSpec, spec: PreprocessSpec, frame: int = 0
) -> FloatImage:
    """Decode frame ``frame`` (0-based) of ``ds`` into a float32 (height, width, channels) array.

    Raises ``ValueError`` (or a decoder's own exception) when the image cannot be used.
    """
    attrs = frame_attributes(ds, frame)
    pixels, meta = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, index=frame)
    photometric = str(meta.get("photometric_interpretation", ds.PhotometricInterpretation))
    depth = int(ds.get("BitsStored", 8))
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
        depth = int(ds.RedPaletteColorLookupTableDescriptor[2])  # PS3.3 C.7.6.3.1.5
        photometric = "RGB"
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = _grayscale_display(pixels, attrs, spec, photometric)[..., np.newaxis]
    elif photometric == "RGB":
        values = pixels.astype(np.float32) / np.float32(2**depth - 1)
    else:
        raise ValueError(f"unsupported Photometric Interpretation {photometric!r}")
    values = _to_channels(values, input_spec.channels)
    fitted = fit_to_input(values, input_spec, pixel_aspect(attrs), keep_aspect=spec.keep_aspect)
    return normalize(fitted, spec)


def frame_attributes(ds: Dataset, frame: int) -> Dataset:
    """The attributes that apply to one frame, as a flat dataset.

    A classic image holds them at the top level, so it is its own answer (to be read, not
    changed); an enhanced multi-frame image in the shared and per-frame functional groups
    (PS3.3 C.7.6.16), which override the top level here so that pydicom's LUT functions,
    written for the classic layout, apply to each frame.
    """
    if "SharedFunctionalGroupsSequence" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
        return ds
    flat = Dataset()
    for keyword in (
        "PhotometricInterpretation",
        "BitsStored",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "ModalityLUTSequence",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "VOILUTSequence",
        "PixelSpacing",
        "ImagerPixelSpacing",
        "PixelAspectRatio",
    ):
        if keyword in ds:
            setattr(flat, keyword, ds[keyword].value)
    groups: list[Dataset] = []
    if "SharedFunctionalGroupsSequence" in ds:
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    for group in groups:
        for sequence in _FRAME_GROUPS:
            if sequence in group and len(group[sequence].value) > 0:
                for element in group[sequence].value[0]:
                    flat[element.tag] = element
    return flat


def _grayscale_display(
    pixels: npt.NDArray[np.generic], attrs: Dataset, spec: PreprocessSpec, photometric: str
) -> FloatImage:
    """Modality LUT, VOI and MONOCHROME1 inversion: stored values to [0, 1], higher = brighter.

    In float32, which holds every modality value of a 16-bit image exactly: in float64 these
    few array operations cost about as much as the rest of the decoding together.
    """
    values = np.asarray(apply_modality_lut(pixels, attrs), dtype=np.float32)
    window = spec.window
    display: npt.NDArray[np.floating[Any]]
    if isinstance(window, Window):
        display = apply_window(values, window.center, window.width)
    elif window == "file" and "VOILUTSequence" in attrs:
        # PS3.3 C.11.2.1.1: the LUT output range is 0 .. 2**bits - 1 (third descriptor value).
        lut_bits = int(attrs.VOILUTSequence[0].LUTDescriptor[2])
        display = apply_voi_lut(values, attrs, prefer_lut=True) / float(2**lut_bits - 1)
    elif window == "file" and "WindowCenter" in attrs and "WindowWidth" in attrs:
        display = apply_window(
            values,
            _first(attrs.WindowCenter),
            _first(attrs.WindowWidth),
            str(attrs.get("VOILUTFunction", "LINEAR")),
        )
    else:
        low, high = float(values.min()), float(values.max())
        display = (values - low) / (high - low) if high > low else np.zeros_like(values)
    clipped = np.clip(display, 0.0, 1.0)
    if photometric == "MONOCHROME1" and spec.invert_monochrome1:
        clipped = 1.0 - clipped
    return clipped.astype(np.float32, copy=False)


def apply_window(
    values: npt.NDArray[_Float], center: float, width: float, function: str = "LINEAR"
) -> npt.NDArray[_Float]:
    """A VOI window onto [0, 1] (PS3.3 C.11.2.1.2.1 LINEAR, C.11.2.1.3.1 SIGMOID,
    C.11.2.1.3.2 LINEAR_EXACT), values outside the window clipped, in the values' float type."""
    function = function.upper()
    if function == "SIGMOID":
        scaled = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        scaled = (values - center) / width + 0.5
    elif width < 1:
        raise ValueError(f"Window Width {width} < 1 is not valid for a LINEAR window")
    elif width > 1:
        scaled = (values - (center - 0.5)) / (width - 1) + 0.5
    else:
        scaled = (values > center - 0.5).astype(values.dtype)
    clipped: npt.NDArray[_Float] = np.clip(scaled, 0.0, 1.0, out=scaled)
    return clipped


def pixel_aspect(attrs: Dataset) -> float:
    """Physical height / width of one pixel (PS3.3 C.7.6.2.1.1: row spacing, column spacing).

    A value that is not two positive finite numbers (VM 2, PS3.3 C.7.6.2.1.1 and C.7.6.3.1.7)
    is ignored: square pixels are assumed rather than the image refused.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "PixelAspectRatio"):
        pair = _positive_pair(attrs.get(keyword))  # PixelAspectRatio: vertical \ horizontal
        if pair is not None:
            return pair[0] / pair[1]
    return 1.0


def _positive_pair(value: object) -> tuple[float, float] | None:
    """Two positive finite numbers from a multi-valued DS or IS, else ``None``."""
    if not isinstance(value, Sequence) or isinstance(value, str | bytes) or len(value) != 2:
        return None
    try:
        first, second = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        return None
    if all(math.isfinite(v) and v > 0 for v in (first, second)):
        return first, second
    return None


def fit_to_input(
    image: FloatImage, input_spec: InputSpec, aspect: float = 1.0, *, keep_aspect: bool = True
) -> FloatImage:
    """Resize an (h, w, c) image to the input size, keeping the physical aspect ratio.

    ``aspect`` is the physical height / width of one pixel. With ``keep_aspect`` the image is
    scaled to fit and centred on zero padding; without, it is stretched to the input size.
    """
    rows, cols = image.shape[:2]
    height, width = input_spec.height, input_spec.width
    if keep_aspect:
        scale = min(height / (rows * aspect), width / cols)
        new_h = max(1, min(height, round(rows * aspect * scale)))
        new_w = max(1, min(width, round(cols * scale)))
    else:
        new_h, new_w = height, width
    if (new_h, new_w) != (rows, cols):
        channels = [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F").resize(
                    (new_w, new_h), Image.Resampling.BILINEAR
                ),
                dtype=np.float32,
            )
            for c in range(image.shape[2])
        ]
        image = np.stack(channels, axis=-1)
    if (new_h, new_w) == (height, width):
        return image.astype(np.float32, copy=False)
    out = np.zeros((height, width, image.shape[2]), dtype=np.float32)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top : top + new_h, left : left + new_w] = image
    return out


def normalize(image: FloatImage, spec: PreprocessSpec) -> FloatImage:
    """``unit`` keeps [0, 1]; ``zscore`` subtracts the image mean and divides by its std."""
    if spec.normalize == "zscore":
        std = float(image.std())
        return np.asarray((image - image.mean()) / (std if std > 0 else 1.0), dtype=np.float32)
    return image


def _to_channels(values: FloatImage, channels: int) -> FloatImage:
    """Grayscale to RGB by repetition, RGB to grayscale by BT.601 luma."""
    if values.shape[-1] == channels:
        return values
    if channels == 3:
        return np.repeat(values, 3, axis=-1)
    return (values @ _LUMA)[..., np.newaxis].astype(np.float32)


def _first(value: object) -> float:
    """The first of a multi-valued DS (e.g. several windows), as a float."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        return float(value)  # type: ignore[arg-type]
    return float(value[0])
