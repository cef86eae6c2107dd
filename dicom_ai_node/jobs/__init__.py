"""jobs: the spine. Engine setup, tables, queue operations and migrations of the job log."""
