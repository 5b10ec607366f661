"""Sweep files: the shipped ones load, malformed ones fail naming the key and the rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mirror.tune.space import SpaceError, load_sweep

ROOT = Path(__file__).resolve().parents[1]


def base_sweep() -> dict[str, Any]:
    return {
        "model": "wae",
        "data": "data/demo",
        "fixed": {"train.epochs": 2},
        "parameters": {
            "model.latent_dim": {"space": "choice", "values": [16, 32]},
            "model.lam": {"space": "loguniform", "low": 0.1, "high": 10.0},
        },
        "metric": "val/loss",
        "mode": "min",
        "scheduler": "asha",
        "samples": 2,
    }


def write(tmp_path: Path, raw: dict[str, Any] | str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return path


def error_of(tmp_path: Path, raw: dict[str, Any] | str, **kwargs: Any) -> str:
    with pytest.raises(SpaceError) as info:
        load_sweep(write(tmp_path, raw), **kwargs)
    return str(info.value)


def test_shipped_wae_ablation_searches_the_issue_knobs():
    spec = load_sweep(ROOT / "search_spaces" / "wae_ablation.yaml")
    params = {p.key: p for p in spec.parameters}
    assert spec.models == ("wae",)
    assert params["model.latent_dim"].values == (16, 32, 64, 128)
    for key in ("model.lam", "model.lr", "model.critic_lr"):
        assert params[key].space == "loguniform"
    assert params["model.n_heads"].space == "choice"
    # Reconstruction and latent fit together: val/loss alone would select λ -> 0.
    assert (spec.scheduler, spec.metric, spec.mode) == ("asha", "val/loss_plus_mmd", "min")


def test_shipped_ae_vs_wae_has_the_model_as_a_grid_dimension():
    spec = load_sweep(ROOT / "search_spaces" / "ae_vs_wae.yaml")
    assert spec.models == ("ae", "wae")
    assert spec.model_parameter is not None and spec.model_parameter.space == "grid"
    assert spec.param_space()["model"] == {"grid_search": ["ae", "wae"]}


def test_every_shipped_space_file_names_a_registered_model():
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        try:
            load_sweep(path)  # raises on a model that is not in the registry
        except SpaceError as err:  # a second stage's file loads only with its first stage
            assert "is a second stage: pass --upstream-run" in str(err), (path, err)


def test_unknown_top_level_key_is_named_with_a_suggestion(tmp_path):
    raw = base_sweep() | {"sheduler": "asha"}
    message = error_of(tmp_path, raw)
    assert (
        "sweep.yaml" in message
        and "'sheduler'" in message
        and "did you mean 'scheduler'" in message
    )


def test_parameter_must_be_a_real_config_field(tmp_path):
    raw = base_sweep()
    raw["parameters"]["model.latnt_dim"] = {"space": "choice", "values": [8]}
    message = error_of(tmp_path, raw)
    assert "parameters.model.latnt_dim" in message and "unknown key" in message
    assert "latent_dim" in message  # the model config's own suggestion


def test_model_grid_key_must_exist_for_every_model(tmp_path):
    raw = base_sweep()
    del raw["model"]
    raw["parameters"]["model"] = {"space": "grid", "values": ["ae", "wae"]}
    message = error_of(tmp_path, raw)  # lam is a WAE field, not an AE one
    assert "parameters.model.lam" in message and "model 'ae'" in message


def test_float_range_on_an_int_field_is_refused(tmp_path):
    raw = base_sweep()
    raw["parameters"]["model.latent_dim"] = {"space": "uniform", "low": 16, "high": 64}
    message = error_of(tmp_path, raw)
    assert "parameters.model.latent_dim" in message and "expected int" in message


def test_value_outside_the_field_rule_is_refused(tmp_path):
    raw = base_sweep()
    raw["parameters"]["model.lam"] = {"space": "choice", "values": [1.0, -1.0]}
    message = error_of(tmp_path, raw)
    assert "parameters.model.lam" in message and "-1.0" in message


def test_unknown_space_type_and_missing_fields(tmp_path):
    raw = base_sweep()
    raw["parameters"]["model.lam"] = {"space": "normal", "low": 1.0, "high": 2.0}
    assert "parameters.model.lam.space" in error_of(tmp_path, raw)
    raw["parameters"]["model.lam"] = {"space": "loguniform", "low": 1.0}
    assert "missing high" in error_of(tmp_path, raw)
    raw["parameters"]["model.lam"] = {"space": "loguniform", "low": 1.0, "high": 2.0, "q": 1}
    assert "unknown parameters.model.lam field" in error_of(tmp_path, raw)


def test_ranges_are_checked(tmp_path):
    raw = base_sweep()
    raw["parameters"]["model.lam"] = {"space": "loguniform", "low": 0.0, "high": 2.0}
    assert "loguniform needs low > 0" in error_of(tmp_path, raw)
    raw["parameters"]["model.lam"] = {"space": "uniform", "low": 3.0, "high": 2.0}
    assert "low < high" in error_of(tmp_path, raw)
    raw["parameters"]["model.n_heads"] = {"space": "randint", "low": 1.5, "high": 4}
    del raw["parameters"]["model.lam"]
    assert "randint needs integer" in error_of(tmp_path, raw)


def test_grid_cannot_be_used_with_optuna(tmp_path):
    raw = base_sweep() | {"search": {"type": "optuna"}}
    raw["parameters"]["model.latent_dim"] = {"space": "grid", "values": [16, 32]}
    message = error_of(tmp_path, raw)
    assert "parameters.model.latent_dim" in message and "optuna" in message


def test_scheduler_and_search_options_are_closed_sets(tmp_path):
    assert "scheduler.type" in error_of(tmp_path, base_sweep() | {"scheduler": "hyperband"})
    message = error_of(tmp_path, base_sweep() | {"scheduler": {"type": "asha", "grace": 1}})
    assert "'grace'" in message and "grace_period" in message
    message = error_of(tmp_path, base_sweep() | {"scheduler": {"type": "asha", "grace_period": 5}})
    assert "scheduler.grace_period" in message and "max_t" in message
    assert "search.type" in error_of(tmp_path, base_sweep() | {"search": "bayes"})


def test_shipped_wae_pbt_perturbs_only_shape_preserving_knobs():
    spec = load_sweep(ROOT / "search_spaces" / "wae_pbt.yaml")
    assert spec.scheduler == "pbt" and spec.search == "random"
    assert spec.scheduler_options["mutate"] == ("model.lam", "model.lr", "model.critic_lr")
    assert spec.concurrency == spec.samples == 8  # the whole population may train at once
    assert (spec.metric, spec.mode) == ("val/loss_plus_mmd", "min")


def pbt_sweep(**scheduler: Any) -> dict[str, Any]:
    raw = base_sweep() | {"scheduler": {"type": "pbt", **scheduler}}
    raw["fixed"] = {"train.epochs": 4}
    return raw


def test_pbt_mutates_every_perturbable_knob_by_default(tmp_path):
    spec = load_sweep(write(tmp_path, pbt_sweep()))
    assert spec.scheduler_options["mutate"] == ("model.lam",)  # latent_dim changes shapes


def test_pbt_refuses_knobs_that_change_parameter_shapes(tmp_path):
    message = error_of(tmp_path, pbt_sweep(mutate=["model.latent_dim"]))
    assert "scheduler.mutate" in message and "model.latent_dim" in message
    assert "shape" in message and "cannot load" in message
    raw = pbt_sweep()
    raw["parameters"] = {"model.n_heads": {"space": "choice", "values": [1, 2]}}
    message = error_of(tmp_path, raw)
    assert "no parameter it can perturb" in message and "model.n_heads" in message


def test_pbt_options_are_checked(tmp_path):
    message = error_of(tmp_path, pbt_sweep(mutate=["model.lamb"]))
    assert "'model.lamb' is not a searched parameter" in message and "'model.lam'" in message
    message = error_of(tmp_path, pbt_sweep(perturbation_interval=4))
    assert "scheduler.perturbation_interval" in message and "never perturbs" in message
    assert "scheduler.quantile_fraction" in error_of(tmp_path, pbt_sweep(quantile_fraction=0.7))
    message = error_of(tmp_path, pbt_sweep(resample_probability=1.5))
    assert "scheduler.resample_probability" in message
    assert "scheduler.synch" in error_of(tmp_path, pbt_sweep(synch="yes"))
    message = error_of(tmp_path, pbt_sweep() | {"search": "optuna"})
    assert "search" in message and "PBT" in message
    message = error_of(tmp_path, pbt_sweep() | {"samples": 1})
    assert "samples" in message and "population" in message
    capped = load_sweep(write(tmp_path, pbt_sweep() | {"samples": 4, "concurrency": 2}))
    assert capped.concurrency == 2  # fits at once; every member stays live


def test_pbt_refuses_other_searches_with_the_reason(tmp_path):
    path = write(tmp_path, pbt_sweep() | {"search": "optuna"})
    with pytest.raises(SpaceError) as info:
        load_sweep(path)
    assert str(info.value) == (
        f"{path}: search: PBT explores by perturbing its own population; use search 'random' "
        "(it draws the starting population), received 'optuna'"
    )


def test_unknown_scheduler_lists_every_scheduler(tmp_path):
    path = write(tmp_path, base_sweep() | {"scheduler": "hyperband"})
    with pytest.raises(SpaceError) as info:
        load_sweep(path)
    assert str(info.value) == (
        f"{path}: scheduler.type: expected one of ['asha', 'fifo', 'pbt'], received 'hyperband'"
    )


def test_metric_and_mode_are_checked(tmp_path):
    assert "metric" in error_of(tmp_path, base_sweep() | {"metric": "loss"})
    assert "mode" in error_of(tmp_path, base_sweep() | {"mode": "minimise"})


def test_duplicate_yaml_keys_are_refused(tmp_path):
    text = yaml.safe_dump(base_sweep(), sort_keys=False) + "mode: max\n"
    assert "duplicate key 'mode'" in error_of(tmp_path, text)


def test_scientific_notation_reads_as_a_float(tmp_path):
    text = yaml.safe_dump(base_sweep(), sort_keys=False).replace("low: 0.1", "low: 1e-1")
    spec = load_sweep(write(tmp_path, text))
    assert next(p for p in spec.parameters if p.key == "model.lam").low == pytest.approx(0.1)


def test_resources_belong_in_resources_not_fixed(tmp_path):
    raw = base_sweep()
    raw["fixed"]["train.workers"] = 4
    assert "resources.workers" in error_of(tmp_path, raw)
    raw["fixed"].pop("train.workers")
    spec = load_sweep(
        write(tmp_path, raw), resources={"workers": 3, "gpu": True, "cpus_per_worker": None}
    )
    assert spec.fixed["train.workers"] == 3 and spec.fixed["train.use_gpu"] is True


def test_command_line_set_is_validated_and_cannot_shadow_a_parameter(tmp_path):
    assert "model.lam" in error_of(tmp_path, base_sweep(), overrides={"model.lam": 1.0})
    assert "train.epochz" in error_of(tmp_path, base_sweep(), overrides={"train.epochz": 1})
    spec = load_sweep(write(tmp_path, base_sweep()), overrides={"train.epochs": 1}, samples=7)
    assert spec.fixed["train.epochs"] == 1 and spec.samples == 7


def test_unknown_model_lists_the_registry(tmp_path):
    message = error_of(tmp_path, base_sweep() | {"model": "vae"})
    assert "'vae'" in message and "ae" in message and "wae" in message


def test_param_space_maps_to_tune_domains(tmp_path):
    from ray.tune.search.sample import Categorical, Float

    raw = base_sweep()
    raw["parameters"]["model.n_heads"] = {"space": "grid", "values": [1, 2]}
    space = load_sweep(write(tmp_path, raw)).param_space()
    assert isinstance(space["model.latent_dim"], Categorical)
    assert isinstance(space["model.lam"], Float)
    assert 0.1 <= space["model.lam"].sample() <= 10.0
    assert space["model.n_heads"] == {"grid_search": [1, 2]}


def test_trial_spec_applies_sampled_numpy_values(tmp_path):
    spec = load_sweep(write(tmp_path, base_sweep()))
    run = spec.trial_spec(
        {"model.latent_dim": np.int64(32), "model.lam": np.float64(2.5)}, str(tmp_path), "t-1"
    )
    assert run.model == "wae" and run.run_name == "t-1"
    assert run.model_config["latent_dim"] == 32 and type(run.model_config["latent_dim"]) is int
    assert run.model_config["lam"] == 2.5 and run.train.epochs == 2


@pytest.mark.parametrize("score_synthetic", [True, False])
def test_evaluate_all_scores_a_generator_trial_as_its_spec_asks(tmp_path, monkeypatch, score_synthetic):
    """``evaluate: all`` evaluates each trial with the scorecard exactly when the trial's
    ``train.score_synthetic`` asks, as ``jobs/train.py`` does (a sweep of generators without
    it records no fidelity at all)."""
    from types import SimpleNamespace

    import mirror.evaluation
    import mirror.tune.trial
    from mirror.tune.trial import finish_trial

    raw = base_sweep() | {"evaluate": "all"}
    raw["fixed"] = raw["fixed"] | {"train.score_synthetic": score_synthetic}
    sweep = load_sweep(write(tmp_path, raw))
    run = sweep.trial_spec({"model.latent_dim": 16, "model.lam": 1.0}, str(tmp_path), "t-1")
    calls = []
    monkeypatch.setattr(mirror.tune.trial, "run_outside_placement_group", lambda fn, *a, **kw: calls.append((fn, a, kw)))
    finish_trial(sweep, SimpleNamespace(run_id="r1"), run)
    assert calls == [(mirror.evaluation.evaluate_run, ("r1",), {"synthetic": score_synthetic})]


def test_trial_evaluation_escapes_the_trials_placement_group(ray_cluster):
    """A trial's tasks inherit its placement group (one bundle of a fraction of a CPU): the
    scorecard's one-CPU scans launched from there cannot be scheduled (the paper sweep of issue
    14 failed this way), unless the evaluation runs outside the group."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from mirror.tune.trial import run_outside_placement_group

    def scan_needing_one_cpu() -> int:  # local: pickled by value, the workers cannot import tests
        return ray.get(ray.remote(num_cpus=1)(lambda: 1).remote())

    group = placement_group([{"CPU": 0.05}])
    ray.get(group.ready())
    in_trial = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
    try:
        with pytest.raises(Exception, match="cannot fit into any bundles"):
            ray.get(ray.remote(scan_needing_one_cpu).options(num_cpus=0.05, scheduling_strategy=in_trial).remote())
        escaped = ray.remote(lambda: run_outside_placement_group(scan_needing_one_cpu))
        assert ray.get(escaped.options(num_cpus=0.05, scheduling_strategy=in_trial).remote()) == 1
    finally:
        remove_placement_group(group)
