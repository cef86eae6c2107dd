"""dicom-ai-node: a DICOM network node that runs a CNN classifier on received studies.

The pipeline stages are the sub-packages, in data-flow order: ``receive``, ``spool``,
``assemble``, ``route``, ``infer``, ``report``, ``dispatch``; ``jobs`` is the job log that
links them.
"""

__version__ = "0.1.0"
