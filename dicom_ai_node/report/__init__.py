"""report: pure functions from (source datasets, prediction) to DICOM result objects."""
