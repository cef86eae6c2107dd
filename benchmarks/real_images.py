"""The node on 16 real chest radiographs: a check of the machinery, not of accuracy.

Usage: ``make real-data`` (downloads the two PyPI packages into ``var/real-data``), then
``.venv/bin/python benchmarks/real_images.py var/real-data``.

The images are the 16 of ``val/`` in PyPI ``pneumonia-model-package`` 0.3.0: 8 NORMAL and 8
PNEUMONIA paediatric chest radiographs from Kermany et al. 2018, "Labeled Optical Coherence
Tomography (OCT) and Chest X-Ray Images for Classification", Mendeley Data v2,
doi:10.17632/rscbjbr9sj.2, licensed CC BY 4.0. They are never committed; this script writes:

- ``jpeg/normal``, ``jpeg/opacity``: the JPEGs by class (pneumonia as the chest model's
  "opacity" label), for ``dicom-ai-node evaluate``;
- ``dicom/normal``, ``dicom/opacity``: each as a CR image (MONOCHROME2, 8 bits, one study per
  image; the patient with two images keeps one Patient ID), for ``evaluate`` per series and
  for the whole pipeline, which ``--pipeline`` runs: a node in this process with the shipped
  chest route, storescu of each study, and the label of each job (SR and SC in its outbox).

Pneumonia images are wider (aspect about 1.5 against 1.24): the node's preprocessing pads to
square (``keep_aspect``), so the shape of the image does not leak the label.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

VAL = "pneumonia_model_package/datasets/pneumonia-data/val/"
ATTRIBUTION = (
    "Kermany D, Zhang K, Goldbaum M (2018), Labeled Optical Coherence Tomography (OCT) and "
    "Chest X-Ray Images for Classification, Mendeley Data v2, doi:10.17632/rscbjbr9sj.2, "
    "CC BY 4.0; as shipped in PyPI pneumonia-model-package 0.3.0"
)


def extract(root: Path) -> list[tuple[str, Path]]:
    """The 16 JPEGs into ``root/jpeg/<label>/``, as (label, path)."""
    (wheel,) = root.glob("pneumonia_model_package-0.3.0-*.whl")
    found = []
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(n for n in archive.namelist() if n.startswith(VAL)):
            label = "normal" if Path(name).name.startswith("NORMAL") else "opacity"
            target = root / "jpeg" / label / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
            found.append((label, target))
    (root / "ATTRIBUTION.txt").write_text(ATTRIBUTION + "\n")
    return found


def patient_of(path: Path) -> str:
    """The patient in a file name: ``person1946_bacteria_4874`` -> ``person1946``."""
    match = re.match(r"(person\d+|NORMAL2-IM-\d+)", path.stem)
    return match.group(1) if match else path.stem


def to_dicom(label: str, jpeg: Path, out: Path) -> Path:
    """A CR instance (PS3.3 A.2) of a JPEG's grey levels, in a study of its own."""
    with Image.open(jpeg) as picture:
        pixels = np.asarray(picture.convert("L"), dtype=np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[jpeg.name, "instance"])
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = f"{patient_of(jpeg)}^"  # one component: a trailing caret (PS3.5 6.2.1.2)
    ds.PatientID = patient_of(jpeg)
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[jpeg.name, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[jpeg.name, "series"])
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20180101", "120000", "1", ""
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.BodyPartExamined, ds.SeriesNumber, ds.InstanceNumber = "CR", "CHEST", 1, 1
    ds.PatientOrientation = ""
    ds.StudyDescription = "XR CHEST (Kermany et al. 2018, CC BY 4.0)"
    ds.set_pixel_data(pixels, "MONOCHROME2", 8, generate_instance_uid=False)
    path: Path = out / label / str(ds.StudyInstanceUID) / f"{jpeg.stem}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def pipeline(dicom_root: Path) -> None:
    """Each study through a node's SCP, then the job's label, probability and results."""
    import time
    import tomllib

    from sqlalchemy import select

    from dicom_ai_node.config import Settings
    from dicom_ai_node.infer.evaluation import wilson_interval
    from dicom_ai_node.jobs.models import Job, Result
    from dicom_ai_node.node import Node

    with Path("config/node.toml").open("rb") as f:
        routes = [r for r in tomllib.load(f)["routes"] if r["model"] == "cxr-opacity-demo"]
    studies = {p.name: p.parent.name for p in dicom_root.glob("*/*") if p.is_dir()}
    with tempfile.TemporaryDirectory() as tmp:
        settings = {
            "dicom": {"bind": "127.0.0.1", "port": 0},
            "http": {"bind": "127.0.0.1", "port": 0},
            "storage": {"data_dir": tmp, "min_free_mb": 0},
            "assemble": {"stable_seconds": 0.5, "poll_seconds": 0.1},
            "routes": routes,
        }
        node = Node(Settings.model_validate(settings))
        node.start()
        try:
            port = str(node.scp.port)
            for folder in dicom_root.glob("*/*"):
                subprocess.run(
                    ["storescu", "+sd", "+r", "-aec", "AINODE", "127.0.0.1", port, str(folder)],
                    check=True,
                    capture_output=True,
                    env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
                )
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                with node.read_sessions() as session:
                    jobs = list(session.scalars(select(Job).where(Job.finished_at.is_not(None))))
                if len(jobs) == len(studies):
                    break
                time.sleep(0.5)
            with node.read_sessions() as session:
                kinds = {
                    job.id: sorted(
                        r.kind
                        for r in session.scalars(select(Result).where(Result.job_id == job.id))
                    )
                    for job in jobs
                }
        finally:
            node.stop()
    tally = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    print(f"{'truth':8} {'label':8} {'p(opacity)':>10}  results")
    for job in sorted(jobs, key=lambda j: (studies[j.study_instance_uid], j.probability or 0)):
        truth = studies[job.study_instance_uid]
        print(f"{truth:8} {job.label or job.state:8} {job.probability or 0:10.3f}  {kinds[job.id]}")
        key = ("t" if (truth == "opacity") == bool(job.positive) else "f") + (
            "p" if job.positive else "n"
        )
        tally[key] += 1
    for name, hits, misses in (
        ("sensitivity", tally["tp"], tally["fn"]),
        ("specificity", tally["tn"], tally["fp"]),
    ):
        low, high = wilson_interval(hits, hits + misses)
        print(f"{name}: {hits}/{hits + misses} (95% Wilson {low:.2f} to {high:.2f})")


