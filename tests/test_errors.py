"""errors: every error class and exit code in one module, and the CLI's help lists them."""

from __future__ import annotations

import ast
from pathlib import Path

from typer.testing import CliRunner

from dermaclass import errors
from dermaclass.cli import app

PACKAGE = Path(errors.__file__).parent


def _error_classes() -> list[type]:
    found, todo = [], [errors.DermaclassError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_has_a_documented_exit_code() -> None:
    import dermaclass.cli  # noqa: F401  (imports every module that raises)

    for cls in _error_classes():
        assert errors.Exit(cls.exit_code) in errors.EXIT_CODES, cls
        assert cls.__module__ == "dermaclass.errors", f"{cls.__name__} is defined in {cls.__module__}"


def test_no_module_defines_its_own_error_class() -> None:
    names = {c.__name__ for c in _error_classes()}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", None)) for b in node.bases}
                assert not bases & names, f"{path}: class {node.name} derives from {bases & names}"


def test_the_cli_help_lists_the_exit_codes() -> None:
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "400"})
    text = " ".join(res.output.split())
    assert errors.exit_codes_help() in text
    for code in errors.Exit:
        assert f"{int(code)} {errors.EXIT_CODES[code]}" in text
