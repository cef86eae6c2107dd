"""dispatch: sends results to the configured DICOM destinations, with retries."""
