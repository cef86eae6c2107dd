"""Property-based tests of the code that parses what senders send: the header reader, the UID
check that guards the spool's paths, the route matcher and the image preprocessing."""

from __future__ import annotations

import copy
import math
import os
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom_ai_node.assemble import CompletedSeries
from dicom_ai_node.config import RouteSettings
from dicom_ai_node.infer.card import InputSpec, PreprocessSpec, Window
from dicom_ai_node.infer.preprocess import to_model_input
from dicom_ai_node.receive.header import InstanceHeader, UnreadableInstanceError, read_header
from dicom_ai_node.route import mismatch, plan_series
from dicom_ai_node.spool import InvalidUIDError, check_uid
from tests.support.malformed import base_ct, encode, part10

# Modest and derandomized by default, so the suite stays fast and every run tries the same
# examples; FUZZ_EXAMPLES=3000 FUZZ_RANDOM=1 for a longer, exploring run. No example database:
# failures are reported with their input, and the tree stays clean.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")),
    derandomize=os.environ.get("FUZZ_RANDOM") != "1",
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _valid_file() -> bytes:
    ds = base_ct()
    ds.PixelData = ds.PixelData[:64]  # the header is what matters; keep examples small
    return part10(encode(ds), ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID)


VALID = _valid_file()


