"""route: declarative rules from the configuration choose the model, outputs and destinations.

A rule's ``where`` maps DICOM keywords (or ``CallingAETitle``) to accepted values: a list of
strings compared case-insensitively (for multi-valued attributes such as Image Type, any value
may match), or ``/regex/`` searched case-insensitively. Every key must match. A series that no
rule matches is recorded as skipped with the reason, never dropped in silence. A series or
study pulled for named routes (``run --route``) is matched against those rules only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from dicom_ai_node.assemble import CompletedSeries, CompletedStudy
from dicom_ai_node.config import RouteSettings
from dicom_ai_node.jobs.queue import JobSpec


def _values(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    return [] if value is None else [str(value)]


def _accepts(accepted: list[str] | str, actual: list[str]) -> bool:
    for pattern in [accepted] if isinstance(accepted, str) else accepted:
        if len(pattern) > 1 and pattern.startswith("/") and pattern.endswith("/"):
            regex = re.compile(pattern[1:-1], re.IGNORECASE)
            if any(regex.search(value) for value in actual):
                return True
        elif any(pattern.casefold() == value.casefold() for value in actual):
            return True
    return False


def mismatch(rule: RouteSettings, series: CompletedSeries) -> str | None:
    """Why ``rule`` does not match ``series`` (``None`` when it matches)."""
    for keyword, accepted in rule.where.items():
        if keyword == "CallingAETitle":
            actual = [series.calling_ae_title]
        else:
            actual = _values(series.attributes.get(keyword))
        if not actual:
            return f"{keyword} is absent"
        if not _accepts(accepted, actual):
            return f"{keyword}={'/'.join(actual)} not in {accepted}"
    return None


def _spec(
    rule: RouteSettings, study: str, series: CompletedSeries | None, generation: int, modality: str
) -> JobSpec:
    return JobSpec(
        level=rule.level,
        study_instance_uid=study,
        series_instance_uid=series.series_instance_uid if series else None,
        generation=generation,
        modality=modality,
        route=rule.name,
        model=rule.model,
        outputs=tuple(rule.outputs),
        destinations=tuple(rule.destinations),
        priority=rule.priority,
        shadow=rule.shadow,
    )


def _rules(rules: Sequence[RouteSettings], requested: tuple[str, ...]) -> Sequence[RouteSettings]:
    return [rule for rule in rules if rule.name in requested] if requested else rules


def plan_series(
    rules: Sequence[RouteSettings], series: CompletedSeries
) -> tuple[list[JobSpec], str]:
    """The series-level jobs for a complete series, and a reason when nothing matched.

    A match by a study-level rule counts as handled (its job is made when the study
    completes), so such a series is not reported as skipped.
    """
    specs: list[JobSpec] = []
    reasons: list[str] = []
    matched_study_rule = False
    for rule in _rules(rules, series.requested_routes):
        why = mismatch(rule, series)
        if why is not None:
            reasons.append(f"{rule.name}: {why}")
        elif rule.level == "study":
            matched_study_rule = True
        else:
            specs.append(
                _spec(rule, series.study_instance_uid, series, series.generation, series.modality)
            )
    if specs or matched_study_rule:
        return specs, ""
    return specs, "no route matches (" + ("; ".join(reasons) or "no routes configured") + ")"


def plan_study(rules: Sequence[RouteSettings], study: CompletedStudy) -> list[JobSpec]:
    """One job per study-level rule that matches at least one series of the study."""
    specs = []
    for rule in _rules(rules, study.requested_routes):
        if rule.level != "study":
            continue
        matching = [s for s in study.series if mismatch(rule, s) is None]
        if matching:
            modalities = sorted({s.modality for s in matching if s.modality})
            specs.append(
                _spec(rule, study.study_instance_uid, None, study.generation, "\\".join(modalities))
            )
    return specs
