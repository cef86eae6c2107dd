"""Command-line commands for models, synthetic data, training and evaluation.

``cli.py`` registers them on the main app: ``models`` (``list``, ``show``, ``import``,
``check``), ``synth``,
``train`` and ``evaluate``. Bad input ends with a one-line error and exit code 1, no traceback.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from pydicom.misc import is_dicom
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from dicom_ai_node.infer.backends import BackendError, weights_path, weights_sha256
from dicom_ai_node.infer.card import ModelCard
from dicom_ai_node.infer.runtime import (
    LoadedModel,
    ModelPackageError,
    NoUsableImagesError,
    read_card,
    read_cards,
)
from dicom_ai_node.synth.studies import Label, Task, generate_studies, phantom_arrays

console = Console()
models_app = typer.Typer(help="List and inspect model packages.", no_args_is_help=True)

ModelsDirs = Annotated[
    list[Path] | None,
    typer.Option("--models-dir", help="Extra folder of model packages (repeatable)."),
]


class SynthLabel(StrEnum):
    POSITIVE = "positive"
    NEGATIVE = "negative"
    BOTH = "both"


class SynthFormat(StrEnum):
    DICOM = "dicom"
    NPZ = "npz"


@contextmanager
def _clean_errors() -> Iterator[None]:
    """Turn expected failures into a red one-line message and exit code 1."""
    from dicom_ai_node.train.data import DataError

    try:
        yield
    except (ModelPackageError, NoUsableImagesError, DataError, FileNotFoundError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _labels_text(card: ModelCard) -> str:
    return ", ".join(
        f"{label.name}{' (+)' if label.positive else ''} [{label.code.scheme} {label.code.value}]"
        for label in card.labels
    )


@models_app.command("list")
def list_models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    models_dir: ModelsDirs = None,
) -> None:
    """List the bundled and extra model packages (cards only; weights are not loaded)."""
    with _clean_errors():
        cards = read_cards(models_dir or [])
    if as_json:
        rows = [
            {
                "name": card.name,
                "version": card.version,
                "labels": [label.name for label in card.labels],
                "positive_label": card.positive_label.name,
                "modalities": card.modalities,
                "body_parts": card.body_parts,
                "not_for_diagnostic_use": card.not_for_diagnostic_use,
                "path": str(path),
                "weights_sha256": _sha256_of(path),
            }
            for path, card in cards.values()
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Model packages")
    for column in ("name", "version", "labels", "modalities", "body parts", "weights", "path"):
        table.add_column(column)
    for path, card in cards.values():
        table.add_row(
            card.name + (" [yellow](demo)[/]" if card.not_for_diagnostic_use else ""),
            card.version,
            _labels_text(card),
            ", ".join(card.modalities),
            ", ".join(card.body_parts),
            _sha256_of(path),
            str(path),
        )
    console.print(table)


def _sha256_of(package: Path) -> str:
    """``<weights name> sha256 <hex>`` of a package, or what is wrong with its weights."""
    try:
        weights = weights_path(package)
    except BackendError as exc:
        return f"({exc})"
    return f"{weights.name} {weights_sha256(weights)}"


@models_app.command("show")
def show_model(
    name: Annotated[str, typer.Argument(help="Model name, or path of a package folder.")],
    models_dir: ModelsDirs = None,
) -> None:
    """Show a model's card, and load its weights to check that they match the card."""
    with _clean_errors():
        package = _package_path(name, models_dir or [])
        model = LoadedModel(package, batch_size=1)
    card = model.card
    table = Table(show_header=False, title=f"{card.name} {card.version}")
    rows = {
        "manufacturer": card.manufacturer,
        "description": card.description,
        "intended use": card.intended_use,
        "not for diagnostic use": str(card.not_for_diagnostic_use),
        "input": f"{card.input.height} x {card.input.width} x {card.input.channels}",
        "labels": _labels_text(card),
        "threshold": f"{card.threshold:.2f}",
        "preprocessing": card.preprocessing.model_dump_json(),
        "aggregation": card.aggregation.value
        + (f" (k={card.top_k})" if card.aggregation == "topk_mean" else ""),
        "modalities / body parts": f"{', '.join(card.modalities)} / {', '.join(card.body_parts)}",
        "parameters": f"{model.backend.parameters or 0:,}",
        "backend": model.backend.kind,
        "heat maps": model.explanation,
        "package": str(package),
        "weights": f"{model.weights.name}, sha256 {model.weights_sha256}",
    }
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)


