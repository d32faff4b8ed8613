"""Errors a user can act on, and every exit code of the ``dermaclass`` command.

Library code raises these with a message that names the file and the problem; the CLI turns
them into one line on stderr and the class's exit code instead of a traceback. The CLI's
help text lists ``EXIT_CODES`` as written here (``exit_codes_help``), so the two cannot drift.
"""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    """The exit codes of ``dermaclass``; ``EXIT_CODES`` says what each means."""

    OK = 0
    PROBLEMS_FOUND = 1
    USAGE = 2
    DATA = 3
    MODEL = 4
    TRAINING = 5
    SENSITIVITY_DROP = 6


EXIT_CODES: dict[Exit, str] = {
    Exit.OK: "success",
    Exit.PROBLEMS_FOUND: "problems found with --strict",
    Exit.USAGE: "usage or configuration error, or an output that exists and needs --force",
    Exit.DATA: "the data cannot be read or used (missing folder, unreadable manifest, no usable images, unknown "
    "labels, an image too small to judge, a locked or unreadable study database)",
    Exit.MODEL: "a model, export or report cannot be built or loaded (unknown architecture, unreachable weights, "
    "bad bundle)",
    Exit.TRAINING: "training cannot run on this data or diverged (e.g. an empty split, a NaN loss)",
    Exit.SENSITIVITY_DROP: "report compare (or retrain) found a class whose sensitivity dropped beyond its interval",
}


def exit_codes_help() -> str:
    """The exit codes as one paragraph, for the CLI's help."""
    return "Exit codes: " + "; ".join(f"{int(code)} {text}" for code, text in EXIT_CODES.items()) + "."


class DermaclassError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""

    exit_code: int = Exit.DATA


class DataError(DermaclassError):
    """The dataset cannot be read: no images, an unreadable manifest, missing columns."""

    exit_code = Exit.DATA


class ConfigError(DermaclassError):
    """A configuration file or flag is invalid."""

    exit_code = Exit.USAGE


class InputProblem(DermaclassError, ValueError):
    """An image the model must not judge at all (e.g. too small); the message is for a clinician."""

    exit_code = Exit.DATA


class EvaluationError(DermaclassError):
    """The data cannot be evaluated with this bundle (unknown labels, an empty split)."""

    exit_code = Exit.DATA


class CompareError(DermaclassError):
    """Two reports cannot be compared (different test sets or classes)."""

    exit_code = Exit.DATA


class ModelError(DermaclassError):
    """A model cannot be built or loaded: unknown architecture, unreachable weights, bad bundle."""

    exit_code = Exit.MODEL


class ExportError(DermaclassError):
    """An export cannot be made, opened, or does not match the model it came from."""

    exit_code = Exit.MODEL


class ReportError(DermaclassError):
    """A report.json that this dermaclass cannot read: unknown or newer format, missing or bad fields."""

    exit_code = Exit.MODEL


class TrainingError(DermaclassError):
    """Training cannot run on this data (an empty split, mismatched classes)."""

    exit_code = Exit.TRAINING


class StudyError(DermaclassError):
    """A hyper-parameter study's database cannot be opened or written (locked, corrupt, not a study)."""

    exit_code = Exit.DATA


class NonFiniteLoss(DermaclassError):
    """Training diverged: the loss became NaN or Inf."""

    exit_code = Exit.TRAINING
