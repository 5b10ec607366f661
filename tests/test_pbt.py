"""Population-based training: the pieces by hand, then one real PBT sweep on real Ray.

The sweep is a population of 2 WAE trials on 1 worker each, for 2 epochs with a perturbation
after the first; on 4 logical CPUs only one fit fits at a time, so the members must take turns
(one fit slot). PBT is synchronous (the default), so after epoch 0 both members have reported
and have a checkpoint, and with ``quantile_fraction: 0.5`` the weaker one exploits the
stronger: at least one exploit must happen. (The last epoch's report ends a trial, so a third
epoch would only add fits.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import yaml

from mirror import tracking
from mirror.data.simulator import generate_dataset
from mirror.train.loop import hyperparameters, reapply_hyperparameters
from mirror.train.schedule import lr_lambda
from mirror.tune.fit_slots import FitSlots
from mirror.tune.pbt import EXPLOIT_TAG, KeepInsideRanges, mutation_problem
from mirror.tune.space import load_sweep
from mirror.tune.sweep import TRIAL_TAG, run_sweep

EPOCHS, STEPS = 2, 3
TINY = {
    "model.head_hidden": 16, "model.dx_emb_dim": 16, "model.wk_emb_dim": 8,
    "model.out_hidden": 32, "model.critic_hidden": 16, "model.critic_layers": 1,
    "model.cnn_channels": 4, "model.n_critic": 1, "model.n_critic_warmup": 1,
    "model.critic_warmup_steps": 0,
    "train.epochs": EPOCHS, "train.max_steps_per_epoch": STEPS, "train.batch_size": 32,
    "train.val_max_batches": 2, "train.score_synthetic": False,
}  # fmt: skip


def schedule_of(lr: float, total_steps: int = 20):
    """An AdamW with the loop's warm-up + cosine schedule, as the training loop builds it."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    factor = lr_lambda(total_steps, 0.1, 0.1)
    return net, opt, torch.optim.lr_scheduler.LambdaLR(opt, factor), factor


def test_restored_optimizer_takes_the_new_learning_rate_and_keeps_its_moments():
    net, opt, sched, factor = schedule_of(1e-3)
    for _ in range(7):
        net(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()

    fresh_opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01)  # perturbed: x3
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, factor)
    settings = hyperparameters({"ae": fresh_opt})
    fresh_opt.load_state_dict(saved_opt)
    fresh_sched.load_state_dict(saved_sched)
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(1e-3 * factor(7))  # the old one

    reapply_hyperparameters({"ae": fresh_opt}, {"ae": fresh_sched}, settings)

    assert fresh_sched.last_epoch == 7  # the schedule keeps its position ...
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(3e-3 * factor(7))  # ... on the new base
    assert fresh_sched.get_last_lr() == [fresh_opt.param_groups[0]["lr"]]
    fresh_sched.step()
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(3e-3 * factor(8))
    for p in net.parameters():  # moments and step counts as trained
        assert torch.equal(fresh_opt.state[p]["exp_avg"], opt.state[p]["exp_avg"])
        assert fresh_opt.state[p]["step"] == opt.state[p]["step"]


def test_perturbed_values_are_clipped_into_the_declared_range():
    keep = KeepInsideRanges(
        {"model.lam": (0.1, 10.0, False), "view.mask_min_words": (5, 19, True)}
    )
    config = keep({"model.lam": 12.0, "view.mask_min_words": 22.6, "other": 99})
    assert config == {"model.lam": 10.0, "view.mask_min_words": 19, "other": 99}
    assert keep({"model.lam": 0.05, "view.mask_min_words": 7.4}) == {
        "model.lam": 0.1,
        "view.mask_min_words": 7,
    }


def test_fit_slots_serve_members_first_come_first_served():
    async def scenario() -> list[str]:
        slots = FitSlots(1)
        order: list[str] = []

        async def member(name: str) -> None:
            await slots.acquire(name)
            order.append(name)

        await slots.acquire("a")
        waiting = [asyncio.create_task(member(n)) for n in ("b", "c")]
        await asyncio.sleep(0)
        assert await slots.held() == ["a"] and order == []  # b and c wait for a's fit
        await slots.release("a")
        await asyncio.sleep(0)
        assert await slots.held() == ["b"]
        await slots.release("b")
        await asyncio.gather(*waiting)
        assert await slots.held() == ["c"]
        # a member restarted mid-fit gives back its stale slot when it asks again
        restarted = asyncio.create_task(slots.acquire("c"))
        await asyncio.wait_for(restarted, 1.0)
        return order

    assert asyncio.run(scenario()) == ["b", "c"]


