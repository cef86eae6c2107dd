"""infer: model packages, DICOM-aware preprocessing and batched CNN inference."""
