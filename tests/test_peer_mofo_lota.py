"""The peer methods MoFO (momentum-filtered updates) and LoTA/LoTTO (lottery-ticket adaptation): each rule is
recomputed here from what the run recorded, independently of the strategy's own code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from epi.errors import UserError
from epi.logging import read_metrics
from epi.strategies.lota import LoTA
from epi.strategies.mofo import MoFO
from epi.trainer import Trainer
from tests.helpers import ROOT, crash_and_resume, make_cfg

HARSH = ["optimizer.weight_decay=0.5", "optimizer.lr=1e-2"]  # decay and large steps: a held entry that moved shows
TWO_STAGES = "schedule.stages=[{name: a, tasks: [math], steps: 4}, {name: b, tasks: [code], steps: 4}]"


# ---------------------------------------------------------------- MoFO
class WatchedMoFO(MoFO):
    """Real MoFO that records, every step, what the test needs to recompute the filter: the weights, the first
    moments and the raw gradients before the step, and the weights and first moments after it."""

    def prepare(self, ctx, stages):
        self.steps: list[dict[str, dict[str, Tensor]]] = []
        return super().prepare(ctx, stages)

    def after_backward(self, step: int) -> None:
        params = self.ctx.named_params
        self.record = {
            "param": {n: p.detach().clone() for n, p in params.items()},
            "grad": {n: p.grad.detach().clone() for n, p in params.items()},
            "exp_avg": {n: self.ctx.optimizer_state(n).get("exp_avg", torch.zeros_like(p)).clone() for n, p in params.items()},
        }
        super().after_backward(step)

    def after_step(self, step: int) -> None:
        super().after_step(step)
        params = self.ctx.named_params
        self.record["param_after"] = {n: p.detach().clone() for n, p in params.items()}
        self.record["exp_avg_after"] = {n: self.ctx.optimizer_state(n)["exp_avg"].clone() for n in params}
        self.steps.append(self.record)


def top_alpha(momentum: Tensor, alpha: float) -> Tensor:
    """MoFO's rule, written out: per tensor the k = floor(alpha * n) (at least 1) largest |m|, ties at the
    threshold included, zero moments excluded."""
    magnitude = momentum.abs().reshape(-1)
    k = max(1, int(magnitude.numel() * alpha))
    threshold = magnitude.sort(descending=True).values[k - 1]
    return ((magnitude >= threshold) & (magnitude != 0)).view_as(momentum)


def test_mofo_moves_exactly_the_top_alpha_momentum_entries_and_holds_the_rest(tmp_path: Path) -> None:
    alpha = 0.2
    trainer = Trainer(make_cfg("strategy=mofo", "strategy._target_=tests.test_peer_mofo_lota.WatchedMoFO", f"strategy.alpha={alpha}",
                               "schedule.steps=4", "schedule.clip_norm=0.5", "strategy.log_every=1", *HARSH), tmp_path)
    trainer.fit()
    strategy = trainer.strategy
    beta1 = trainer.optimizer.param_groups[0]["betas"][0]
    assert set(strategy.filtered) >= {"model.embed_tokens.weight"} and not any("norm" in n for n in strategy.filtered)
    assert len(strategy.steps) == 4
    for step, rec in enumerate(strategy.steps, 1):
        grads = rec["grad"]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        coef = min(1.0, 0.5 / (float(norm) + 1e-6))  # the WHOLE gradient is clipped, as in the authors' runs
        assert coef < 1.0, "the test must exercise clipping"
        held_with_gradient = 0
        for name in trainer.named_params:
            moved = rec["param_after"][name] != rec["param"][name]
            m_t = rec["exp_avg"][name].lerp(grads[name] * coef, 1 - beta1)  # this step's momentum, recomputed
            torch.testing.assert_close(rec["exp_avg_after"][name], m_t, rtol=1e-5, atol=1e-9)
            if name not in strategy.filtered:  # norms: AdamW's full update
                assert moved.float().mean() > 0.9, f"step {step}: unfiltered {name} was held"
                continue
            keep = top_alpha(m_t, alpha)
            assert torch.equal(moved, keep), f"step {step}: {name} moved {int(moved.sum())} entries, the top-alpha rule {int(keep.sum())}"
            # the moments of the held entries still integrate the full gradient
            live = ~keep & (grads[name] != 0)
            assert torch.all(rec["exp_avg_after"][name][live] != rec["exp_avg"][name][live]), f"step {step}: {name}"
            held_with_gradient += int(live.sum())
        assert held_with_gradient > 0
        weights = "model.layers.0.mlp.up_proj.weight"
        assert rec["param_after"][weights].ne(rec["param"][weights]).float().mean() == pytest.approx(alpha, abs=0.01)
    fractions = [e["value"] for e in read_metrics(tmp_path) if e["split"] == "mask" and e["metric"] == "trained_fraction"]
    assert len(fractions) == 4 and all(0 < f < 1 for f in fractions)


def test_mofo_refuses_an_optimizer_without_a_first_moment(tmp_path: Path) -> None:
    trainer = Trainer(make_cfg("strategy=mofo", "optimizer=sgd", "schedule.steps=1"), tmp_path)
    with pytest.raises(UserError, match=r"strategy=mofo filters by Adam's first moment \(exp_avg\).*optimizer=adamw"):
        trainer.fit()


# ---------------------------------------------------------------- LoTA
class WatchedLoTA(LoTA):
    """Real LoTA that records, per stage, the weights before calibration, each calibration copy's weights, and
    the run's weights right after the stage's ticket is set."""

    def prepare(self, ctx, stages):
        self.seen: list[dict] = []
        return super().prepare(ctx, stages)

    def on_stage_start(self, index, stage, step):
        self.seen.append({"base": self.ctx.model_state(), "tuned": {}})
        super().on_stage_start(index, stage, step)
        self.seen[-1]["after"] = self.ctx.model_state()

    def _calibrate(self, task, step):
        tuned = super()._calibrate(task, step)
        self.seen[-1]["tuned"][task] = tuned
        return tuned


def lota(tmp_path: Path, name: str, *extra: str) -> Trainer:
    (tmp_path / name).mkdir()
    trainer = Trainer(make_cfg("strategy=lota", "strategy._target_=tests.test_peer_mofo_lota.WatchedLoTA", "strategy.calibration_steps=2",
                               "strategy.calibration_lr=1e-2", *HARSH, *extra), tmp_path / name)
    trainer.fit()
    return trainer


def assert_top_of(ticket: dict[str, Tensor], delta: dict[str, Tensor], keep: float, allowed: dict[str, Tensor]) -> None:
    """`ticket` is the round(keep * N) entries of largest |delta| among `allowed` (N: every participating entry)."""
    n_total = sum(d.numel() for d in delta.values())
    inside = torch.cat([delta[n].abs()[ticket[n]] for n in delta])
    outside = torch.cat([delta[n].abs()[allowed[n] & ~ticket[n]] for n in delta])
    assert inside.numel() == round(keep * n_total)
    assert all(not (ticket[n] & ~allowed[n]).any() for n in delta)
    assert inside.min() >= outside.max(), "an entry outside the ticket moved more in calibration than one inside"


def test_lota_ticket_is_the_top_of_the_calibration_task_vector_and_only_it_moves(tmp_path: Path) -> None:
    trainer = lota(tmp_path, "run", "schedule.steps=4", "data.tasks=[math,code]")
    strategy, seen = trainer.strategy, trainer.strategy.seen[0]
    names = list(strategy.params)
    assert names and not any("embed" in n or "lm_head" in n or "norm" in n for n in names)
    base = seen["base"]
    # one mixed stage: the ticket ranks the mean of the two tasks' task vectors
    delta = {n: sum(seen["tuned"][t][n].float() - base[n].float() for t in ("math", "code")) / 2 for n in names}
    ticket = strategy.tickets[0]
    assert_top_of(ticket, delta, 1 - 0.9, {n: torch.ones_like(ticket[n]) for n in names})
    # reset: after calibration the run still holds theta0 (the copy was never loaded)
    assert all(torch.equal(seen["after"][n], base[n]) for n in base)
    final = {n: p.detach().cpu() for n, p in trainer.named_params.items()}
    for n, value in final.items():
        if n in ticket:
            assert torch.equal(value[~ticket[n]], base[n][~ticket[n]]), f"{n}: an entry outside the ticket moved"
            assert (value[ticket[n]] != base[n][ticket[n]]).float().mean() > 0.9
        else:
            assert torch.equal(value, base[n]), f"{n} does not take part and moved"
    fractions = [e["value"] for e in read_metrics(tmp_path / "run") if e["metric"] == "trained_fraction"]
    total = sum(final[n].numel() for n in final)
    assert fractions == [pytest.approx(sum(int(m.sum()) for m in ticket.values()) / total)]


def test_lotto_second_ticket_is_disjoint_and_the_first_is_held_through_the_second_stage(tmp_path: Path) -> None:
    trainer = lota(tmp_path, "run", TWO_STAGES)
    strategy = trainer.strategy
    first, second = strategy.tickets
    assert all(not (first[n] & second[n]).any() for n in first)
    seen = strategy.seen[1]
    delta = {n: seen["tuned"]["code"][n].float() - seen["base"][n].float() for n in first}
    assert_top_of(second, delta, 1 - 0.9, {n: ~first[n] for n in first})
    assert list(seen["tuned"]) == ["code"] and list(strategy.seen[0]["tuned"]) == ["math"]
    final = {n: p.detach().cpu() for n, p in trainer.named_params.items()}
    for n in first:  # stage a's ticket, like everything outside stage b's, does not move in stage b
        assert torch.equal(final[n][~second[n]], seen["base"][n][~second[n]]), n


def compute(run: Path) -> dict[str, float]:
    return {e["metric"]: e["value"] for e in read_metrics(run) if e["split"] == "compute"}


def test_lota_calibration_is_charged_and_can_come_out_of_the_budget(tmp_path: Path) -> None:
    (tmp_path / "none").mkdir()
    Trainer(make_cfg("strategy=none", TWO_STAGES), tmp_path / "none").fit()
    plain = compute(tmp_path / "none")
    lota(tmp_path, "lota", TWO_STAGES)
    charged = compute(tmp_path / "lota")
    assert charged["optimizer_steps"] == plain["optimizer_steps"] + 2 * 2  # two stages, one 2-step calibration each
    assert charged["trained_tokens"] > plain["trained_tokens"]
    equal = lota(tmp_path, "equal", TWO_STAGES, "strategy.count_calibration_in_budget=true")
    assert [s.steps for s in equal.stages] == [2, 2]
    assert compute(tmp_path / "equal")["optimizer_steps"] == plain["optimizer_steps"]


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_every", [3, 4])  # 3: resume inside stage b; 4: at the boundary, before b's calibration
def test_lota_resume_is_exact_including_tickets(tmp_path: Path, checkpoint_every: int) -> None:
    common = ["strategy=lota", "strategy.calibration_steps=2", "strategy.calibration_lr=1e-2", *HARSH, TWO_STAGES,
              f"schedule.checkpoint_every={checkpoint_every}"]
    straight, resumed, state = crash_and_resume(tmp_path, common, 7)
    assert state["step"] == 6 if checkpoint_every == 3 else state["step"] == 4
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    a, b = straight.optimizer.masks, resumed.optimizer.masks
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert len(resumed.strategy.tickets) == 2
    for x, y in zip(straight.strategy.tickets, resumed.strategy.tickets):
        assert all(torch.equal(x[n], y[n]) for n in x)


def test_lota_refuses_a_budget_the_calibration_eats(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"stage 'a' has 4 steps and its 1 calibration\(s\) of strategy.calibration_steps=4"):
        Trainer(make_cfg("strategy=lota", "strategy.calibration_steps=4", "strategy.count_calibration_in_budget=true", TWO_STAGES), tmp_path)


# ---------------------------------------------------------------- registry
@pytest.mark.slow  # the CLI over every strategy module; tests/test_package.py lists every built-in in the inner loop
def test_both_are_listed_by_the_registry() -> None:
    out = subprocess.run([sys.executable, "-m", "epi.strategies"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "arXiv 2407.20999" in out.stdout and "arXiv 2406.16797" in out.stdout
    for line in ("mofo ", "lota "):
        assert any(row.startswith(line) for row in out.stdout.splitlines()), line
