"""The clinician's side: a Gradio app to diagnose, explain, refer, review reports and feed back.

``app``: the Blocks app and its launcher (tabs: Diagnose, Report, Model); ``views``: what
the tabs show, as plain functions (no Gradio), tested without a server. The app is decision
support, not a diagnostic device, and says so on every tab.
"""

from dermaclass.ui.app import DEFAULT_BUNDLE, DEFAULT_HOST, DEFAULT_PORT, DELETE_CACHE, build_app, launch
from dermaclass.ui.views import (
    MAX_BYTES,
    MAX_PIXELS,
    UploadError,
    check_upload,
    diagnose_markdown,
    model_card,
    model_status,
    report_views,
    side_by_side,
)

__all__ = [
    "DEFAULT_BUNDLE",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DELETE_CACHE",
    "MAX_BYTES",
    "MAX_PIXELS",
    "UploadError",
    "build_app",
    "check_upload",
    "diagnose_markdown",
    "launch",
    "model_card",
    "model_status",
    "report_views",
    "side_by_side",
]
