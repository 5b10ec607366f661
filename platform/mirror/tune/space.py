"""Sweep definitions (``search_spaces/*.yaml``): load, validate, and turn into Tune objects.

A sweep file names the model (or a grid of models), the dataset, fixed overrides, the searched
parameters, the metric, scheduler, search algorithm, sample count, concurrency and per-trial
resources (format: ``search_spaces/README.md``). Everything is checked at load, before Ray
starts, and every error names the file, the key and what is wrong:

* top-level keys, parameter fields, scheduler and search options come from closed sets;
* a parameter key must be a real config field of *every* model it applies to: each candidate
  value (choices, or the ends of a range) is pushed through :func:`build_run_spec`, so a typo,
  a float for an int field or a value outside a field's rule fails here, with the model's own
  message (``WAEConfig.lam: expected a float >= 0, received -1.0``);
* a handful of seeded random combinations are validated too, for cross-field rules;
* nothing is rewritten silently: conflicting settings are errors, not precedence rules;
* with ``pbt``, every knob PBT perturbs must leave the model's parameter shapes alone, which
  is checked by building the model at the knob's extremes (``mirror.tune.pbt``).
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from mirror.models import MODELS
from mirror.train.spec import RunSpec, build_run_spec

SPACE_FIELDS: dict[str, tuple[str, ...]] = {
    "choice": ("values",),  # one value per trial, sampled uniformly
    "grid": ("values",),  # every value, times `samples` (Tune's grid_search)
    "uniform": ("low", "high"),  # float in [low, high]
    "loguniform": ("low", "high"),  # float, uniform in log space; 0 < low < high
    "randint": ("low", "high"),  # int in [low, high), as in tune.randint
}
SCHEDULER_OPTIONS: dict[str, tuple[str, ...]] = {
    "asha": ("grace_period", "reduction_factor", "max_t"),  # early stopping, in epochs
    "fifo": (),  # run every trial to the end
    "pbt": (  # population-based training (mirror.tune.pbt); intervals in epochs
        "perturbation_interval",
        "burn_in",
        "quantile_fraction",
        "resample_probability",
        "synch",
        "mutate",
    ),  # fmt: skip
}
SEARCH_OPTIONS: dict[str, tuple[str, ...]] = {"random": ("seed",), "optuna": ("seed",)}
EVALUATE = ("best", "all", "none")  # which trials get the end-of-run evaluation
RESOURCE_KEYS = {
    "workers": "train.workers",
    "cpus_per_worker": "train.cpus_per_worker",
    "gpu": "train.use_gpu",
}
TOP_LEVEL = (
    "name", "description", "model", "data", "fixed", "parameters", "metric", "mode",
    "scheduler", "search", "samples", "concurrency", "resources", "max_failures", "evaluate",
)  # fmt: skip
METRIC_PATTERN = re.compile(r"^(val|train)/[A-Za-z0-9_./-]+$")  # reported every epoch
VALIDATION_SAMPLES = 16  # random combinations checked for cross-field rules


class SpaceError(ValueError):
    """A sweep file that cannot run; the message names the file, the key and the rule."""


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
    scheduler: str
    scheduler_options: dict[str, Any]
    search: str
    seed: int
    samples: int
    concurrency: int
    max_failures: int
    evaluate: str
    description: str = ""
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
        knobs = {k: _plain(v) for k, v in config.items() if k != "model"}
        return build_run_spec(str(model), data, run_name, {**self.fixed, **knobs})

    def base_spec(self, data: str = ".") -> RunSpec:
        """The first model's spec with fixed overrides only (epochs, resources, storage)."""
        return build_run_spec(self.models[0], data, self.name, dict(self.fixed))