def pictures(root: Path, out: Path) -> None:
    """pydicom-data's real chest CR ``RG1`` (MONOCHROME1, 15 bits stored; uncompressed and
    JPEG 2000 lossless) through the chest model's preprocessing and Grad-CAM, as PNGs:
    the model input and the Secondary Capture pixels the node would send."""
    from pydicom import dcmread

    from dicom_ai_node.infer import load_models
    from dicom_ai_node.infer.preprocess import to_model_input
    from dicom_ai_node.report.render import render

    (wheel,) = root.glob("pydicom_data-*.whl")
    model = load_models([], heatmaps="all")["cxr-opacity-demo"]
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as tmp:
        for name in ("RG1_UNCR", "RG1_J2KR"):
            path = Path(tmp) / f"{name}.dcm"
            path.write_bytes(archive.read(f"data_store/data/{name}.dcm"))
            ds = dcmread(path)
            image = to_model_input(ds, model.card.input, model.card.preprocessing)
            result = model.predict_series([path])
            key = result.key_image
            print(
                f"{name}: {ds.Rows}x{ds.Columns} {ds.PhotometricInterpretation}, "
                f"{ds.BitsStored} bits stored, {ds.file_meta.TransferSyntaxUID.name}; "
                f"input min {image.min():.3f} mean {image.mean():.3f} max {image.max():.3f}; "
                f"{result.label} p(opacity) {result.probability:.3f}"
            )
            if name != "RG1_UNCR":  # the same pixels (lossless): the figures above suffice
                continue
            grey = np.round(image[..., 0] * 255).astype(np.uint8)
            Image.fromarray(grey).save(out / f"{name.lower()}-input.png")
            lines = [(f"AI: {result.label} {result.probability:.0%} (demo model)", (255, 255, 0))]
            pixels = render(ds, None, key.heatmap, lines, model.card.preprocessing.keep_aspect)
            Image.fromarray(pixels).resize((512, 512 * pixels.shape[0] // pixels.shape[1])).save(
                out / f"{name.lower()}-sc.png"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="where make real-data downloaded the wheels")
    parser.add_argument("--pipeline", action="store_true", help="also run the whole node")
    parser.add_argument("--pictures", type=Path, help="write pydicom-data RG1 pictures here")
    args = parser.parse_args()
    for folder in ("jpeg", "dicom"):
        shutil.rmtree(args.root / folder, ignore_errors=True)
    images = extract(args.root)
    for label, jpeg in images:
        to_dicom(label, jpeg, args.root / "dicom")
    print(f"{len(images)} images in {args.root / 'jpeg'} and {args.root / 'dicom'}")
    if args.pipeline:
        pipeline(args.root / "dicom")
    if args.pictures:
        pictures(args.root, args.pictures)


if __name__ == "__main__":
    main()
