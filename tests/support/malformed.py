"""A corpus of malformed DICOM instances, as the raw Part 10 bytes a sender would transmit.

Each case is a file: preamble, a valid file meta group (PS3.10 7.1) naming the SOP Class,
SOP Instance and transfer syntax the sender proposes, then a data set that is broken in one
way. Sent with pynetdicom's chunked mode (``_config.STORE_SEND_CHUNKED_DATASET``) the data set
goes on the wire byte for byte, without pydicom decoding or re-encoding it first.

Every case lives in a series of its own (except the ``mixed_*`` cases, which share one series
with a good image), so that the job a stored case produces can be checked on its own. The
good base image is pydicom's ``CT_small.dcm`` labelled as a head CT, which the shipped
``head-ct`` route sends to the head CT demo model.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComprehensiveSRStorage,
    CTImageStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    generate_uid,
)


@dataclass(frozen=True)
class Case:
    """One malformed instance: what is wrong with it, its bytes, and what the node should do.

    ``status`` is the C-STORE status expected (PS3.4 B.2.3); ``job`` the end state of the job
    for its series when the node stores it (``None`` when it is refused), ``skipped`` whether
    the job must record that the image was skipped. ``sender`` is ``pynetdicom`` (raw bytes)
    or ``storescu`` (DCMTK reads the file and sends it).
    """

    name: str
    what: str
    data: bytes
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    study: str
    series: str
    status: int
    job: str | None
    skipped: bool = False
    sender: str = "pynetdicom"


def base_ct(study: str | None = None, series: str | None = None) -> Dataset:
    """A good, small head CT image (128 x 128, 16 bits) with fresh UIDs."""
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = dcmread(path)
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.BodyPartExamined = "HEAD"
    ds.Modality = "CT"
    return ds


def encode(ds: Dataset, *, implicit: bool = False) -> bytes:
    """The data set encoded in little endian, explicit (or implicit) VR, without file meta."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return bytes(fp.getvalue())


