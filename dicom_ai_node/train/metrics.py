"""Binary classification metrics with bootstrap confidence intervals, and their report files.

Everything is computed from (truth, score) pairs, which the JSON report keeps, so anyone can
recompute the figures. ROC AUC is the Mann-Whitney statistic (ties count one half); confidence
intervals are percentile intervals over bootstrap resamples of the cases.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

Truth = npt.NDArray[np.int64]
Scores = npt.NDArray[np.float64]

METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")


def confusion(truth: Truth, scores: Scores, threshold: float) -> dict[str, int]:
    """True/false positives/negatives at ``threshold`` (a score >= threshold is positive)."""
    predicted = scores >= threshold
    positive = truth == 1
    return {
        "tp": int(np.sum(predicted & positive)),
        "fp": int(np.sum(predicted & ~positive)),
        "tn": int(np.sum(~predicted & ~positive)),
        "fn": int(np.sum(~predicted & positive)),
    }


def roc_auc(truth: Truth, scores: Scores) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties 1/2."""
    n_pos, n_neg = int(np.sum(truth == 1)), int(np.sum(truth == 0))
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Rank-sum form, tied scores sharing their average rank: O(n log n) for the bootstrap.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    ranks = (first_rank + (counts - 1) / 2.0)[inverse]
    return float((ranks[truth == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def metrics(truth: Truth, scores: Scores, threshold: float) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, precision, F1 and ROC AUC (NaN when undefined)."""
    c = confusion(truth, scores, threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]

    def ratio(num: float, den: float) -> float:
        return num / den if den else float("nan")

    precision, sensitivity = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "accuracy": ratio(tp + tn, tp + fp + tn + fn),
        "sensitivity": sensitivity,
        "specificity": ratio(tn, tn + fp),
        "precision": precision,
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": roc_auc(truth, scores),
    }


def bootstrap_intervals(
    truth: Truth, scores: Scores, threshold: float, *, resamples: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95 % percentile bootstrap interval of each metric, resampling cases with replacement."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in METRICS}
    for _ in range(resamples):
        index = rng.integers(0, len(truth), len(truth))
        for name, value in metrics(truth[index], scores[index], threshold).items():
            draws[name].append(value)
    intervals = {}
    for name, values in draws.items():
        finite = np.array([v for v in values if np.isfinite(v)])
        lo, hi = np.percentile(finite, [2.5, 97.5]) if len(finite) else (np.nan, np.nan)
        intervals[name] = (float(lo), float(hi))
    return intervals


def roc_points(truth: Truth, scores: Scores) -> tuple[Scores, Scores]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0)."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_truth = scores[order], truth[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    tps = np.cumsum(sorted_truth)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    n_pos, n_neg = max(int(truth.sum()), 1), max(int((1 - truth).sum()), 1)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def youden_threshold(truth: Truth, scores: Scores) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J), placed midway
    between neighbouring scores; among equal J the one nearest 0.5."""
    values = np.unique(scores)
    candidates = [float(t) for t in np.r_[(values[:-1] + values[1:]) / 2, 0.5]]

    def youden(threshold: float) -> tuple[float, float]:
        c = confusion(truth, scores, threshold)
        j = c["tp"] / max(c["tp"] + c["fn"], 1) + c["tn"] / max(c["tn"] + c["fp"], 1)
        return j, -abs(threshold - 0.5)

    return max(candidates, key=youden)


def build_report(
    truth: Sequence[int],
    scores: Sequence[float],
    ids: Sequence[str],
    threshold: float,
    *,
    about: dict[str, Any],
    seed: int = 0,
) -> dict[str, Any]:
    """The evaluation report as a JSON-ready dict, predictions included."""
    t = np.asarray(truth, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    return {
        **about,
        "threshold": threshold,
        "cases": len(t),
        "positives": int(t.sum()),
        "metrics": metrics(t, s, threshold),
        "confidence_intervals_95": bootstrap_intervals(t, s, threshold, seed=seed),
        "confusion_matrix": confusion(t, s, threshold),
        "predictions": [
            {"id": i, "truth": int(y), "score": float(p)} for i, y, p in zip(ids, t, s, strict=True)
        ],
    }


def write_report(report: dict[str, Any], out_dir: Path, stem: str = "evaluation") -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>-roc.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}-roc.png"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(report_markdown(report, paths[2].name))
    truth = np.array([p["truth"] for p in report["predictions"]], dtype=np.int64)
    scores = np.array([p["score"] for p in report["predictions"]], dtype=np.float64)
    draw_roc(*roc_points(truth, scores), report["metrics"]["roc_auc"], paths[2])
    return paths


def report_markdown(report: dict[str, Any], roc_png: str) -> str:
    """The human-readable report."""
    c = report["confusion_matrix"]
    lines = [
        f"# Evaluation of {report.get('model', 'model')} {report.get('model_version', '')}",
        "",
        f"Data: `{report.get('data', '')}` ({report.get('level', 'image')} level), "
        f"{report['cases']} cases, {report['positives']} positive; "
        f"threshold {report['threshold']:.2f}.",
        "",
        "| metric | value | 95 % CI (bootstrap) |",
        "|---|---|---|",
    ]
    for name in METRICS:
        lo, hi = report["confidence_intervals_95"][name]
        lines.append(f"| {name} | {report['metrics'][name]:.3f} | {lo:.3f} to {hi:.3f} |")
    lines += [
        "",
        "Confusion matrix (rows: truth, columns: prediction):",
        "",
        "| | predicted positive | predicted negative |",
        "|---|---|---|",
        f"| positive | {c['tp']} | {c['fn']} |",
        f"| negative | {c['fp']} | {c['tn']} |",
        "",
        f"![ROC curve]({roc_png})",
        "",
    ]
    return "\n".join(lines)


def draw_roc(fpr: Scores, tpr: Scores, auc: float, path: Path, size: int = 400) -> None:
    """A ROC curve as a PNG, drawn with Pillow (no plotting library needed)."""
    margin = 50
    plot = size - 2 * margin
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)

    def xy(x: float, y: float) -> tuple[float, float]:
        return margin + x * plot, size - margin - y * plot

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    for tick in (0.0, 0.5, 1.0):
        draw.text((xy(tick, 0)[0] - 8, size - margin + 6), f"{tick:.1f}", fill="black")
        draw.text((margin - 28, xy(0, tick)[1] - 6), f"{tick:.1f}", fill="black")
    draw.line([xy(0, 0), xy(1, 1)], fill="gray", width=1)
    draw.line([xy(float(x), float(y)) for x, y in zip(fpr, tpr, strict=True)], fill="blue", width=2)
    draw.text((margin, 15), f"ROC curve, AUC = {auc:.3f}", fill="black")
    draw.text((size // 2 - 60, size - 20), "1 - specificity", fill="black")
    draw.text((5, margin - 20), "sensitivity", fill="black")
    image.save(path)
