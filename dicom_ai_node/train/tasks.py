"""Model cards of the built-in tasks: the labels, codes and preprocessing the demo models use.

Codes: RadLex RID28530 "opacity", SNOMED CT 17621005 "Normal" (qualifier value) and
1386000 "Intracranial hemorrhage" (disorder), as the SR's coded findings need them (PS3.3 8.8).
"""

from __future__ import annotations

from dicom_ai_node.infer.card import (
    Aggregation,
    CodedConcept,
    InputSpec,
    LabelSpec,
    ModelCard,
    PreprocessSpec,
)
from dicom_ai_node.synth.studies import BRAIN_WINDOW, Task
from dicom_ai_node.train.model import EXPLAIN_LAYER

_NORMAL = LabelSpec(
    name="normal",
    code=CodedConcept(value="17621005", scheme="SCT", meaning="Normal"),
    positive=False,
)
_MANUFACTURER = "dicom-ai-node project"
_DEMO_USE = (
    "Demonstration and testing of the dicom-ai-node pipeline on synthetic phantoms only. "
    "Not a medical device; not for diagnostic use."
)

TASK_CARDS: dict[Task, ModelCard] = {
    Task.CXR_OPACITY: ModelCard(
        name="cxr-opacity-demo",
        version="0.1.0",
        manufacturer=_MANUFACTURER,
        description="Chest radiograph: normal vs lung opacity. Trained on synthetic phantoms.",
        intended_use=_DEMO_USE,
        not_for_diagnostic_use=True,
        input=InputSpec(height=128, width=128, channels=1),
        labels=[
            _NORMAL,
            LabelSpec(
                name="opacity",
                code=CodedConcept(value="RID28530", scheme="RADLEX", meaning="opacity"),
                positive=True,
            ),
        ],
        threshold=0.5,
        preprocessing=PreprocessSpec(window="file"),
        aggregation=Aggregation.MAX,
        modalities=["CR", "DX"],
        body_parts=["CHEST"],
        explain_layer=EXPLAIN_LAYER,
    ),
    Task.HEAD_CT_HEMORRHAGE: ModelCard(
        name="head-ct-hemorrhage-demo",
        version="0.1.0",
        manufacturer=_MANUFACTURER,
        description=(
            "Head CT: normal vs intracranial hyperdensity, per axial slice, the series scored "
            "by its most suspicious slice. Trained on synthetic phantoms."
        ),
        intended_use=_DEMO_USE,
        not_for_diagnostic_use=True,
        input=InputSpec(height=128, width=128, channels=1),
        labels=[
            _NORMAL,
            LabelSpec(
                name="hemorrhage",
                code=CodedConcept(value="1386000", scheme="SCT", meaning="Intracranial hemorrhage"),
                positive=True,
            ),
        ],
        threshold=0.5,
        preprocessing=PreprocessSpec(window=BRAIN_WINDOW),
        aggregation=Aggregation.MAX,
        modalities=["CT"],
        body_parts=["HEAD"],
        explain_layer=EXPLAIN_LAYER,
    ),
}
