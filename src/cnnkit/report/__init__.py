"""One self-contained HTML page for a run (or an experiment): ``write_report``.

The page reads the run folder and never trains; its images are inline PNGs, it has no
script and links nothing outside itself (an experiment's page links its cells' own
reports by relative path).
"""

from cnnkit.report.run import SECTIONS
from cnnkit.report.write import REPORT_NAME, write_report

__all__ = ["REPORT_NAME", "SECTIONS", "write_report"]