@st.composite
def mutated(draw: st.DrawFn, original: bytes = VALID) -> bytes:
    """``original`` with a few bytes overwritten, a slice removed or inserted, or cut off."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "delete", "insert"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def _check_header(data: bytes) -> None:
    try:
        header = read_header(data, ("ImageType", "ReferencedImageSequence", "PatientName"))
    except UnreadableInstanceError as exc:
        assert str(exc)
        return
    assert isinstance(header, InstanceHeader)
    for uid in (
        header.sop_class_uid,
        header.sop_instance_uid,
        header.study_instance_uid,
        header.series_instance_uid,
    ):
        assert check_uid(uid, "UID") == uid


@FUZZ
@given(st.binary(max_size=2048))
def test_read_header_on_arbitrary_bytes(data: bytes) -> None:
    _check_header(data)


@FUZZ
@given(st.binary(max_size=512))
def test_read_header_on_a_valid_preamble_and_meta_then_arbitrary_bytes(body: bytes) -> None:
    _check_header(VALID[: VALID.index(b"\x08\x00")] + body)


@FUZZ
@given(mutated())
def test_read_header_on_mutated_files(data: bytes) -> None:
    _check_header(data)


def test_read_header_accepts_the_unmutated_file() -> None:
    assert read_header(VALID).modality == "CT"


# --- check_uid -------------------------------------------------------------------------------

_UID_ALPHABET = string.digits + "./\\:\0 -_~" + string.ascii_letters + "éø\u2024\u2215"


@FUZZ
@given(st.one_of(st.text(alphabet=_UID_ALPHABET, max_size=80), st.text(max_size=80)))
def test_check_uid_never_accepts_a_path_escape(uid: str) -> None:
    try:
        accepted = check_uid(uid, "UID")
    except InvalidUIDError:
        return
    assert accepted == uid
    assert 0 < len(uid) <= 64
    assert set(uid) <= set(string.digits + ".")
    assert uid not in (".", "..") and not uid.startswith(".") and not uid.endswith(".")
    base = Path("/spool/incoming")
    assert (base / uid / "x.dcm").resolve().parent == base / uid


@FUZZ
@given(st.lists(st.integers(0, 10**12).map(str), min_size=1, max_size=8))
def test_check_uid_accepts_dotted_numbers(parts: list[str]) -> None:
    uid = ".".join(parts)
    assume(len(uid) <= 64)
    assert check_uid(uid, "UID") == uid


# --- routing ---------------------------------------------------------------------------------

_KEYWORDS = ["Modality", "BodyPartExamined", "ImageType", "SeriesDescription", "CallingAETitle"]
_values = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.integers(),
    st.floats(allow_nan=True),
    st.lists(st.one_of(st.text(max_size=8), st.integers()), max_size=4),
)
_accepted = st.one_of(
    st.lists(st.text(max_size=8), max_size=4),
    st.text(max_size=8),
    st.sampled_from(["/^C/", "/HEAD|BRAIN/", "/.*/", "/\\d+/", "//"]),
)


@FUZZ
@given(
    where=st.dictionaries(st.sampled_from(_KEYWORDS), _accepted, max_size=3),
    attributes=st.dictionaries(st.sampled_from(_KEYWORDS), _values, max_size=5),
    calling=st.text(max_size=16),
)
def test_route_matcher_is_total_and_matches_its_own_values(
    where: dict[str, Any], attributes: dict[str, Any], calling: str
) -> None:
    rule = RouteSettings(name="r", model="m", where=where)
    series = CompletedSeries("1.2", "1.2.3", 0, "CT", calling, 1, attributes)
    why = mismatch(rule, series)
    assert why is None or (isinstance(why, str) and why)
    specs, reason = plan_series([rule], series)
    assert (len(specs) == 1) == (why is None)
    assert bool(reason) == (why is not None)
    # A rule listing every actual value of every attribute it names always matches.
    actual = {key: calling if key == "CallingAETitle" else attributes.get(key) for key in where}
    if all(value not in (None, "", []) for value in actual.values()):
        echo: dict[str, list[str] | str] = {
            key: [str(v) for v in value] if isinstance(value, list) else [str(value)]
            for key, value in actual.items()
        }
        assert mismatch(RouteSettings(name="e", model="m", where=echo), series) is None


# --- preprocessing ---------------------------------------------------------------------------

_CT = dcmread(get_testdata_file("CT_small.dcm") or "")
_INPUT = InputSpec(height=32, width=32, channels=1)
_SPECS = [
    PreprocessSpec(window=Window(center=40.0, width=80.0)),
    PreprocessSpec(window="file"),
    PreprocessSpec(window="minmax", normalize="zscore", keep_aspect=False),
]
_NUMBERS = st.one_of(
    st.integers(-(2**17), 2**17),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0, 1, -1, 65535, 2**31]),
)
_MUTATIONS: dict[str, Any] = {
    "Rows": st.integers(0, 300),
    "Columns": st.integers(0, 300),
    "BitsAllocated": st.sampled_from([0, 1, 7, 8, 12, 16, 32, 64]),
    "BitsStored": st.integers(0, 40),
    "HighBit": st.integers(0, 40),
    "PixelRepresentation": st.integers(0, 3),
    "SamplesPerPixel": st.integers(0, 4),
    "PlanarConfiguration": st.integers(0, 2),
    "PhotometricInterpretation": st.sampled_from(
        ["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "HSV", ""]
    ),
    "NumberOfFrames": st.integers(-2, 4),
    "RescaleSlope": _NUMBERS,
    "RescaleIntercept": _NUMBERS,
    "WindowCenter": _NUMBERS,
    "WindowWidth": _NUMBERS,
    "PixelSpacing": st.lists(_NUMBERS, min_size=0, max_size=3),
    "PixelAspectRatio": st.lists(st.integers(-3, 3), min_size=0, max_size=3),
    "VOILUTFunction": st.sampled_from(["LINEAR", "SIGMOID", "LINEAR_EXACT", "BOGUS"]),
    "PixelData": st.integers(0, len(_CT.PixelData) + 16),
}


def _mutate(ds: Dataset, keyword: str, value: Any) -> None:
    if value is None:
        if keyword in ds:
            delattr(ds, keyword)
    elif keyword == "PixelData":
        ds.PixelData = (ds.PixelData + b"\0" * 16)[:value]
    elif keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        setattr(ds, keyword, str(value)[:16])
    elif keyword == "PixelSpacing":
        ds.PixelSpacing = [str(v)[:16] for v in value]
    else:
        setattr(ds, keyword, value)


@FUZZ
@given(
    mutations=st.lists(st.sampled_from(sorted(_MUTATIONS)), unique=True, max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries(
            {key: st.one_of(st.none(), _MUTATIONS[key]) for key in keys}
        )
    ),
    spec=st.sampled_from(_SPECS),
)
def test_to_model_input_returns_a_finite_image_or_raises_a_clear_error(
    mutations: dict[str, Any], spec: PreprocessSpec
) -> None:
    ds = copy.deepcopy(_CT)
    for keyword, value in mutations.items():
        try:
            _mutate(ds, keyword, value)
        except (ValueError, TypeError, OverflowError):
            return  # pydicom refuses the value itself: nothing to preprocess
    try:
        image = to_model_input(ds, _INPUT, spec)
    except (ValueError, AttributeError, NotImplementedError) as exc:
        assert str(exc)
        return
    assert image.shape == (_INPUT.height, _INPUT.width, _INPUT.channels)
    assert image.dtype == np.float32
    assert np.isfinite(image).all()
    if spec.normalize == "unit":
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


@pytest.mark.parametrize("spec", _SPECS)
def test_to_model_input_of_the_unmutated_image(spec: PreprocessSpec) -> None:
    image = to_model_input(copy.deepcopy(_CT), _INPUT, spec)
    assert image.shape == (32, 32, 1) and math.isfinite(float(image.sum()))
