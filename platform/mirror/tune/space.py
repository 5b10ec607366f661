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
* each scheduler checks its own options and the search algorithms it accepts
  (``mirror.tune.schedulers``); with ``pbt``, every knob PBT perturbs must leave the model's
  parameter shapes alone, which is checked by building the model at the knob's extremes
  (``mirror.tune.pbt``).

``SpaceError``, ``Parameter`` and ``SweepSpec`` live in lower modules (``fields``, ``spec``)
so that schedulers, trainables and the driver need not import the loader; they are
re-exported here for callers of :func:`load_sweep`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from mirror.guards import GuardError, check_sweep_metric
from mirror.models import MODELS
from mirror.train.spec import RunSpec, build_run_spec
from mirror.tune.fields import (
    SpaceError,
    parse_yaml,
    read_int,
    read_mapping,
    read_number,
    read_string,
    reject_unknown,
)
from mirror.tune.schedulers import SCHEDULERS
from mirror.tune.spec import SEARCH_OPTIONS, SPACE_FIELDS, Parameter, SweepSpec

__all__ = ["SEARCH_OPTIONS", "SPACE_FIELDS", "Parameter", "SpaceError", "SweepSpec", "load_sweep"]

EVALUATE = ("best", "all", "none")  # which trials get the end-of-run evaluation
RESOURCE_KEYS = {
    "workers": "train.workers",
    "cpus_per_worker": "train.cpus_per_worker",
    "gpu": "train.use_gpu",
}
TOP_LEVEL = (
    "name", "description", "model", "data", "fixed", "parameters", "metric", "mode",
    "scheduler", "search", "samples", "concurrency", "resources", "max_failures", "evaluate",
    "upstream_run",
)  # fmt: skip
METRIC_PATTERN = re.compile(r"^(val|train)/[A-Za-z0-9_./-]+$")  # reported every epoch
VALIDATION_SAMPLES = 16  # random combinations checked for cross-field rules


def load_sweep(
    path: str | Path,
    *,
    data: str | None = None,
    samples: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    resources: Mapping[str, Any] | None = None,
    upstream_run: str | None = None,
) -> SweepSpec:
    """Read and validate ``path``. Command-line values (``--data``, ``--samples``, ``--set``
    pairs as ``overrides``, ``--workers``/``--gpu``/``--cpus-per-worker`` as ``resources``,
    ``--upstream-run``) are merged in before validation, so they get the same checks as the
    file."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpaceError(f"{where}: cannot read the sweep file ({err.strerror})") from None
    raw = parse_yaml(where, text)
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: expected a mapping of sweep settings, got {type(raw).__name__}")
    reject_unknown(where, "top-level key", raw, TOP_LEVEL)

    raw = dict(raw)
    if data is not None:
        raw["data"] = data
    if samples is not None:
        raw["samples"] = samples
    if upstream_run is not None:
        raw["upstream_run"] = upstream_run
    res = dict(read_mapping(where, "resources", raw.get("resources") or {}))
    reject_unknown(where, "resources key", res, tuple(RESOURCE_KEYS))
    res.update({k: v for k, v in (resources or {}).items() if v is not None})
    fixed = dict(read_mapping(where, "fixed", raw.get("fixed") or {}))
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
        name=read_string(where, "name", raw.get("name", path.stem)),
        models=models,
        data=None if raw.get("data") is None else read_string(where, "data", raw["data"]),
        fixed=fixed,
        parameters=parameters,
        metric=read_string(where, "metric", raw.get("metric")),
        mode=read_string(where, "mode", raw.get("mode")),
        scheduler="fifo",
        scheduler_options={},
        search="random",
        seed=0,
        samples=read_int(where, "samples", raw.get("samples", 1), minimum=1),
        concurrency=read_int(where, "concurrency", raw.get("concurrency", 1), minimum=1),
        max_failures=read_int(where, "max_failures", raw.get("max_failures", 1), minimum=0),
        evaluate=read_string(where, "evaluate", raw.get("evaluate", "best")),
        description=str(raw.get("description", "")),
        upstream_run=None if raw.get("upstream_run") is None else read_string(where, "upstream_run", raw["upstream_run"]),
        raw_text=text,
    )
    scheduler, scheduler_options = _named_options(
        where,
        "scheduler",
        raw.get("scheduler", "asha"),
        {name: strategy.options for name, strategy in SCHEDULERS.items()},
    )
    search, search_options = _named_options(
        where, "search", raw.get("search", "random"), SEARCH_OPTIONS
    )
    spec = replace(
        spec,
        scheduler=scheduler,
        scheduler_options=scheduler_options,
        search=search,
        seed=read_int(where, "search.seed", search_options.get("seed", 0), minimum=0),
    )
    _check(spec)
    # The scheduler's own rules: the searches it accepts, then its options (PBT also resolves
    # ``mutate`` and its default concurrency here).
    strategy = SCHEDULERS[spec.scheduler]
    if spec.search not in strategy.searches:
        raise SpaceError(f"{where}: search: {strategy.search_refusal}, received {spec.search!r}")
    return strategy.check(spec, "concurrency" in raw)


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
    try:  # a metric no trial reports would fail every trial after its first epoch
        check_sweep_metric(where, spec.metric, spec.models)
    except GuardError as err:
        raise SpaceError(str(err)) from None
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
            _validate(spec.upstream_run, where, label, model, {key: value}, suffix)
        _validate(spec.upstream_run, where, "fixed", model, spec.fixed, suffix)
        for param in spec.config_parameters:
            if param.key.partition(".")[0] not in ("model", "view", "train"):
                raise SpaceError(
                    f"{where}: parameters.{param.key}: keys must start with 'model.', 'view.' or "
                    "'train.' (e.g. model.latent_dim, view.mask_rate, train.batch_size), or be "
                    "'model' for a model grid"
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
                    spec.upstream_run,
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
                spec.upstream_run, where, f"parameters (combination {combo})", model,
                {**spec.fixed, **combo}, suffix,
            )  # fmt: skip


def _validate(
    upstream_run: str | None, where: str, what: str, model: str, overrides: dict[str, Any], suffix: str
) -> RunSpec:
    try:
        return build_run_spec(model, ".", "validate", overrides, upstream_run=upstream_run)
    except (ValueError, TypeError) as err:
        raise SpaceError(f"{where}: {what}: {err}{suffix}") from None


# --------------------------------------------------------------------------------------------
# Parsing helpers: each names the key it is parsing.


def _parse_parameters(where: str, raw: Any) -> tuple[Parameter, ...]:
    raw = read_mapping(where, "parameters", raw if raw is not None else {})
    params: list[Parameter] = []
    for key, body in raw.items():
        at = f"parameters.{key}"
        body = read_mapping(where, at, body)
        space = body.get("space")
        if space not in SPACE_FIELDS:
            raise SpaceError(
                f"{where}: {at}.space: expected one of {list(SPACE_FIELDS)}, received {space!r}"
            )
        needed = SPACE_FIELDS[space]
        reject_unknown(where, f"{at} field (space {space!r})", body, ("space", *needed))
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
        low = read_number(where, f"{at}.low", body["low"])
        high = read_number(where, f"{at}.high", body["high"])
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
    body = {"type": raw} if isinstance(raw, str) else dict(read_mapping(where, key, raw))
    kind = body.pop("type", None)
    if kind not in table:
        raise SpaceError(f"{where}: {key}.type: expected one of {list(table)}, received {kind!r}")
    reject_unknown(where, f"{key} option for {kind!r}", body, table[kind])
    return kind, body
