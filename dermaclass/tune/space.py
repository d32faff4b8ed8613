"""The search space of ``dermaclass tune`` (seed 002's TPE search): which ``Config`` fields are
searched, over which ranges, under which budget, and how a trial's settings become its ``Config``.

Declared once (``SPACE``), narrowed by a budget (``BUDGETS``) or a ``--space`` file, and
checked against ``Config`` itself before the first trial, so a typo or an empty range is an
error in seconds rather than a failed night.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dermaclass.config import Config, read_yaml
from dermaclass.errors import ConfigError


@dataclass(frozen=True)
class Param:
    """One searched setting: a float or int range (``log`` scale or not) or a set of choices,
    sampled only ``when`` other searched settings have one of the given values."""

    kind: Literal["float", "int", "choice"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def values_to_check(self) -> list[Any]:
        """The values whose validity ``Config`` must confirm: the ends of a range, every choice."""
        if self.kind == "choice":
            return list(self.choices)
        cast = int if self.kind == "int" else float
        return [cast(self.low), cast(self.high)]


#: The search space: Config fields, their ranges, and when each applies. What the lever screens
#: left open (docs/decisions.md) is searched; what they settled for good (e.g. MixUp, SAM) is not.
SPACE: dict[str, Param] = {
    "recipe": Param("choice", choices=("baseline", "sgdr", "stepwise")),
    "lr": Param("float", 1e-3, 5e-2, log=True),
    "lr_ratio": Param("float", 10.0, 1000.0, log=True),
    "wd": Param("float", 1e-4, 1e-1, log=True),
    "image_size": Param("choice", choices=("96x72", "128x96", "160x120", "192x144")),
    "head_epochs": Param("int", 0, 2),
    "n_cycles": Param("int", 1, 3, when=(("recipe", ("sgdr", "stepwise")),)),
    "epochs": Param("int", 2, 8, when=(("recipe", ("baseline",)),)),
    "lr_rule": Param("choice", choices=("linear", "constant"), when=(("recipe", ("stepwise",)),)),
    "augment": Param("choice", choices=("basic", "zoom")),
    "imbalance": Param("choice", choices=("sampler", "weights", "sqrt-weights")),
    "label_smoothing": Param("float", 0.0, 0.2),
    "colour_constancy": Param("choice", choices=("shades-of-gray", "none")),
}
#: The epoch settings each budget allows (``short``: about the lever screens' 6 minutes a trial
#: on HAM10000 and 2 cores; ``full``: the space as declared, up to the default's 40 minutes).
BUDGETS: dict[str, dict[str, tuple[int, int]]] = {
    "short": {"n_cycles": (1, 1), "epochs": (2, 3), "head_epochs": (0, 1)},
    "full": {},
}


def _config_value(name: str, value: Any) -> Any:
    """A searched value as the Config field takes it (``image_size`` "128x96" -> (128, 96))."""
    if name in ("image_size",) and isinstance(value, str):
        from dermaclass import schedules

        return schedules.parse_size(value)
    return value


def check_space(space: Mapping[str, Param], *, source: str = "the search space") -> None:
    """Refuse, before any trial, a parameter that is not a Config field, an empty range, or a
    value Config would refuse."""
    fields = {f.name for f in dataclasses.fields(Config)}
    for name, p in space.items():
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=1)
            raise ConfigError(
                f"{source}: unknown parameter {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
            )
        if p.kind == "choice" and not p.choices:
            raise ConfigError(f"{source}: {name} has no choices")
        if p.kind != "choice" and (p.low is None or p.high is None or not p.low <= p.high):
            raise ConfigError(f"{source}: {name}: empty range [{p.low}, {p.high}]")
        if p.log and p.kind != "choice" and p.low <= 0:
            raise ConfigError(f"{source}: {name}: a log-scale range must be positive, not from {p.low}")
        for other, _ in p.when:
            if other not in fields:
                raise ConfigError(f"{source}: {name} applies depending on {other!r}, which is not a setting")
        for value in p.values_to_check():
            try:
                Config().replace(**{name: _config_value(name, value)})
            except ConfigError as exc:
                raise ConfigError(f"{source}: {name}={value!r} is not a valid setting ({exc})") from None


def load_space(path: str | Path) -> dict[str, dict[str, Any]]:
    """A ``--space`` YAML file: {parameter: {low, high, log, choices}}, read with clear errors."""
    data = read_yaml(path, file="search-space file", content="the search space")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{path}: expected {{parameter: {{low, high, log, choices}}}}")
    return data


def resolve_space(
    *, budget: str = "short", overrides: Mapping[str, Mapping[str, Any]] | None = None,
    fixed: Iterable[str] = (), source: str = "--space",
) -> dict[str, Param]:  # fmt: skip
    """``SPACE`` narrowed by the ``budget``, changed by ``overrides`` (a ``--space`` file:
    a known parameter's range or choices, or a new parameter with its ``kind``), without the
    ``fixed`` settings; checked (``check_space``)."""
    if budget not in BUDGETS:
        raise ConfigError(f"--budget {budget!r}: choose one of {', '.join(BUDGETS)}")
    space = dict(SPACE)
    for name, (lo, hi) in BUDGETS[budget].items():
        space[name] = dataclasses.replace(space[name], low=lo, high=hi)
    allowed = {f.name for f in dataclasses.fields(Param)}
    for name, change in (overrides or {}).items():
        unknown = set(change) - allowed
        if unknown:
            raise ConfigError(f"{source}: {name}: unknown keys {sorted(unknown)}; use {sorted(allowed - {'when'})}")
        change = {k: tuple(v) if k == "choices" else v for k, v in change.items()}
        if name in space:
            space[name] = dataclasses.replace(space[name], **change)
        else:
            if "kind" not in change:
                change["kind"] = "choice" if "choices" in change else "float"
            space[name] = Param(**change)
    for name in fixed:  # a condition on a fixed setting reads the setting (``sample``)
        space.pop(name, None)
    check_space(space, source=source)
    return space


def sample(trial: Any, space: Mapping[str, Param], base: Config) -> dict[str, Any]:
    """One trial's settings (define-by-run: a conditional parameter only when it applies; a
    fixed setting it depends on is read from ``base``)."""
    chosen: dict[str, Any] = {}
    for name, p in space.items():
        if any(chosen.get(other, getattr(base, other)) not in values for other, values in p.when):
            continue
        if p.kind == "choice":
            chosen[name] = trial.suggest_categorical(name, list(p.choices))
        elif p.kind == "int":
            chosen[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
        else:
            chosen[name] = trial.suggest_float(name, float(p.low), float(p.high), log=p.log)
    return chosen


def trial_config(base: Config, params: Mapping[str, Any]) -> Config:
    """The configuration a trial trains with: ``base`` with the sampled settings."""
    return base.replace(**{k: _config_value(k, v) for k, v in params.items()})
