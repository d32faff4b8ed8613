"""Reports people review: confusion matrices, reliability diagrams, HTML, and model comparison.

Everything renders from the plain dicts of ``dermaclass.evaluate`` (MONAI's metric/handler
split): nothing here computes a figure except ``compare``, which recomputes both models'
figures from their ``predictions.csv`` with one *paired* grouped bootstrap (the same
resampled lesions for the old and the new model), so a delta's interval reflects the
models' difference and not two independent samplings.

The HTML is one self-contained file (figures and thumbnails embedded as data URIs, no
scripts, no network), readable offline in any browser. Class names come from clinic data,
so every string is escaped (Jinja2 autoescape). The confusion-matrix layout follows the
10-class dermatology matrix of seed 003: counts and row-normalised side by side, with full
class names.
"""

from dermaclass.report.card import model_card_markdown
from dermaclass.report.compare import CompareError, compare_reports, drop_alert, load_report, write_compare
from dermaclass.report.figures import confusion_png, difference_png, reliability_png, thumbnail_png
from dermaclass.report.html import REPORT_FILES, render_html, write_report

__all__ = [
    "REPORT_FILES",
    "CompareError",
    "compare_reports",
    "confusion_png",
    "difference_png",
    "drop_alert",
    "load_report",
    "model_card_markdown",
    "reliability_png",
    "render_html",
    "thumbnail_png",
    "write_compare",
    "write_report",
]
