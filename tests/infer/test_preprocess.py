"""Preprocessing against values computed by hand (numpy) from pydicom's own test files."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom_ai_node.infer.card import InputSpec, PreprocessSpec, Window
from dicom_ai_node.infer.preprocess import apply_window, to_model_input


def _read(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, name
    return dcmread(path)


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 written out: below/above the window clip, linear in between."""
    low = center - 0.5 - (width - 1) / 2
    high = center - 0.5 + (width - 1) / 2
    out = ((values - (center - 0.5)) / (width - 1)) + 0.5
    return np.where(values <= low, 0.0, np.where(values > high, 1.0, out))


def test_ct_rescale_and_fixed_window_match_hand_computed_hounsfield_values():
    ds = _read("CT_small.dcm")  # 128x128, slope 1, intercept -1024
    stored = ds.pixel_array.astype(np.float64)
    hu = stored * 1.0 - 1024.0
    # Pixel (0, 0) is stored 175 -> -849 HU: air/fat, far below a soft tissue window.
    assert stored[0, 0] == 175 and hu[0, 0] == -849
    window = Window(center=40, width=400)
    out = to_model_input(ds, InputSpec(height=128, width=128), PreprocessSpec(window=window))
    assert out.shape == (128, 128, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], _linear_window(hu, 40, 400), atol=1e-6)
    assert out[0, 0, 0] == 0.0
    # A pixel inside the window: its value is (HU - 39.5) / 399 + 0.5.
    inside = np.argwhere((hu > -100) & (hu < 200))[0]
    expected = (hu[tuple(inside)] - 39.5) / 399 + 0.5
    assert out[inside[0], inside[1], 0] == pytest.approx(expected, abs=1e-6)


def test_ct_minmax_scales_hounsfield_range():
    ds = _read("CT_small.dcm")
    hu = ds.pixel_array.astype(np.float64) - 1024
    out = to_model_input(ds, InputSpec(height=128, width=128), PreprocessSpec(window="minmax"))
    np.testing.assert_allclose(out[..., 0], (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)


def test_mr_uses_the_window_in_the_file():
    ds = _read("MR_small.dcm")  # Window Center 600, Width 1600, no rescale
    out = to_model_input(ds, InputSpec(height=64, width=64), PreprocessSpec(window="file"))
    expected = _linear_window(ds.pixel_array.astype(np.float64), 600, 1600)
    np.testing.assert_allclose(out[..., 0], expected, atol=1e-6)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",  # RLE Lossless
        "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
    ],
)
def test_lossless_transfer_syntaxes_give_identical_inputs(name: str):
    spec, size = PreprocessSpec(), InputSpec(height=64, width=64)
    reference = to_model_input(_read("MR_small.dcm"), size, spec)
    np.testing.assert_array_equal(to_model_input(_read(name), size, spec), reference)


def test_monochrome1_is_inverted_so_that_higher_is_brighter():
    # No MONOCHROME1 file ships with pydicom's local test data: relabel MR_small (PS3.3
    # C.7.6.3.1.2: in MONOCHROME1 the minimum value is displayed white).
    mono2 = _read("MR_small.dcm")
    mono1 = copy.deepcopy(mono2)
    mono1.PhotometricInterpretation = "MONOCHROME1"
    size = InputSpec(height=64, width=64)
    a = to_model_input(mono2, size, PreprocessSpec())
    b = to_model_input(mono1, size, PreprocessSpec())
    np.testing.assert_allclose(b, 1.0 - a, atol=1e-6)
    kept = to_model_input(mono1, size, PreprocessSpec(invert_monochrome1=False))
    np.testing.assert_array_equal(kept, a)


def test_lossy_jpeg2000_ct_with_signed_pixels_and_file_window():
    ds = _read("693_J2KI.dcm")  # JPEG 2000 (lossy), signed, rescale -1024, window 40/100
    hu = ds.pixel_array.astype(np.float64) - 1024
    out = to_model_input(ds, InputSpec(height=512, width=512), PreprocessSpec())
    np.testing.assert_allclose(out[..., 0], _linear_window(hu, 40, 100), atol=1e-6)


def test_jpeg_baseline_ybr_is_converted_to_rgb_and_to_luma():
    ds = _read("SC_rgb_jpeg_dcmtk.dcm")  # JPEG baseline, YBR_FULL
    rgb = ds.pixel_array.astype(np.float64) / 255  # pydicom converts YBR to RGB by default
    size3 = InputSpec(height=100, width=100, channels=3)
    out3 = to_model_input(ds, size3, PreprocessSpec())
    np.testing.assert_allclose(out3, rgb, atol=1e-6)
    out1 = to_model_input(ds, InputSpec(height=100, width=100, channels=1), PreprocessSpec())
    r, g, b = rgb[50, 50]
    assert out1[50, 50, 0] == pytest.approx(0.299 * r + 0.587 * g + 0.114 * b, abs=1e-5)


def test_multiframe_selects_the_requested_frame():
    ds = _read("examples_ybr_color.dcm")  # 30 frames, JPEG baseline YBR_FULL_422, 240x320
    frames = ds.pixel_array
    spec = InputSpec(height=240, width=320, channels=3)
    for index in (0, 17):
        out = to_model_input(ds, spec, PreprocessSpec(), frame=index)
        np.testing.assert_allclose(out, frames[index] / 255.0, atol=1e-6)
    rle = _read("SC_rgb_rle_2frame.dcm")  # RLE, 2 frames of 100x100 RGB
    second = to_model_input(rle, InputSpec(height=100, width=100, channels=3), PreprocessSpec(), 1)
    np.testing.assert_allclose(second, rle.pixel_array[1] / 255.0, atol=1e-6)


def test_resize_keeps_the_physical_aspect_ratio_and_pads():
    ds = _read("MR_small.dcm")
    ds.PixelSpacing = [0.5, 0.25]  # rows 0.5 mm apart, columns 0.25 mm: twice as tall
    out = to_model_input(ds, InputSpec(height=128, width=128), PreprocessSpec())
    columns = np.flatnonzero(out[..., 0].max(axis=0) > 0)
    assert columns.min() == 32 and columns.max() == 95  # 64 columns of content, centred
    assert np.all(out[:, :32] == 0) and np.all(out[:, 96:] == 0)
    stretched = to_model_input(
        ds, InputSpec(height=128, width=128), PreprocessSpec(keep_aspect=False)
    )
    assert np.count_nonzero(stretched[:, :32]) > 0


def test_zscore_normalisation():
    ds = _read("CT_small.dcm")
    out = to_model_input(ds, InputSpec(height=96, width=96), PreprocessSpec(normalize="zscore"))
    assert out.mean() == pytest.approx(0.0, abs=1e-4) and out.std() == pytest.approx(1.0, abs=1e-3)


def test_sigmoid_and_linear_exact_windows():
    values = np.array([-100.0, 40.0, 180.0])
    sigmoid = apply_window(values, 40, 80, "SIGMOID")
    np.testing.assert_allclose(sigmoid, 1 / (1 + np.exp(-4 * (values - 40) / 80)))
    exact = apply_window(values, 40, 80, "LINEAR_EXACT")
    np.testing.assert_allclose(exact, [0.0, 0.5, 1.0])