def load_sweep(
    path: str | Path,
    *,
    data: str | None = None,
    samples: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    resources: Mapping[str, Any] | None = None,
) -> SweepSpec:
    """Read and validate ``path``. Command-line values (``--data``, ``--samples``, ``--set``
    pairs as ``overrides``, ``--workers``/``--gpu``/``--cpus-per-worker`` as ``resources``)
    are merged in before validation, so they get the same checks as the file."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpaceError(f"{where}: cannot read the sweep file ({err.strerror})") from None
    try:
        raw = yaml.load(text, Loader=_SweepLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise SpaceError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: expected a mapping of sweep settings, got {type(raw).__name__}")
    _reject_unknown(where, "top-level key", raw, TOP_LEVEL)

    raw = dict(raw)
    if data is not None:
        raw["data"] = data
    if samples is not None:
        raw["samples"] = samples
    res = dict(_mapping(where, "resources", raw.get("resources") or {}))
    _reject_unknown(where, "resources key", res, tuple(RESOURCE_KEYS))
    res.update({k: v for k, v in (resources or {}).items() if v is not None})
    fixed = dict(_mapping(where, "fixed", raw.get("fixed") or {}))
    for key in overrides or {}:
        if key in RESOURCE_KEYS.values():
            flag = next(f for f, k in RESOURCE_KEYS.items() if k == key)
            raise SpaceError(f"--set {key}: set trial resources with --{flag.replace('_', '-')}")
    fixed.update(overrides or {})
    for key in fixed:
        if key in RESOURCE_KEYS.values():
            res_key = next(f for f, k in RESOURCE_KEYS.items() if k == key)
            raise SpaceError(
                f"{where}: fixed.{key}: per-trial resources belong in 'resources' "
                f"(resources.{res_key}), where they also set the sweep's concurrency"
            )
    fixed.update({RESOURCE_KEYS[k]: v for k, v in res.items()})

    parameters = _parse_parameters(where, raw.get("parameters"))
    models = _parse_models(where, raw.get("model"), parameters)
    spec = SweepSpec(
        source=where,
        name=_string(where, "name", raw.get("name", path.stem)),
        models=models,
        data=None if raw.get("data") is None else _string(where, "data", raw["data"]),
        fixed=fixed,
        parameters=parameters,
        metric=_string(where, "metric", raw.get("metric")),
        mode=_string(where, "mode", raw.get("mode")),
        scheduler="fifo",
        scheduler_options={},
        search="random",
        seed=0,
        samples=_int(where, "samples", raw.get("samples", 1), minimum=1),
        concurrency=_int(where, "concurrency", raw.get("concurrency", 1), minimum=1),
        max_failures=_int(where, "max_failures", raw.get("max_failures", 1), minimum=0),
        evaluate=_string(where, "evaluate", raw.get("evaluate", "best")),
        description=str(raw.get("description", "")),
        raw_text=text,
    )
    scheduler, scheduler_options = _named_options(
        where, "scheduler", raw.get("scheduler", "asha"), SCHEDULER_OPTIONS
    )
    search, search_options = _named_options(
        where, "search", raw.get("search", "random"), SEARCH_OPTIONS
    )
    spec = replace(
        spec,
        scheduler=scheduler,
        scheduler_options=scheduler_options,
        search=search,
        seed=_int(where, "search.seed", search_options.get("seed", 0), minimum=0),
    )
    _check(spec)
    if spec.scheduler == "pbt":
        spec = _check_pbt(spec, concurrency_given="concurrency" in raw)
    return spec


# --------------------------------------------------------------------------------------------
# Checks against the real configs and between settings.


def _check(spec: SweepSpec) -> None:
    where = spec.source
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", spec.name):
        raise SpaceError(
            f"{where}: name: expected letters, digits, '_', '.', '-', received {spec.name!r}"
        )
    if spec.mode not in ("min", "max"):
        raise SpaceError(f"{where}: mode: expected 'min' or 'max', received {spec.mode!r}")
    if not METRIC_PATTERN.match(spec.metric):
        raise SpaceError(
            f"{where}: metric: expected a per-epoch metric named 'val/<name>' or 'train/<name>' "
            f"(e.g. val/loss), received {spec.metric!r}"
        )
    if spec.evaluate not in EVALUATE:
        raise SpaceError(
            f"{where}: evaluate: expected one of {list(EVALUATE)}, received {spec.evaluate!r}"
        )
    grids = [p.key for p in spec.parameters if p.space == "grid"]
    if spec.search == "optuna" and grids:
        raise SpaceError(
            f"{where}: parameters.{grids[0]}: space 'grid' cannot be used with search 'optuna' "
            "(Optuna samples; use 'choice', or search 'random')"
        )

    mixed = len(spec.models) > 1
    for model in spec.models:
        suffix = (
            f" (for model {model!r}: a key must be valid for every model in the grid)"
            if mixed
            else ""
        )
        for key, value in spec.fixed.items():  # one at a time, so the error names the key
            label = next(
                (f"resources.{r}" for r, k in RESOURCE_KEYS.items() if k == key), f"fixed.{key}"
            )
            _validate(where, label, model, {key: value}, suffix)
        base = _validate(where, "fixed", model, spec.fixed, suffix)
        for param in spec.config_parameters:
            if param.key.partition(".")[0] not in ("model", "train"):
                raise SpaceError(
                    f"{where}: parameters.{param.key}: keys must start with 'model.' or 'train.' "
                    "(e.g. model.latent_dim, train.batch_size), or be 'model' for a model grid"
                )
            if param.key in RESOURCE_KEYS.values():
                raise SpaceError(
                    f"{where}: parameters.{param.key}: resources cannot be searched; they fix "
                    "each trial's size and the sweep's concurrency"
                )
            if param.key in spec.fixed:
                raise SpaceError(
                    f"{where}: parameters.{param.key}: also set as a fixed value (fixed or --set); "
                    "remove one of them"
                )
            for value in param.probes():
                _validate(
                    where,
                    f"parameters.{param.key}",
                    model,
                    {**spec.fixed, param.key: value},
                    suffix,
                )
        rng = random.Random(spec.seed)
        for _ in range(VALIDATION_SAMPLES if spec.config_parameters else 0):
            combo = {p.key: rng.choice(p.probes()) for p in spec.config_parameters}
            _validate(
                where, f"parameters (combination {combo})", model, {**spec.fixed, **combo}, suffix
            )
        if spec.scheduler == "asha":
            _check_asha(where, spec.scheduler_options, base.train.epochs)


def _check_pbt(spec: SweepSpec, concurrency_given: bool) -> SweepSpec:
    """PBT's options, with ``mutate`` resolved to the knobs PBT perturbs: the listed ones, each
    checked to be perturbable, or by default every searched knob that is."""
    from mirror.tune.pbt import mutation_problem

    where, opts = spec.source, dict(spec.scheduler_options)
    epochs = spec.base_spec().train.epochs
    if spec.search != "random":
        raise SpaceError(
            f"{where}: search: PBT explores by perturbing its own population; use search "
            f"'random' (it draws the starting population), received {spec.search!r}"
        )
    if spec.samples < 2:
        raise SpaceError(
            f"{where}: samples: PBT needs a population of at least 2 trials, received {spec.samples}"
        )
    interval = _int(
        where, "scheduler.perturbation_interval", opts.get("perturbation_interval", 1), minimum=1
    )
    if interval >= epochs:
        raise SpaceError(
            f"{where}: scheduler.perturbation_interval: expected fewer epochs than the run's "
            f"{epochs} (train.epochs), or PBT never perturbs; received {interval}"
        )
    _int(where, "scheduler.burn_in", opts.get("burn_in", 0), minimum=0)
    quantile = _number(where, "scheduler.quantile_fraction", opts.get("quantile_fraction", 0.25))
    if not 0 < quantile <= 0.5:
        raise SpaceError(
            f"{where}: scheduler.quantile_fraction: expected a number in (0, 0.5], received {quantile!r}"
        )
    resample = _number(
        where, "scheduler.resample_probability", opts.get("resample_probability", 0.25)
    )
    if not 0 <= resample <= 1:
        raise SpaceError(
            f"{where}: scheduler.resample_probability: expected a number in [0, 1], received {resample!r}"
        )
    if not isinstance(opts.get("synch", True), bool):
        raise SpaceError(
            f"{where}: scheduler.synch: expected true or false, received {opts['synch']!r}"
        )

    searched = {p.key: p for p in spec.parameters}
    if "train.epochs" in searched:
        raise SpaceError(
            f"{where}: parameters.train.epochs: PBT compares members epoch by epoch, so all of "
            "them train the same number of epochs; set it in 'fixed'"
        )
    listed = opts.get("mutate")
    if listed is not None:
        if (
            not isinstance(listed, list)
            or not listed
            or not all(isinstance(k, str) for k in listed)
        ):
            raise SpaceError(
                f"{where}: scheduler.mutate: expected a non-empty list of parameter keys, received {listed!r}"
            )
        for key in listed:
            if key not in searched:
                close = difflib.get_close_matches(key, list(searched), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SpaceError(
                    f"{where}: scheduler.mutate: {key!r} is not a searched parameter{hint}; "
                    f"searched: {', '.join(searched)}"
                )
    problems = {  # builds models, so only for the knobs that could be perturbed
        key: problem
        for key in (listed if listed is not None else searched)
        for model in spec.models
        if (problem := mutation_problem(model, key, searched[key].probes(), spec.fixed)) is not None
    }
    if listed is not None:
        for key in listed:
            if key in problems:
                raise SpaceError(
                    f"{where}: scheduler.mutate: PBT cannot perturb {key}: {problems[key]}"
                )
        mutate = tuple(listed)
    else:
        mutate = tuple(key for key in searched if key not in problems)
        if not mutate:
            raise SpaceError(
                f"{where}: scheduler: PBT has no parameter it can perturb: "
                + "; ".join(f"{k}: {v}" for k, v in problems.items())
            )
    return replace(
        spec,
        scheduler_options={**opts, "mutate": mutate},
        # members training at once (the rest wait their turn, live); default: all of them
        concurrency=spec.concurrency if concurrency_given else spec.samples,
    )


def _validate(where: str, what: str, model: str, overrides: dict[str, Any], suffix: str) -> RunSpec:
    try:
        return build_run_spec(model, ".", "validate", overrides)
    except (ValueError, TypeError) as err:
        raise SpaceError(f"{where}: {what}: {err}{suffix}") from None


def _check_asha(where: str, options: dict[str, Any], epochs: int) -> None:
    grace = _int(where, "scheduler.grace_period", options.get("grace_period", 1), minimum=1)
    max_t = _int(where, "scheduler.max_t", options.get("max_t", epochs), minimum=1)
    factor = _number(where, "scheduler.reduction_factor", options.get("reduction_factor", 2))
    if factor <= 1:
        raise SpaceError(
            f"{where}: scheduler.reduction_factor: expected a number > 1, received {factor!r}"
        )
    if grace > max_t:
        raise SpaceError(
            f"{where}: scheduler.grace_period: expected <= max_t ({max_t} epochs), received {grace}"
        )


# --------------------------------------------------------------------------------------------
# Parsing helpers: each names the key it is parsing.


def _parse_parameters(where: str, raw: Any) -> tuple[Parameter, ...]:
    raw = _mapping(where, "parameters", raw if raw is not None else {})
    params: list[Parameter] = []
    for key, body in raw.items():
        at = f"parameters.{key}"
        body = _mapping(where, at, body)
        space = body.get("space")
        if space not in SPACE_FIELDS:
            raise SpaceError(
                f"{where}: {at}.space: expected one of {list(SPACE_FIELDS)}, received {space!r}"
            )
        needed = SPACE_FIELDS[space]
        _reject_unknown(where, f"{at} field (space {space!r})", body, ("space", *needed))
        missing = [n for n in needed if n not in body]
        if missing:
            raise SpaceError(
                f"{where}: {at}: space {space!r} needs {', '.join(needed)}; missing {', '.join(missing)}"
            )
        if "values" in needed:
            values = body["values"]
            if not isinstance(values, list) or not values:
                raise SpaceError(
                    f"{where}: {at}.values: expected a non-empty list, received {values!r}"
                )
            if len({repr(v) for v in values}) != len(values):
                raise SpaceError(f"{where}: {at}.values: duplicate values in {values!r}")
            params.append(Parameter(key, space, values=tuple(values)))
            continue
        low = _number(where, f"{at}.low", body["low"])
        high = _number(where, f"{at}.high", body["high"])
        if space == "randint" and not (
            isinstance(body["low"], int) and isinstance(body["high"], int)
        ):
            raise SpaceError(
                f"{where}: {at}: randint needs integer low and high, received {low!r}, {high!r}"
            )
        if not low < high:
            raise SpaceError(
                f"{where}: {at}: expected low < high, received low={low!r}, high={high!r}"
            )
        if space == "loguniform" and low <= 0:
            raise SpaceError(f"{where}: {at}.low: loguniform needs low > 0, received {low!r}")
        params.append(Parameter(key, space, low=low, high=high))
    return tuple(params)


def _parse_models(where: str, model: Any, parameters: tuple[Parameter, ...]) -> tuple[str, ...]:
    grid = next((p for p in parameters if p.key == "model"), None)
    if grid is not None:
        if model is not None:
            raise SpaceError(
                f"{where}: model: given both as 'model' and as parameters.model; keep one"
            )
        if grid.space not in ("grid", "choice"):
            raise SpaceError(
                f"{where}: parameters.model.space: expected 'grid' or 'choice', received {grid.space!r}"
            )
        names = grid.values
    elif model is None:
        raise SpaceError(
            f"{where}: model: missing; name a model ({', '.join(sorted(MODELS))}) or grid over 'model'"
        )
    else:
        names = (model,)
    for name in names:
        if name not in MODELS:
            raise SpaceError(
                f"{where}: model: unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}"
            )
    return tuple(names)


def _named_options(
    where: str, key: str, raw: Any, table: dict[str, tuple[str, ...]]
) -> tuple[str, dict[str, Any]]:
    """``asha`` or ``{type: asha, grace_period: 1}`` -> ("asha", {"grace_period": 1})."""
    body = {"type": raw} if isinstance(raw, str) else dict(_mapping(where, key, raw))
    kind = body.pop("type", None)
    if kind not in table:
        raise SpaceError(f"{where}: {key}.type: expected one of {list(table)}, received {kind!r}")
    _reject_unknown(where, f"{key} option for {kind!r}", body, table[kind])
    return kind, body


def _reject_unknown(where: str, what: str, raw: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    for key in raw:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            listed = ", ".join(valid) if valid else "none"
            raise SpaceError(f"{where}: unknown {what} {key!r}{hint}; valid: {listed}")


def _mapping(where: str, key: str, raw: Any) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise SpaceError(
            f"{where}: {key}: expected a mapping, received {type(raw).__name__} {raw!r}"
        )
    return raw


def _string(where: str, key: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise SpaceError(f"{where}: {key}: expected a non-empty string, received {raw!r}")
    return raw


def _int(where: str, key: str, raw: Any, minimum: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
        raise SpaceError(f"{where}: {key}: expected an int >= {minimum}, received {raw!r}")
    return raw


def _number(where: str, key: str, raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise SpaceError(
            f"{where}: {key}: expected a number, received {type(raw).__name__} {raw!r}"
        )
    return raw


def _plain(value: Any) -> Any:
    """NumPy scalars from Tune's samplers as Python scalars (for params and run specs)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, str | bytes) else value


class _SweepLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``) and refuses
    duplicate keys, which PyYAML would otherwise resolve silently to the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_SweepLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
