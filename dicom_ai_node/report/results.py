"""All result objects of one job, in one call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydicom.dataset import Dataset

from dicom_ai_node.infer.card import ModelCard
from dicom_ai_node.infer.prediction import SeriesPrediction
from dicom_ai_node.report.common import ReportContext, ResultUIDs
from dicom_ai_node.report.kos import build_kos
from dicom_ai_node.report.sc import build_sc
from dicom_ai_node.report.sr import build_sr

Output = Literal["sr", "sc", "kos"]


@dataclass(frozen=True)
class ResultObject:
    """One result object and which output it is."""

    kind: Output
    dataset: Dataset


def build_results(
    sources: Sequence[Dataset],
    key_source: Dataset,
    prediction: SeriesPrediction,
    card: ModelCard,
    outputs: Sequence[Output],
    uids: ResultUIDs,
    context: ReportContext,
    predecessors: Sequence[Dataset] = (),
) -> list[ResultObject]:
    """The requested result objects, each with its kind, in the order SR, SC, KOS.

    ``sources`` are the series' headers, ``key_source`` the key image with its pixels
    (only read when "sc" is requested). The KOS is left out when the prediction is
    negative. ``predecessors`` are the earlier SRs the SR amends (see :func:`build_sr`).
    Raises ``ValueError`` for an unknown output name or inconsistent inputs.
    """
    unknown = set(outputs) - {"sr", "sc", "kos"}
    if unknown:
        raise ValueError(f"unknown outputs: {sorted(unknown)}")
    results: list[ResultObject] = []
    if "sr" in outputs:
        sr = build_sr(
            sources,
            prediction,
            card,
            series_uid=uids.sr_series,
            sop_instance_uid=uids.sr_instance,
            context=context,
            predecessors=predecessors,
        )
        results.append(ResultObject("sr", sr))
    if "sc" in outputs:
        sc = build_sc(
            key_source,
            prediction,
            card,
            series_uid=uids.sc_series,
            sop_instance_uid=uids.sc_instance,
            context=context,
        )
        results.append(ResultObject("sc", sc))
    if "kos" in outputs:
        kos = build_kos(
            sources,
            prediction,
            card,
            series_uid=uids.kos_series,
            sop_instance_uid=uids.kos_instance,
            context=context,
        )
        if kos is not None:
            results.append(ResultObject("kos", kos))
    return results