_IMPORTED_NAMES = {".keras": "model.keras", ".onnx": "model.onnx"}


@models_app.command("import")
def import_model(
    weights: Annotated[
        Path, typer.Argument(help="A .keras or .onnx file, or a TensorFlow SavedModel folder.")
    ],
    card_file: Annotated[Path, typer.Option("--card", help="The model card (model.toml).")],
    out: Annotated[Path, typer.Option("--out", help="Folder to create the package in.")] = Path(
        "."
    ),
) -> None:
    """Build a model package from weights and a card, and check it: the card's input shape
    and labels against the weights, and a test inference on a synthetic input."""
    with _clean_errors():
        card = read_card(card_file)
        if weights.is_dir():
            if not (weights / "saved_model.pb").is_file():
                raise ModelPackageError(f"{weights}: a folder, but not a SavedModel")
            name = "saved_model"
        elif weights.suffix in _IMPORTED_NAMES:
            name = _IMPORTED_NAMES[weights.suffix]
        else:
            raise ModelPackageError(f"{weights}: expected a .keras or .onnx file or a SavedModel")
        package = out / card.name
        if package.exists():
            raise ModelPackageError(f"{package} already exists")
        staging = Path(tempfile.mkdtemp(prefix=f".{card.name}-", dir=out))
        try:
            copy = shutil.copytree if weights.is_dir() else shutil.copyfile
            copy(weights, staging / name)
            card.dump(staging / "model.toml")
            model = LoadedModel(staging, card=card, batch_size=1)
            probabilities, heatmap = _test_inference(model)
        except BaseException:
            shutil.rmtree(staging)
            raise
        staging.rename(package)
    table = Table(show_header=False, title=f"{card.name} {card.version}: package checked")
    rows = {
        "package": str(package),
        "backend": model.backend.kind,
        "weights": f"{name}, sha256 {model.weights_sha256}",
        "input": f"{card.input.height} x {card.input.width} x {card.input.channels}",
        "labels": _labels_text(card),
        "test inference": ", ".join(f"{k} {v:.3f}" for k, v in probabilities.items()),
        "heat map": heatmap,
    }
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)


def _test_inference(model: LoadedModel) -> tuple[dict[str, float], str]:
    """Run a seeded random input through the model; refuse outputs that are not
    probabilities (NaN, outside [0, 1], or not summing to 1 over more than one label)."""
    card = model.card
    shape = (1, card.input.height, card.input.width, card.input.channels)
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    probabilities, maps = model.predict_batch(image, explain=True)
    values = probabilities[0]
    if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1:
        raise ModelPackageError(
            f"model package {card.name}: outputs {values.tolist()} are not probabilities "
            "(the network must end in softmax or sigmoid)"
        )
    if abs(float(values.sum()) - 1.0) > 1e-3:
        console.print(
            f"[yellow]warning:[/] outputs sum to {values.sum():.3f}, not 1 (independent sigmoids?)"
        )
    made = "none made" if maps is None else f"{model.explanation}, {maps.shape[1]}x{maps.shape[2]}"
    return {label.name: float(p) for label, p in zip(card.labels, values, strict=True)}, made


