"""The images behind a positive result as a Key Object Selection Document (PS3.3 A.35.4).

Viewers show KOS documents as "key images": the radiologist jumps to the images the
model flagged. Only a positive result has such images, so a negative one gives no KOS.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_ai_node.infer.card import ModelCard
from dicom_ai_node.infer.prediction import SeriesPrediction, percent
from dicom_ai_node.report.common import (
    NOT_FOR_DIAGNOSTIC_USE,
    ReportContext,
    check_inputs,
    copy_study_level,
    equipment_kwargs,
    finish,
    flagged_images,
    label_spec,
    observer_device,
    series_description,
    study_header,
)

# Document Title (CID 7010 Key Object Selection Document Titles): the images are of
# interest for reading; the other titles (quality, teaching, surgery, ...) do not fit.
TITLE = codes.DCM.OfInterest


def build_kos(
    sources: Sequence[Dataset],
    prediction: SeriesPrediction,
    card: ModelCard,
    *,
    series_uid: str,
    sop_instance_uid: str,
    context: ReportContext,
) -> hd.ko.KeyObjectSelectionDocument | None:
    """Build the KOS (TID 2010) flagging the images behind a positive ``prediction``.

    The key image comes first, then every other image the model labelled positive.
    Returns ``None`` when the prediction is negative. Raises ``ValueError`` on
    inconsistent inputs.
    """
    by_uid = check_inputs(sources, prediction, card)
    if not prediction.positive:
        return None
    flagged = [by_uid[image.sop_instance_uid] for image in flagged_images(prediction, card)]
    selected = list({str(ds.SOPInstanceUID): ds for ds in flagged}.values())
    label = label_spec(card, prediction.label)
    content = hd.ko.KeyObjectSelection(
        document_title=TITLE,
        referenced_objects=selected,
        observer_device_context=observer_device(card, context),
        description=(
            f"{label.code.meaning} ({percent(prediction.probabilities[prediction.label])}) "
            f"by {card.name} {card.version}: {len(selected)} image(s)"
            + (f", {NOT_FOR_DIAGNOSTIC_USE}" if card.not_for_diagnostic_use else "")
        ),
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=[study_header(sources[0]), *sources[1:]],
        content=content,
        series_instance_uid=series_uid,
        series_number=context.series_number_base + 2,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        series_description=series_description(card, " key images"),
        **equipment_kwargs(card, context),  # type: ignore[arg-type]
    )
    for item in kos.ContentSequence:
        # TID 2010 references images without a concept name; highdicom adds (260753009,
        # SCT, "Source"), which validators reject as a forbidden Purpose of Reference.
        if item.ValueType == "IMAGE":
            del item.ConceptNameCodeSequence
    copy_study_level(kos, sources[0])
    finish(kos, context)
    return kos
