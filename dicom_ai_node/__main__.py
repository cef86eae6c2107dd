"""``python -m dicom_ai_node``: the same as the ``dicom-ai-node`` command."""

from dicom_ai_node.cli import app

app()
