"""What a package's evaluation says to expect in use: the positive rate and its interval,
against which the node watches for drift."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dicom_ai_node.infer.card import ModelCard


@dataclass(frozen=True)
class ExpectedRate:
    """The positive rate a model version is expected to give, with its 95 % interval."""

    version: str
    estimate: float
    low: float
    high: float

    def contains(self, rate: float) -> bool:
        return self.low <= rate <= self.high


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927); (0, 1) when ``trials`` is 0."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    half /= 1 + z * z / trials
    return max(0.0, centre - half), min(1.0, centre + half)


def expected_positive_rate(package: Path, card: ModelCard) -> ExpectedRate | None:
    """The card's ``evaluation_prevalence``, else the prevalence of ``evaluation.json`` in the
    package (positives / cases, Wilson interval), else ``None``."""
    if card.evaluation_prevalence is not None:
        estimate, low, high = card.evaluation_prevalence
        return ExpectedRate(card.version, estimate, low, high)
    try:
        report = json.loads((package / "evaluation.json").read_text())
        positives, cases = int(report["positives"]), int(report["cases"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if cases == 0:
        return None
    low, high = wilson_interval(positives, cases)
    return ExpectedRate(card.version, positives / cases, low, high)