def part10(body: bytes, sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and a valid file meta group (PS3.10 7.1), then ``body`` as is."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return bytes(fp.getvalue()) + body


def element(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element (PS3.5 7.1.2), with ``length`` possibly lying."""
    size = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, size) + value
    return struct.pack("<HH2sH", group, elem, vr, size) + value


def _split(body: bytes, tag: tuple[int, int]) -> tuple[bytes, bytes]:
    """``body`` cut just before the element ``tag`` (explicit VR little endian)."""
    marker = struct.pack("<HH", *tag)
    at = body.index(marker)
    return body[:at], body[at:]


def _case(
    name: str,
    what: str,
    ds: Dataset,
    body: bytes | None = None,
    *,
    status: int = 0x0000,
    job: str | None = "failed",
    skipped: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    sop_class: str | None = None,
    sop_instance: str | None = None,
    sender: str = "pynetdicom",
) -> Case:
    sop_class = sop_class or str(ds.get("SOPClassUID", CTImageStorage))
    sop_instance = sop_instance or str(ds.get("SOPInstanceUID", "") or generate_uid())
    data = part10(encode(ds) if body is None else body, sop_class, sop_instance, transfer_syntax)
    return Case(
        name=name,
        what=what,
        data=data,
        sop_class=sop_class,
        sop_instance=sop_instance,
        transfer_syntax=transfer_syntax,
        study=str(ds.get("StudyInstanceUID", "")),
        series=str(ds.get("SeriesInstanceUID", "")),
        status=status,
        job=job if status == 0x0000 else None,
        skipped=skipped,
        sender=sender,
    )


def _pdf(study: str | None = None, series: str | None = None) -> Dataset:
    """An Encapsulated PDF (PS3.3 A.45.1), modality DOC: a document, not an image."""
    ds = Dataset()
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.Modality = "DOC"
    ds.PatientName = "Malformed^PDF"
    ds.PatientID = "MAL-PDF"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    return ds


def truncated_header() -> Case:
    ds = base_ct()
    return _case(
        "truncated_header",
        "file cut off 300 bytes into the data set, before the study and series UIDs",
        ds,
        encode(ds)[:300],
        status=0xC000,
    )


def truncated_pixel_data() -> Case:
    ds = base_ct()
    return _case(
        "truncated_pixel_data",
        "file cut off 10000 bytes before the end of Pixel Data (the length says more)",
        ds,
        encode(ds)[:-10000],
    )


def overlong_element_length() -> Case:
    ds = base_ct()
    head, tail = _split(encode(ds), (0x0010, 0x0010))
    name = b"Long^Length "
    body = head + element(0x0010, 0x0010, b"PN", name, length=len(name) + 40) + tail[20:]
    return _case(
        "overlong_element_length",
        "Patient's Name length 40 bytes longer than its value: swallows the next elements",
        ds,
        body,
        job="done",
    )


def odd_length_us() -> Case:
    ds = base_ct()
    head, tail = _split(encode(ds), (0x0028, 0x0010))
    body = head + element(0x0028, 0x0010, b"US", b"\x80\x00\x00") + tail[10:]
    return _case(
        "odd_length_us",
        "Rows (US, PS3.5 6.2: 2 bytes) sent with a length of 3",
        ds,
        body,
    )


def invalid_vr() -> Case:
    ds = base_ct()
    head, tail = _split(encode(ds), (0x0010, 0x0020))
    body = head + element(0x0010, 0x0020, b"ZZ", b"MAL-VR") + tail[8 + len(ds.PatientID) :]
    return _case(
        "invalid_vr",
        "Patient ID with VR 'ZZ', which PS3.5 6.2 does not define",
        ds,
        body,
        job="done",
    )


def missing_pixel_data() -> Case:
    ds = base_ct()
    del ds.PixelData
    return _case("missing_pixel_data", "an image without Pixel Data (7FE0,0010)", ds)


def missing_rows() -> Case:
    ds = base_ct()
    del ds.Rows
    return _case("missing_rows", "an image without Rows (0028,0010), Type 1 in PS3.3 C.7.6.3", ds)


def missing_sop_instance_uid() -> Case:
    ds = base_ct()
    sop = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    return _case(
        "missing_sop_instance_uid",
        "no SOP Instance UID in the data set (Type 1, PS3.3 C.12.1)",
        ds,
        sop_instance=sop,
        status=0xC000,
    )


def short_pixel_data() -> Case:
    ds = base_ct()
    ds.PixelData = ds.PixelData[:1000]
    return _case(
        "short_pixel_data",
        "Pixel Data of 1000 bytes for 128 x 128 x 16 bits (32768 expected)",
        ds,
    )


def absurd_dimensions() -> Case:
    ds = base_ct()
    ds.Rows = 65535
    ds.Columns = 65535
    ds.NumberOfFrames = 10**6
    return _case(
        "absurd_dimensions",
        "Rows = Columns = 65535, Number of Frames = 10^6, 32 KiB of pixel data",
        ds,
    )


def lying_jpeg2000() -> Case:
    ds = base_ct()
    return _case(
        "lying_jpeg2000",
        "transfer syntax JPEG 2000 lossless, but the pixel data is native (not encapsulated)",
        ds,
        transfer_syntax=JPEG2000Lossless,
    )


def lying_explicit_vr() -> Case:
    ds = base_ct()
    return _case(
        "lying_explicit_vr",
        "transfer syntax explicit VR little endian, data set encoded in implicit VR",
        ds,
        encode(ds, implicit=True),
        job="done",
    )


def sr_on_ct_route() -> Case:
    ds = Dataset()
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"  # lies, so that the head CT route takes it
    ds.BodyPartExamined = "HEAD"
    ds.ValueType = "CONTAINER"
    return _case(
        "sr_on_ct_route",
        "a Comprehensive SR claiming Modality CT, Body Part HEAD: matches the CT route",
        ds,
    )


def pdf_unrouted() -> Case:
    return _case(
        "pdf_unrouted",
        "an Encapsulated PDF (modality DOC), by storescu: no route matches it",
        _pdf(),
        job="skipped",
        sender="storescu",
    )


def _charset(name: str, what: str, terms: str | list[str], patient: bytes) -> Case:
    ds = base_ct()
    ds.SpecificCharacterSet = terms
    head, tail = _split(encode(ds), (0x0010, 0x0010))
    value = patient + (b" " if len(patient) % 2 else b"")
    old = 8 + len(str(ds.PatientName)) + len(str(ds.PatientName)) % 2
    body = head + element(0x0010, 0x0010, b"PN", value) + tail[old:]
    return _case(name, what, ds, body, job="done", sender="storescu")


def charset_iso2022_ir87() -> Case:
    return _charset(
        "charset_iso2022_ir87",
        "Japanese name in ISO 2022 IR 87 (PS3.5 6.1.2.5.3), by storescu",
        ["", "ISO 2022 IR 87"],
        b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B",
    )


def charset_unknown_term() -> Case:
    return _charset(
        "charset_unknown_term",
        "Specific Character Set 'ISO_IR 999', which PS3.3 C.12.1.1.2 does not define",
        "ISO_IR 999",
        b"Unknown^Charset",
    )


def charset_invalid_utf8() -> Case:
    return _charset(
        "charset_invalid_utf8",
        "ISO_IR 192 (UTF-8) declared, Patient's Name holds bytes that are not UTF-8",
        "ISO_IR 192",
        b"Bad\xff\xfe^Utf\xc3",
    )


def uid_with_path() -> Case:
    ds = base_ct(study="1.2.3/../../../../tmp")
    return _case(
        "uid_with_path",
        "Study Instance UID '1.2.3/../../../../tmp' (PS3.5 9.1: digits and dots only)",
        ds,
        status=0xC000,
    )


def uid_too_long() -> Case:
    ds = base_ct(series="1." + "2" * 70)
    return _case(
        "uid_too_long",
        "Series Instance UID of 72 characters (PS3.5 9.1: 64 at most)",
        ds,
        status=0xC000,
    )


def empty_data_set() -> Case:
    ds = Dataset()
    return _case(
        "empty_data_set",
        "file meta only: the data set is empty",
        ds,
        b"",
        sop_class=CTImageStorage,
        status=0xC000,
    )


def garbage() -> Case:
    ds = Dataset()
    body = bytes((i * 37 + 11) % 256 for i in range(4096))
    return _case(
        "garbage",
        "4 KiB of bytes that are no DICOM encoding",
        ds,
        body,
        sop_class=CTImageStorage,
        status=0xC000,
    )


def huge_element_length() -> Case:
    ds = base_ct()
    head, _ = _split(encode(ds), (0x0010, 0x0010))
    body = head + element(0x0010, 0x0010, b"UT", b"abc", length=0xFFFFFFF0)
    return _case(
        "huge_element_length",
        "an element claiming 0xFFFFFFF0 bytes, before the study and series UIDs",
        ds,
        body,
        status=0xC000,
    )


def sop_class_mismatch() -> Case:
    ds = base_ct()
    return _case(
        "sop_class_mismatch",
        "request says MR Image Storage, the data set says CT Image Storage",
        ds,
        sop_class=MRImageStorage,
        status=0xA900,
    )


def sop_instance_mismatch() -> Case:
    ds = base_ct()
    return _case(
        "sop_instance_mismatch",
        "Affected SOP Instance UID of the request differs from the data set's",
        ds,
        sop_instance=generate_uid(),
        status=0xC000,
    )


def mixed_series() -> list[Case]:
    """A good image, a PDF and a short-pixel image in one head CT series: the job is done
    from the good image and records why the other two were skipped."""
    good = base_ct()
    study, series = good.StudyInstanceUID, good.SeriesInstanceUID
    short = base_ct(study, series)
    short.PixelData = short.PixelData[:2000]
    pdf = _pdf(study, series)
    pdf.Modality = "CT"
    pdf.BodyPartExamined = "HEAD"
    return [
        _case("mixed_good", "the good image of a series with two bad ones", good, job="done"),
        _case(
            "mixed_pdf",
            "a PDF in a head CT series",
            pdf,
            job="done",
            skipped=True,
        ),
        _case(
            "mixed_short_pixel_data",
            "an image with short Pixel Data in the same series",
            short,
            job="done",
            skipped=True,
        ),
    ]


SINGLE_CASES: tuple[Callable[[], Case], ...] = (
    truncated_header,
    truncated_pixel_data,
    overlong_element_length,
    odd_length_us,
    invalid_vr,
    missing_pixel_data,
    missing_rows,
    missing_sop_instance_uid,
    short_pixel_data,
    absurd_dimensions,
    lying_jpeg2000,
    lying_explicit_vr,
    sr_on_ct_route,
    pdf_unrouted,
    charset_iso2022_ir87,
    charset_unknown_term,
    charset_invalid_utf8,
    uid_with_path,
    uid_too_long,
    empty_data_set,
    garbage,
    huge_element_length,
    sop_class_mismatch,
    sop_instance_mismatch,
)


def corpus() -> list[Case]:
    """Every malformed case, freshly generated (new UIDs each call)."""
    return [make() for make in SINGLE_CASES] + mixed_series()


def dataset_of(case: Case) -> Dataset:
    """The case's file read back leniently (for tests that need a Dataset, not bytes)."""
    return dcmread(BytesIO(case.data), force=True)