@models_app.command("check")
def check_model(
    name: Annotated[str, typer.Argument(help="Model name, or path of a package folder.")],
    files: Annotated[list[Path] | None, typer.Argument(help="DICOM files to run it on.")] = None,
    models_dir: ModelsDirs = None,
) -> None:
    """Run a package on sample DICOM files and print, per image, what the preprocessing made
    of it and the network's output, so that the card can be checked against the training."""
    from pydicom import dcmread

    from dicom_ai_node.infer.preprocess import to_model_input

    with _clean_errors():
        model = LoadedModel(_package_path(name, models_dir or []), batch_size=1)
    card = model.card
    console.print(
        f"{card.name} {card.version} ({model.backend.kind}, sha256 {model.weights_sha256}); "
        f"preprocessing: {card.preprocessing.model_dump_json()}"
    )
    table = Table(title="preprocessing and output per file")
    for column in ("file", "source", "model input", "output", "label"):
        table.add_column(column)
    failed = 0
    for path in files or []:
        try:
            ds = dcmread(path)
            image = to_model_input(ds, card.input, card.preprocessing)
        except Exception as exc:  # pydicom and the decoders raise many types
            table.add_row(str(path), f"[red]cannot read: {exc}[/]", "", "", "")
            failed += 1
            continue
        probabilities, _ = model.predict_batch(image[np.newaxis])
        probs = {
            label.name: float(p) for label, p in zip(card.labels, probabilities[0], strict=True)
        }
        source = (
            f"{ds.get('Modality', '?')} {ds.get('Rows')}x{ds.get('Columns')} "
            f"{ds.get('PhotometricInterpretation', '?')}, {ds.get('BitsStored', '?')} bits stored"
        )
        shown = (
            f"{'x'.join(map(str, image.shape))}, min {image.min():.3f} "
            f"mean {image.mean():.3f} max {image.max():.3f}"
        )
        output = ", ".join(f"{k} {v:.3f}" for k, v in probs.items())
        table.add_row(str(path), source, shown, output, model.label_for(probs))
    if not files:
        with _clean_errors():
            tested, heatmap = _test_inference(model)
        table.add_row(
            "(synthetic random input)",
            "",
            "",
            ", ".join(f"{k} {v:.3f}" for k, v in tested.items()),
            f"heat map: {heatmap}",
        )
    console.print(table)
    if failed:
        raise typer.Exit(1)


def _package_path(name: str, models_dir: list[Path]) -> Path:
    """A package folder given as a path, or found by model name."""
    path = Path(name)
    if (path / "model.toml").is_file():
        return path
    cards = read_cards(models_dir)
    if name not in cards:
        raise ModelPackageError(f"no model named {name!r}; known: {', '.join(sorted(cards))}")
    return cards[name][0]


def synth(
    task: Annotated[Task, typer.Option("--task", help="Which phantom task.")],
    label: Annotated[SynthLabel, typer.Option("--label", help="Ground truth of the studies.")],
    count: Annotated[int, typer.Option("--count", min=1, help="Studies (images for npz).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (or .npz file).")],
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same studies.")] = 0,
    size: Annotated[
        int | None, typer.Option("--size", min=32, help="Image matrix (default 512 CXR, 256 CT).")
    ] = None,
    slices: Annotated[int, typer.Option("--slices", min=1, help="CT slices per series.")] = 24,
    fmt: Annotated[
        SynthFormat,
        typer.Option("--format", help="dicom studies, or a MedMNIST-style npz of model inputs."),
    ] = SynthFormat.DICOM,
) -> None:
    """Generate synthetic phantom studies (DICOM) or a training archive (npz).

    With ``--label both``, DICOM goes to OUT/positive and OUT/negative (the class-folder
    layout ``train`` reads), ``count`` of each.
    """
    labels = [Label(label)] if label is not SynthLabel.BOTH else [Label.POSITIVE, Label.NEGATIVE]
    if fmt is SynthFormat.NPZ:
        _synth_npz(task, labels, count, out, seed, size)
        return
    with _progress() as progress:
        for lab in labels:
            target = out / lab.value if label is SynthLabel.BOTH else out
            bar = progress.add_task(f"{task.value} {lab.value}", total=count)
            for index in range(count):
                generate_studies(task, lab, 1, target, seed, size=size, slices=slices, start=index)
                progress.advance(bar)
    console.print(f"wrote {count * len(labels)} {task.value} studies under [bold]{out}[/]")


def _synth_npz(
    task: Task, labels: list[Label], count: int, out: Path, seed: int, size: int | None
) -> None:
    """A MedMNIST-style archive (uint8 model inputs of the task's demo card) for ``train``."""
    from dicom_ai_node.train.tasks import TASK_CARDS

    card = TASK_CARDS[task]
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    splits = {"train": 0.7, "val": 0.15, "test": 0.15}
    with _progress() as progress:
        for offset, (split, fraction) in enumerate(splits.items()):
            n = max(2, round(count * fraction))
            truth = np.array(
                [int(labels[i % len(labels)] is Label.POSITIVE) for i in range(n)], dtype=np.int64
            )
            rng.shuffle(truth)
            bar = progress.add_task(f"{task.value} {split}", total=n)
            images = []
            for start in range(0, n, 32):
                chunk = truth[start : start + 32]
                images.append(
                    phantom_arrays(
                        task, chunk, card.input, seed * 1000 + offset * 100 + start, size=size
                    )
                )
                progress.advance(bar, len(chunk))
            pixels = (
                np.concatenate(images)[..., 0]
                if card.input.channels == 1
                else np.concatenate(images)
            )
            arrays[f"{split}_images"] = np.round(pixels * 255).astype(np.uint8)
            arrays[f"{split}_labels"] = truth[:, np.newaxis]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, allow_pickle=False, **arrays)
    console.print(f"wrote {out} ({', '.join(f'{k}: {v.shape}' for k, v in arrays.items())})")


