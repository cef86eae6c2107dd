"""Training data: a folder of class sub-folders (DICOM, PNG, JPEG) or a MedMNIST-style ``.npz``.

Every image goes through the same preprocessing as at inference
(:func:`dicom_ai_node.infer.preprocess.to_model_input` for DICOM, the same resize and
normalisation for PNG/JPEG), so that a model trains on exactly what the node will feed it.
Splits are stratified by class and grouped by series (all frames and slices of a series land in
the same split, so that neighbouring slices cannot leak from training into test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom import dcmread
from pydicom.misc import is_dicom

from dicom_ai_node.infer.card import ModelCard
from dicom_ai_node.infer.preprocess import fit_to_input, normalize, number_of_frames, to_model_input

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
    """The training or evaluation data cannot be used (layout, labels, no images)."""


@dataclass
class Samples:
    """Model inputs with integer labels (indices into the card's labels) and their origin.

    ``groups`` names the unit a sample belongs to (a series, or a file), ``ids`` the sample
    itself (SOP Instance UID and frame, or file name).
    """

    images: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]
    groups: list[str]
    ids: list[str]

    def take(self, index: npt.NDArray[np.intp]) -> Samples:
        return Samples(
            self.images[index],
            self.labels[index],
            [self.groups[i] for i in index],
            [self.ids[i] for i in index],
        )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Splits:
    train: Samples
    val: Samples
    test: Samples


def class_files(root: Path, card: ModelCard) -> dict[int, list[Path]]:
    """The files under each class sub-folder, by label index.

    Sub-folders are named after the card's labels; for a two-label card ``positive`` and
    ``negative`` (what ``synth --label both`` writes) name its positive and other label.
    """
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    index = {label.name: i for i, label in enumerate(card.labels)}
    if len(card.labels) == 2:
        index["positive"] = next(i for i, label in enumerate(card.labels) if label.positive)
        index["negative"] = 1 - index["positive"]
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        raise DataError(
            f"{root}: sub-folders {unknown} are not labels of model {card.name} "
            f"(expected sub-folders: {sorted(index)})"
        )
    files: dict[int, list[Path]] = {}
    for folder in folders:
        files.setdefault(index[folder.name], []).extend(
            sorted(p for p in folder.rglob("*") if p.is_file())
        )
    if len([f for f in files.values() if f]) < 2:
        raise DataError(f"{root}: need images in at least two class sub-folders")
    return files


def load_folder(
    root: Path, card: ModelCard, advance: Callable[[int], None] | None = None
) -> Samples:
    """Every image (every frame of every DICOM file) under the class sub-folders of ``root``.

    ``advance`` is called with the number of files done, for a progress bar.
    """
    images: list[npt.NDArray[np.float32]] = []
    labels: list[int] = []
    groups: list[str] = []
    ids: list[str] = []
    for label, files in class_files(root, card).items():
        for path in files:
            if is_dicom(path):
                ds = dcmread(path)
                series = str(ds.get("SeriesInstanceUID", path.parent))
                for frame in range(number_of_frames(ds)):
                    images.append(to_model_input(ds, card.input, card.preprocessing, frame))
                    ids.append(f"{ds.SOPInstanceUID}:{frame + 1}")
                    groups.append(series)
                    labels.append(label)
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(_load_picture(path, card))
                ids.append(str(path.relative_to(root)))
                groups.append(ids[-1])
                labels.append(label)
            if advance is not None:
                advance(1)
    if not images:
        raise DataError(f"{root}: no DICOM, PNG or JPEG images found")
    return Samples(np.stack(images), np.array(labels, dtype=np.int64), groups, ids)


def _load_picture(path: Path, card: ModelCard) -> npt.NDArray[np.float32]:
    """A PNG/JPEG as a model input: 8-bit values to [0, 1], resized like DICOM images."""
    with Image.open(path) as picture:
        mode = "L" if card.input.channels == 1 else "RGB"
        array = np.asarray(picture.convert(mode), dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., np.newaxis]
    return normalize(fit_to_input(array, card.input), card.preprocessing)


def load_npz(path: Path, card: ModelCard) -> Splits:
    """A MedMNIST-style archive: ``{train,val,test}_images`` (uint8) and ``_labels`` (n, 1)."""
    try:
        archive = np.load(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file: {exc}") from exc
    with archive:
        parts = []
        for split in ("train", "val", "test"):
            keys = (f"{split}_images", f"{split}_labels")
            missing = [key for key in keys if key not in archive]
            if missing:
                raise DataError(f"{path}: missing arrays {missing} (MedMNIST layout expected)")
            parts.append(_npz_samples(archive[keys[0]], archive[keys[1]], card, split))
    return Splits(*parts)


def _npz_samples(
    raw: npt.NDArray[np.generic], raw_labels: npt.NDArray[np.generic], card: ModelCard, split: str
) -> Samples:
    labels = np.asarray(raw_labels).reshape(len(raw_labels), -1)
    if labels.shape[1] != 1:
        raise DataError(f"{split}_labels has {labels.shape[1]} columns; one class per image needed")
    flat = labels[:, 0].astype(np.int64)
    if flat.min() < 0 or flat.max() >= len(card.labels):
        raise DataError(f"{split}_labels outside 0..{len(card.labels) - 1} of model {card.name}")
    pixels = raw.astype(np.float32) / 255.0
    if pixels.ndim == 3:
        pixels = pixels[..., np.newaxis]
    if pixels.shape[-1] != card.input.channels:
        pixels = (
            np.repeat(pixels, 3, axis=-1)
            if card.input.channels == 3
            else pixels.mean(-1, keepdims=True)
        )
    images = np.stack([normalize(fit_to_input(p, card.input), card.preprocessing) for p in pixels])
    ids = [f"{split}:{i}" for i in range(len(flat))]
    return Samples(images, flat, ids, ids)


def stratified_split(samples: Samples, seed: int, val: float = 0.15, test: float = 0.15) -> Splits:
    """Split by group (series or file), stratified by class, reproducibly from ``seed``."""
    rng = np.random.default_rng(seed)
    group_label: dict[str, int] = {}
    for group, label in zip(samples.groups, samples.labels, strict=True):
        group_label.setdefault(group, int(label))
    chosen: dict[str, str] = {}
    for label in sorted(set(group_label.values())):
        members = sorted(g for g, lab in group_label.items() if lab == label)
        rng.shuffle(members)
        n_test = max(1, round(len(members) * test))
        n_val = max(1, round(len(members) * val))
        if len(members) < n_test + n_val + 1:
            raise DataError(f"class {label} has {len(members)} series/files; at least 3 needed")
        for i, group in enumerate(members):
            chosen[group] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    where = np.array([chosen[g] for g in samples.groups])
    return Splits(*(samples.take(np.flatnonzero(where == s)) for s in ("train", "val", "test")))
