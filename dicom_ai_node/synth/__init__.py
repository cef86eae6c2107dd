"""synth: synthetic phantom studies (DICOM) and arrays for the demo, training and tests."""

from dicom_ai_node.synth.studies import (
    BRAIN_WINDOW,
    TRANSFER_SYNTAXES,
    Label,
    Task,
    generate_studies,
    phantom_arrays,
)

__all__ = [
    "BRAIN_WINDOW",
    "TRANSFER_SYNTAXES",
    "Label",
    "Task",
    "generate_studies",
    "phantom_arrays",
]
