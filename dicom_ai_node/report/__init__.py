"""report: pure functions from (source datasets, prediction, model card) to DICOM results.

- :func:`build_sr`: Comprehensive 3D SR with a TID 1500 report (IHE AI Results), :mod:`.sr`
- :func:`build_sc`: Secondary Capture with heat map and result burned in, :mod:`.sc`, in
  one of the layouts :data:`SC_LAYOUTS` (text below, above or over the image)
- :func:`build_kos`: Key Object Selection of the images behind a positive result, :mod:`.kos`
- :func:`build_results`: the requested ones of the three, each with its kind, :mod:`.results`
- :func:`predecessor`: an earlier SR as an amended one names it, :mod:`.sr`
- :func:`result_uids`: the UIDs of a job's results, derived from a seed, :mod:`.common`
"""

from dicom_ai_node.report.common import ReportContext, ResultUIDs, result_uids
from dicom_ai_node.report.kos import build_kos
from dicom_ai_node.report.render import DEFAULT_SC_LAYOUT, SC_LAYOUTS, ScLayout
from dicom_ai_node.report.results import Output, ResultObject, build_results
from dicom_ai_node.report.sc import build_sc
from dicom_ai_node.report.sr import build_sr, predecessor

__all__ = [
    "DEFAULT_SC_LAYOUT",
    "SC_LAYOUTS",
    "Output",
    "ReportContext",
    "ResultObject",
    "ResultUIDs",
    "ScLayout",
    "build_kos",
    "build_results",
    "build_sc",
    "build_sr",
    "predecessor",
    "result_uids",
]
