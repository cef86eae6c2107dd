"""Reading the few header attributes the node needs from a received instance.

Only the header is parsed (``stop_before_pixels``); pixel data is never decoded on receipt.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from dicom_ai_node.spool import InvalidUIDError, check_uid

# Attributes kept per series for routing (PS3.3 C.7.3.1 General Series, C.7.6.1 General
# Image, C.12.1 SOP Common...); a route may name others, which are then added.
ROUTING_KEYWORDS = (
    "Modality",
    "BodyPartExamined",
    "SOPClassUID",
    "SeriesDescription",
    "StudyDescription",
    "ProtocolName",
    "ImageType",
    "ViewPosition",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SliceThickness",
    "ImagesInAcquisition",
)


_IDENTIFYING = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "InstanceNumber",
    "PatientID",
    "AccessionNumber",
    "StudyDate",
)


class UnreadableInstanceError(ValueError):
    """A data set the node cannot use; the message says why (sent back as Error Comment)."""


@dataclass(frozen=True)
class InstanceHeader:
    """The identifying and routing attributes of one instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    instance_number: int | None = None
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_description: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def modality(self) -> str:
        return str(self.attributes.get("Modality", ""))


def _plain(value: Any) -> Any:
    """A JSON-friendly form of an element value (strings, numbers, lists of them)."""
    if isinstance(value, MultiValue | list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, int | float | str):
        return value if not isinstance(value, str) else value.strip()
    return str(value).strip()


def _text(values: dict[str, Any], keyword: str) -> str:
    value = values.get(keyword)
    return "" if value is None else str(value).strip()


@functools.cache
def _wanted_tags(extra_keywords: tuple[str, ...]) -> list[BaseTag]:
    """The tags :func:`read_header` keeps, resolved once rather than for every instance."""
    return [Tag(keyword) for keyword in (*_IDENTIFYING, *ROUTING_KEYWORDS, *extra_keywords)]


def _values(ds: Dataset) -> dict[str, Any]:
    """Each element's value by keyword, in one pass; a value that cannot be decoded (bad VR,
    unknown character set) is left out, as if absent."""
    values: dict[str, Any] = {}
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset converts every element)
        try:
            element = ds[tag]
        except Exception:
            continue
        values[element.keyword] = element.value
    return values


def read_header(
    encoded: bytes, extra_keywords: tuple[str, ...] = (), *, transfer_syntax_uid: str = ""
) -> InstanceHeader:
    """Parse the header of a Part 10 byte stream (preamble, file meta, data set).

    Raises :class:`UnreadableInstanceError` when the stream cannot be parsed or lacks a
    valid SOP Class, SOP Instance, Study or Series Instance UID (PS3.3 C.12.1, C.7.2.1,
    C.7.3.1: all Type 1).
    """
    try:
        # Only the attributes used here are kept: cheaper than a full header, and the
        # handler runs for every instance received.
        ds = dcmread(
            BytesIO(encoded), stop_before_pixels=True, specific_tags=_wanted_tags(extra_keywords)
        )
        values = _values(ds)
        uids = {
            name: str(values.get(name) or "").strip().rstrip("\0")
            for name in (
                "SOPClassUID",
                "SOPInstanceUID",
                "StudyInstanceUID",
                "SeriesInstanceUID",
            )
        }
    except Exception as exc:
        # pydicom raises whatever a malformed stream leads it to (struct.error, EOFError,
        # IndexError, UnicodeDecodeError, NotImplementedError...): all mean "cannot parse".
        raise UnreadableInstanceError(
            f"cannot parse the data set: {type(exc).__name__}: {exc}"
        ) from exc
    for name, value in uids.items():
        if not value:
            raise UnreadableInstanceError(f"{name} is missing")
        try:
            check_uid(value, name)
        except InvalidUIDError as exc:
            raise UnreadableInstanceError(str(exc)) from exc
    attributes: dict[str, Any] = {}
    for keyword in ROUTING_KEYWORDS + extra_keywords:
        found = values.get(keyword)
        if found is not None and found != "":
            attributes[keyword] = _plain(found)
    number = _text(values, "InstanceNumber")
    try:
        instance_number = int(float(number)) if number else None
    except ValueError:
        instance_number = None
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=transfer_syntax_uid or str(ds.file_meta.get("TransferSyntaxUID", "")),
        instance_number=instance_number,
        patient_id=_text(values, "PatientID")[:64],
        accession_number=_text(values, "AccessionNumber")[:64],
        study_date=_text(values, "StudyDate")[:8],
        study_description=_text(values, "StudyDescription")[:64],
        attributes=attributes,
    )
