"""A validated sweep (:class:`SweepSpec`) and its searched knobs (:class:`Parameter`).

The loader (``space``) builds these; the scheduler strategies, the trainables, the driver and
the summary only read them. They sit below all of those, so none of them needs the loader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mirror.train.spec import RunSpec, build_run_spec
from mirror.tune.fields import plain

SPACE_FIELDS: dict[str, tuple[str, ...]] = {
    "choice": ("values",),  # one value per trial, sampled uniformly
    "grid": ("values",),  # every value, times `samples` (Tune's grid_search)
    "uniform": ("low", "high"),  # float in [low, high]
    "loguniform": ("low", "high"),  # float, uniform in log space; 0 < low < high
    "randint": ("low", "high"),  # int in [low, high), as in tune.randint
}
SEARCH_OPTIONS: dict[str, tuple[str, ...]] = {"random": ("seed",), "optuna": ("seed",)}


@dataclass(frozen=True)
class Parameter:
    """One searched knob: a dotted config key (``model.lam``) or ``model`` itself."""

    key: str
    space: str
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None

    @property
    def log_scale(self) -> bool:
        return self.space == "loguniform"

    def domain(self) -> Any:
        """The Ray Tune search domain for this knob."""
        from ray import tune

        if self.space == "choice":
            return tune.choice(list(self.values))
        if self.space == "grid":
            return tune.grid_search(list(self.values))
        if self.space == "uniform":
            return tune.uniform(self.low, self.high)
        if self.space == "loguniform":
            return tune.loguniform(self.low, self.high)
        return tune.randint(int(self.low), int(self.high))

    def probes(self) -> tuple[Any, ...]:
        """Values that stand for the whole space when type- and rule-checking it."""
        if self.space in ("choice", "grid"):
            return self.values
        if self.space == "randint":
            return (int(self.low), int(self.high) - 1)
        return (float(self.low), float(self.high))

    def describe(self) -> str:
        if self.values:
            return f"{self.space}{list(self.values)}"
        return f"{self.space}[{self.low}, {self.high}]"


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep. ``fixed`` holds dotted overrides for every trial, resources included."""

    source: str
    name: str
    models: tuple[str, ...]  # one model, or the values of the ``model`` grid
    data: str | None
    fixed: dict[str, Any]
    parameters: tuple[Parameter, ...]
    metric: str
    mode: str
    scheduler: str  # a key of mirror.tune.schedulers.SCHEDULERS
    scheduler_options: dict[str, Any]
    search: str
    seed: int
    samples: int
    concurrency: int
    max_failures: int
    evaluate: str
    description: str = ""
    upstream_run: str | None = None  # MLflow run of the first stage, for second-stage models
    raw_text: str = field(default="", repr=False)  # the file as written, logged as an artifact

    @property
    def model_parameter(self) -> Parameter | None:
        return next((p for p in self.parameters if p.key == "model"), None)

    @property
    def config_parameters(self) -> tuple[Parameter, ...]:
        return tuple(p for p in self.parameters if p.key != "model")

    def param_space(self) -> dict[str, Any]:
        """Tune's ``param_space``: dotted keys to domains (flat, so Optuna sees plain names)."""
        return {p.key: p.domain() for p in self.parameters}

    def trial_spec(self, config: Mapping[str, Any], data: str, run_name: str) -> RunSpec:
        """The full run spec of one trial: fixed overrides plus the sampled knobs."""
        model = config.get("model", self.models[0])
        knobs = {k: plain(v) for k, v in config.items() if k != "model"}
        return build_run_spec(
            str(model), data, run_name, {**self.fixed, **knobs}, upstream_run=self.upstream_run
        )

    def base_spec(self, data: str = ".") -> RunSpec:
        """The first model's spec with fixed overrides only (epochs, resources, storage)."""
        return build_run_spec(
            self.models[0], data, self.name, dict(self.fixed), upstream_run=self.upstream_run
        )
