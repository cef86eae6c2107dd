"""report: pure functions from (source datasets, prediction, model card) to DICOM results.

- :func:`build_sr`: Comprehensive 3D SR with a TID 1500 report (IHE AI Results), :mod:`.sr`
- :func:`build_sc`: Secondary Capture with heat map and result burned in, :mod:`.sc`
- :func:`build_kos`: Key Object Selection of the images behind a positive result, :mod:`.kos`
- :func:`build_results`: the requested ones of the three, each with its kind, :mod:`.results`
- :func:`predecessor`: an earlier SR as an amended one names it, :mod:`.sr`
- :func:`result_uids`: the UIDs of a job's results, derived from a seed, :mod:`.common`
"""

from dicom_ai_node.report.common import ReportContext, ResultUIDs, result_uids
from dicom_ai_node.report.kos import build_kos
from dicom_ai_node.report.results import Output, ResultObject, build_results
from dicom_ai_node.report.sc import build_sc
from dicom_ai_node.report.sr import build_sr, predecessor

__all__ = [
    "Output",
    "ReportContext",
    "ResultObject",
    "ResultUIDs",
    "build_kos",
    "build_results",
    "build_sc",
    "build_sr",
    "predecessor",
    "result_uids",
]
