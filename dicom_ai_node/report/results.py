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
from dicom_ai_node.report.render import DEFAULT_SC_LAYOUT, SC_LAYOUTS, ScLayout
from dicom_ai_node.report.sc import build_sc
from dicom_ai_node.report.sr import build_sr

Output = Literal["sr", "sc", "kos"]


@dataclass(frozen=True)
class ResultObject:
    """One result object, which output it is and, for an SC, its layout."""

    kind: Output
    dataset: Dataset
    layout: ScLayout | None = None


def build_results(
    sources: Sequence[Dataset],
    key_source: Dataset,
    prediction: SeriesPrediction,
    card: ModelCard,
    outputs: Sequence[Output],
    uids: ResultUIDs,
    context: ReportContext,
    predecessors: Sequence[Dataset] = (),
    sc_layouts: Sequence[ScLayout] = (DEFAULT_SC_LAYOUT,),
) -> list[ResultObject]:
    """The requested result objects, each with its kind, in the order SR, SC, KOS.

    ``sources`` are the series' headers, ``key_source`` the key image with its pixels
    (only read when "sc" is requested). With "sc", one SC per layout in ``sc_layouts``
    (those the destinations need), in that order. The KOS is left out when the prediction
    is negative. ``predecessors`` are the earlier SRs the SR amends (see :func:`build_sr`).
    Raises ``ValueError`` for an unknown output name or layout, no layout for an SC, or
    inconsistent inputs.
    """
    unknown = set(outputs) - {"sr", "sc", "kos"}
    if unknown:
        raise ValueError(f"unknown outputs: {sorted(unknown)}")
    strange = set(sc_layouts) - set(SC_LAYOUTS)
    if strange:
        raise ValueError(f"unknown SC layouts: {sorted(strange)}")
    if "sc" in outputs and not sc_layouts:
        raise ValueError("an SC is requested but no layout for it")
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
        for layout in dict.fromkeys(sc_layouts):
            sc = build_sc(
                key_source,
                prediction,
                card,
                series_uid=uids.sc_series,
                sop_instance_uid=uids.sc_instances[layout],
                context=context,
                layout=layout,
            )
            results.append(ResultObject("sc", sc, layout))
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
