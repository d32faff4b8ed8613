"""Configuration layers as defaults < YAML < flags; mistakes name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dermaclass.config import Config, load_config
from dermaclass.errors import ConfigError


def test_layers(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 7\nmin_per_class: 3\nsplit_fractions: [0.8, 0.1, 0.1]\n")
    cfg = load_config(path, seed=9, image_size="160,120", manifest=None)
    assert cfg.seed == 9 and cfg.min_per_class == 3
    assert cfg.split_fractions == (0.8, 0.1, 0.1) and cfg.image_size == (160, 120)
    assert cfg.manifest is None
    assert load_config() == Config()


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(seed=3, class_names="names.json")
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_frozen() -> None:
    with pytest.raises(AttributeError):
        Config().seed = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sed: 3\n", "unknown setting 'sed'; did you mean 'seed'"),
        ("seed: lots\n", "seed='lots' is not a valid int"),
        ("image_size: [1, 2, 3]\n", "expected 2 values"),
        ("- a\n- b\n", "expected a mapping"),
        ("seed: [\n", "cannot read config"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/c.yaml")


@pytest.mark.parametrize(
    "flag, message",
    [
        ({"cycle_mult": 1}, "cycle_mult=1: must be at least 2"),
        ({"target_sensitivity": 0}, "target_sensitivity=0.0: must be between 0 and 1"),
        ({"batch_size": 0}, "batch_size=0: must be at least 1"),
        ({"stage_fractions": "0.5,0.4,1.0"}, "stage fractions must increase"),
        ({"lr": -1.0}, "lr=-1.0: must be positive"),
        ({"ood_keep": 1.5}, "ood_keep=1.5: must be between 0 and 1"),
        ({"image_size": "8,8"}, "at least 16 pixels"),
    ],
)
def test_out_of_range_settings_fail_before_any_work(flag: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(**flag)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"label_smoothing": 0.1, "imbalance": "focal"}, "label smoothing is not available with --imbalance focal"),
        ({"average_cycles": 2, "ema_decay": 0.99}, "--average-cycles and --ema-decay"),
        ({"mix": "mixup", "imbalance": "logit-adjusted"}, "--mix is not available with --imbalance logit-adjusted"),
        ({"distill_from": "runs/ens", "sam_rho": 0.05}, "--distill-from is not available with --mix or --sam-rho"),
        ({"distill_from": "runs/ens", "members": 3}, "--distill-from trains one student network"),
        (
            {"members": 2, "member_archs": "@128x96,@160x120", "stage_sizes": "96x72,128x96,128x96,128x96,128x96"},
            "--stage-sizes ends at one image size, but the members differ in size",
        ),
    ],
)
def test_combinations_that_cannot_run_fail_when_the_config_is_built(flags: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^command line: {message}"):
        load_config(**flags)


def test_every_check_is_declared_on_the_config() -> None:
    """A range is declared next to its field (Annotated), a rule between fields in RULES; a
    Config built directly is checked too, not only one loaded from flags."""
    from dermaclass import config

    assert {"batch_size", "cycle_mult", "ema_decay", "stage_fractions", "member_archs"} <= set(config._CHECKS)
    assert all(set(names) <= set(Config.__dataclass_fields__) for names, _ in config.RULES)
    with pytest.raises(ConfigError, match="batch_size=0: must be at least 1"):
        Config(batch_size=0)
    assert Config().problems() == []
