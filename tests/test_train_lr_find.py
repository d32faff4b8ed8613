"""LR range tests: all four suggestions, seed 002's warm epoch, a safe fallback, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from dermaclass.config import load_config
from dermaclass.train import build_learner, prepare_data, stage_dataloaders
from dermaclass.train.lr_find import SAFE_LR, range_test


def _cfg(tmp_path: Path, **kw):
    return load_config(
        arch="test_resnet", pretrained=False, image_size="32,24", batch_size=8, cache_dir=str(tmp_path / "cache"), **kw
    )


def test_range_test_falls_back_when_the_curve_is_useless(colour_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, lr_find_iters=3)  # far too few points for any suggestion
    data = prepare_data(cfg, colour_data)
    learn = build_learner(cfg, data, tmp_path, dls=stage_dataloaders(cfg, data, data.train_rows, 8))
    test = range_test(learn, tmp_path, "tiny", **cfg.range_test_settings())
    assert test.chosen == SAFE_LR and "no " in test.note


def test_cli_lr_find_writes_suggestions_and_plot(colour_data: Path, tmp_path: Path) -> None:
    from dermaclass.cli import app

    (tmp_path / "recipe.yaml").write_text("arch: test_resnet\npretrained: false\nimage_size: [32, 24]\nbatch_size: 8\n")
    args = [
        "lr-find",
        str(colour_data),
        "--out",
        str(tmp_path / "lr"),
        "--config",
        str(tmp_path / "recipe.yaml"),
        "--iters",
        "30",
        "--warm-epoch",
    ]
    result = CliRunner().invoke(app, args, env={"DERMACLASS_CACHE": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert set(found["suggestions"]) == {"valley", "slide", "minimum", "steep"} and found["warm_epoch"] is True
    assert (tmp_path / "lr" / found["plot"]).is_file() and "chosen (valley)" in result.output
