"""All result objects of one job, in one call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydicom.dataset import Dataset

from dicom_ai_node.infer.card import ModelCard
from dicom_ai_node.infer.prediction import SeriesPrediction
from dicom_ai_node.report.common import ReportContext, ResultUIDs
from dicom_ai_node.report.kos import build_kos
from dicom_ai_node.report.sc import build_sc
from dicom_ai_node.report.sr import build_sr

Output = Literal["sr", "sc", "kos"]


def build_results(
    sources: Sequence[Dataset],
    key_source: Dataset,
    prediction: SeriesPrediction,
    card: ModelCard,
    outputs: Sequence[Output],
    uids: ResultUIDs,
    context: ReportContext,
) -> list[Dataset]:
    """The requested result objects, in the order SR, SC, KOS.

    ``sources`` are the series' headers, ``key_source`` the key image with its pixels
    (only read when "sc" is requested). The KOS is left out when the prediction is
    negative. Raises ``ValueError`` for an unknown output name or inconsistent inputs.
    """
    unknown = set(outputs) - {"sr", "sc", "kos"}
    if unknown:
        raise ValueError(f"unknown outputs: {sorted(unknown)}")
    results: list[Dataset] = []
    if "sr" in outputs:
        results.append(
            build_sr(
                sources,
                prediction,
                card,
                series_uid=uids.sr_series,
                sop_instance_uid=uids.sr_instance,
                context=context,
            )
        )
    if "sc" in outputs:
        results.append(
            build_sc(
                key_source,
                prediction,
                card,
                series_uid=uids.sc_series,
                sop_instance_uid=uids.sc_instance,
                context=context,
            )
        )
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
            results.append(kos)
    return results