def _card_for(
    task: Task | None, card_path: Path | None, name: str | None, version: str | None
) -> ModelCard:
    """The built-in task's card or a card template file, with name/version overrides."""
    from dicom_ai_node.train.tasks import TASK_CARDS

    if task is not None and card_path is None:
        card = TASK_CARDS[task]
    elif card_path is not None and task is None:
        card = read_card(card_path)
    else:
        raise typer.BadParameter("give exactly one of --task or --card")
    update = {k: v for k, v in {"name": name, "version": version}.items() if v is not None}
    return ModelCard.model_validate({**card.model_dump(), **update}) if update else card


def train(
    data: Annotated[Path, typer.Argument(help="Folder of class sub-folders, or a .npz file.")],
    task: Annotated[Task | None, typer.Option("--task", help="Use a built-in task's card.")] = None,
    card_path: Annotated[
        Path | None, typer.Option("--card", help="A model.toml to use as the card template.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Where the package folder goes.")] = Path(
        "models"
    ),
    name: Annotated[str | None, typer.Option("--name", help="Override the model name.")] = None,
    version: Annotated[str | None, typer.Option("--version", help="Override the version.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 15,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    patience: Annotated[int, typer.Option("--patience", min=1, help="Early stopping.")] = 4,
    filters: Annotated[int, typer.Option("--filters", min=2, help="Width of the first block.")] = 8,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Train a model package and evaluate it on a held-out test split."""
    from dicom_ai_node.train.data import load_folder, load_npz, stratified_split
    from dicom_ai_node.train.trainer import evaluate_samples, train_package

    with _clean_errors():
        card = _card_for(task, card_path, name, version)
        if data.suffix == ".npz":
            with console.status(f"reading {data}"):
                splits = load_npz(data, card)
        else:
            with _progress() as progress:
                files = sum(len(f) for f in _class_file_lists(data, card))
                bar = progress.add_task("reading images", total=files)
                samples = load_folder(data, card, lambda n: progress.advance(bar, n))
            splits = stratified_split(samples, seed)
        console.print(
            f"train {len(splits.train)}, validation {len(splits.val)}, "
            f"test {len(splits.test)} images"
        )
        with _progress() as progress:
            bar = progress.add_task("training", total=epochs)
            package = train_package(
                splits,
                card,
                out,
                epochs=epochs,
                batch_size=batch_size,
                seed=seed,
                patience=patience,
                filters=filters,
                on_progress=_epoch_printer(progress, bar),
            )
        model = LoadedModel(package)
        report = evaluate_samples(model, splits.test, package, data=str(data), seed=seed)
    _print_report(report)
    console.print(f"model package: [bold]{package}[/] (report: {package / 'evaluation.md'})")


def _class_file_lists(data: Path, card: ModelCard) -> list[list[Path]]:
    from dicom_ai_node.train.data import class_files

    return list(class_files(data, card).values())


def _epoch_printer(
    progress: Progress, bar: Any
) -> Callable[[int | None, int, dict[str, float]], None]:
    def hook(epoch: int | None, epochs: int, logs: dict[str, float]) -> None:
        if epoch is None:
            return
        progress.update(bar, completed=epoch)
        progress.console.print(
            f"epoch {epoch}/{epochs}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in logs.items() if "loss" in k or "acc" in k)
        )

    return hook


def evaluate(
    data: Annotated[
        Path | None, typer.Argument(help="Folder of class sub-folders, or a .npz file.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model name or package.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the report files.")] = None,
    models_dir: ModelsDirs = None,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    feedback: Annotated[
        bool,
        typer.Option(
            "--feedback", help="Instead: each model version against the radiologists' feedback."
        ),
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Node configuration (--feedback).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (--feedback).")] = False,
) -> None:
    """Evaluate a model package: per series for DICOM folders (as the node runs it), per image
    for PNG/JPEG folders and for the test split of a .npz; or, with ``--feedback``, every
    model version in the job log against the radiologists' feedback."""
    from dicom_ai_node.train.data import load_folder, load_npz
    from dicom_ai_node.train.trainer import evaluate_samples, evaluate_series

    if feedback:
        _evaluate_feedback(config, as_json)
        return
    if data is None or model is None or out is None:
        console.print("[bold red]error:[/] give DATA, --model and --out (or --feedback)")
        raise typer.Exit(2)
    with _clean_errors():
        loaded = LoadedModel(_package_path(model, models_dir or []))
        if data.suffix == ".npz":
            report = evaluate_samples(
                loaded, load_npz(data, loaded.card).test, out, data=str(data), seed=seed
            )
        else:
            lists = _class_file_lists(data, loaded.card)
            with _progress() as progress:
                if any(is_dicom(p) for files in lists for p in files[:1]):
                    bar = progress.add_task("series", total=None)
                    report = evaluate_series(
                        loaded, data, out, seed=seed, advance=lambda n: progress.advance(bar, n)
                    )
                else:
                    bar = progress.add_task("images", total=sum(map(len, lists)))
                    samples = load_folder(data, loaded.card, lambda n: progress.advance(bar, n))
                    report = evaluate_samples(loaded, samples, out, data=str(data), seed=seed)
    _print_report(report)
    console.print(f"report: [bold]{out / 'evaluation.md'}[/]")


def _evaluate_feedback(config: Path | None, as_json: bool) -> None:
    """Sensitivity and specificity (Wilson 95 % intervals) per model version, taking each
    job's latest feedback as the truth: agreeing with a positive finding makes it a true
    positive, disagreeing a false positive; likewise for negative findings."""
    from dicom_ai_node.cli import _db
    from dicom_ai_node.jobs.queue import latest_feedback

    with _db(config)() as session:
        rows = latest_feedback(session)
    tallies: dict[tuple[str, str], dict[str, int]] = {}
    for model, version, positive, agree in rows:
        tally = tallies.setdefault((model, version), {"tp": 0, "fp": 0, "tn": 0, "fn": 0})
        tally[("t" if agree else "f") + ("p" if positive else "n")] += 1
    if as_json:
        typer.echo(json.dumps([_feedback_row(m, v, t) for (m, v), t in sorted(tallies.items())]))
        return
    table = Table(title="Model versions against the radiologists' feedback")
    for column in (
        "model",
        "version",
        "cases",
        "TP",
        "FP",
        "TN",
        "FN",
        "sensitivity",
        "specificity",
    ):
        table.add_column(column)
    for (model, version), t in sorted(tallies.items()):
        row = _feedback_row(model, version, t)
        cells = [
            "n/a"
            if row[k] is None
            else f"{row[k]:.2f} ({row[k + '_ci95'][0]:.2f} to {row[k + '_ci95'][1]:.2f})"
            for k in ("sensitivity", "specificity")
        ]
        counts = [str(t[k]) for k in ("tp", "fp", "tn", "fn")]
        table.add_row(model, version, str(row["cases"]), *counts, *cells)
    console.print(table if tallies else "no feedback in the job log")


def _feedback_row(model: str, version: str, tally: dict[str, int]) -> dict[str, Any]:
    """Counts, sensitivity and specificity with Wilson 95 % intervals (None when undefined)."""
    from dicom_ai_node.infer.evaluation import wilson_interval

    row: dict[str, Any] = {"model": model, "version": version, "cases": sum(tally.values())}
    row.update(tally)
    for name, hits, misses in (
        ("sensitivity", tally["tp"], tally["fn"]),
        ("specificity", tally["tn"], tally["fp"]),
    ):
        row[name] = hits / (hits + misses) if hits + misses else None
        row[f"{name}_ci95"] = list(wilson_interval(hits, hits + misses))
    return row


def _print_report(report: dict[str, Any]) -> None:
    table = Table(
        title=f"{report['model']}: {report['cases']} {report['level']}-level cases "
        f"({report['positives']} positive)"
    )
    for column in ("metric", "value", "95% CI"):
        table.add_column(column)
    for key, value in report["metrics"].items():
        lo, hi = report["confidence_intervals_95"][key]
        table.add_row(key, f"{value:.3f}", f"{lo:.3f} to {hi:.3f}")
    console.print(table)
    c = report["confusion_matrix"]
    console.print(f"confusion: TP {c['tp']}  FN {c['fn']}  FP {c['fp']}  TN {c['tn']}")