def test_only_shape_preserving_knobs_can_be_perturbed():
    assert mutation_problem("ae", "model.lr", (1e-4, 1e-2), {}) is None
    assert mutation_problem("wae", "model.lam", (0.1, 100.0), {}) is None
    assert mutation_problem("wae", "model.critic_lr", (1e-5, 1e-3), {}) is None
    assert "shape" in mutation_problem("ae", "model.latent_dim", (16, 64), {})
    heads = mutation_problem("ae", "model.n_heads", (1, 3), {})
    assert heads is not None and "cannot load" in heads
    assert "schedule or size" in mutation_problem("ae", "train.batch_size", (32, 64), {})
    assert mutation_problem("ae", "train.grad_clip", (0.5, 2.0), {}) is None


# --------------------------------------------------------------------------------------------
# One real PBT sweep.


@pytest.fixture(scope="module")
def pbt_sweep(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("pbt")
    data = root / "data"
    generate_dataset(data, 2000, seed=9, workers=1)
    space = root / "pbt.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "model": "wae",
                "fixed": TINY,
                "parameters": {
                    "model.lr": {"space": "loguniform", "low": 1e-4, "high": 3e-2},
                    "model.latent_dim": {"space": "choice", "values": [8, 16]},
                },
                "metric": "val/loss",
                "mode": "min",
                "scheduler": {"type": "pbt", "quantile_fraction": 0.5},
                "samples": 2,
                "resources": {"workers": 1, "cpus_per_worker": 1},
                "evaluate": "none",
            }
        )
    )
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    spec = load_sweep(space, overrides={"train.storage_path": str(root / "ray_results")})
    outcome = run_sweep(spec, data=str(data), name="pbt-test")
    yield outcome, spec, uri, root
    mp.undo()


def test_pbt_sweep_finishes_every_member_and_records_the_best(pbt_sweep):
    outcome, spec, uri, _ = pbt_sweep
    assert spec.scheduler_options["mutate"] == ("model.lr",)  # latent_dim is structural
    assert outcome.trials == 2 and outcome.errors == 0
    assert outcome.best is not None and outcome.best.epochs == EPOCHS
    children = tracking.child_runs(outcome.parent_run_id, uri=uri)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)


def test_weak_member_takes_over_the_strong_ones_weights_with_its_own_learning_rate(pbt_sweep):
    outcome, _, uri, _ = pbt_sweep
    children = tracking.child_runs(outcome.parent_run_id, uri=uri)
    names = {c.data.tags["mirror.run_name"] for c in children}
    exploits = 0
    factor = lr_lambda(EPOCHS * STEPS, 0.05, 0.1)
    for child in children:
        run_id = child.info.run_id
        lrs = dict(tracking.metric_history(run_id, "lr/autoencoder", uri=uri))
        knob = dict(tracking.metric_history(run_id, "pbt/model.lr", uri=uri))
        steps = dict(tracking.metric_history(run_id, "global_step", uri=uri))
        exploited = dict(tracking.metric_history(run_id, "pbt/exploited", uri=uri))
        assert sorted(knob) == list(range(EPOCHS))  # one value per epoch trained
        for epoch in range(EPOCHS):
            # The steps continue across fits and exploits: the donor was at the same epoch.
            assert steps[epoch] == (epoch + 1) * STEPS
            # The rate trained with is this trial's lr on the shared schedule, never the donor's.
            assert lrs[epoch] == pytest.approx(knob[epoch] * factor(int(steps[epoch])), rel=1e-6)
        for epoch, flag in exploited.items():
            if flag:
                exploits += 1
                donor = child.data.tags[EXPLOIT_TAG.format(epoch=epoch)]
                assert donor.split(" ")[0] in names - {child.data.tags["mirror.run_name"]}
        assert child.data.tags[TRIAL_TAG]
    assert exploits >= 1


def test_only_the_last_fit_of_each_member_stays_on_storage(pbt_sweep):
    outcome, _, uri, root = pbt_sweep
    for child in tracking.child_runs(outcome.parent_run_id, uri=uri):
        name = child.data.tags["mirror.run_name"]
        fits = sorted(p.name for p in (root / "ray_results").glob(f"{name}-e*"))
        assert len(fits) == 1 and fits[0].startswith(f"{name}-e{EPOCHS - 1:04d}-")
        checkpoint = Path(child.data.tags["mirror.checkpoint"])
        assert (checkpoint / "checkpoint.pt").exists() and fits[0] in checkpoint.parts
