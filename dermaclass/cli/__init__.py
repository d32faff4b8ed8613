"""The ``dermaclass`` command line (typer + rich): the ML engineer's side of the tool.

Shared pieces live in ``common`` (the app, options, error handling); the commands are in
``data`` (validate, split, card), ``training`` (train, retrain, lr-find), ``reports``
(evaluate, report compare/card), ``serving`` (predict, export, serve) and ``tuning`` (tune).

Only this module prints; library modules log. Every command resolves its settings through
``config.load_config`` (defaults < ``--config FILE`` < flags) and turns a DermaclassError into
one clear line on stderr and a documented exit code, never a traceback.
"""

from __future__ import annotations

from dermaclass.cli import data, reports, serving, training, tuning  # the commands register on ``app``
from dermaclass.cli.common import app

__all__ = ["app", "data", "main", "reports", "serving", "training", "tuning"]


def main() -> None:
    """Console-script entry point."""
    app()
