"""Numerical faults: a diverging run stops naming the step and never replaces the last good checkpoint;
float16 steps whose gradients overflow are skipped by the GradScaler, not applied."""
import math
import re

import pytest
import torch

import train
from configurator import TrainConfig
from forge.checkpoint import load_checkpoint
from forge.metrics import read_metrics
from tests.reliability.conftest import TINY, cli
from tests.util import assert_clean_error

POISONED_STEPS = {3, 4}  # optimizer steps given an infinite gradient in the float16 test


@pytest.mark.parametrize("log_interval", [1, 1000], ids=["caught_at_a_log_step", "caught_before_a_save"])
def test_absurd_learning_rate_stops_naming_the_step_and_keeps_the_good_checkpoint(forks, tmp_path, tiny_char_data,
                                                                                 log_interval):
    out = tmp_path / "out"
    assert forks.run("train.py", *cli(out, tiny_char_data, max_iters=4, lr_decay_iters=4)).returncode == 0
    good = (out / "ckpt.pt").read_bytes()
    proc = forks.run("train.py", *cli(out, tiny_char_data, init_from="resume", max_iters=40, learning_rate=1e30,
                                      decay_lr=False, grad_clip=0.0, log_interval=log_interval))
    error = assert_clean_error(proc, "NaN/inf at iter", str(out))
    step = int(re.search(r"at iter (\d+)", error).group(1))
    assert 4 <= step < 40
    assert (out / "ckpt.pt").read_bytes() == good, "a diverged model replaced the last good checkpoint"
    assert load_checkpoint(out)["iter_num"] == 4
    losses = {r["iter"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert all(losses[i] is not None and math.isfinite(losses[i]) for i in losses if i < step)
    if log_interval == 1:  # every step was checked: the named step is the first bad one
        assert step not in losses and sorted(losses) == list(range(step))


def test_float16_overflowing_steps_are_skipped_not_applied(tmp_path, tiny_char_data, monkeypatch):
    """The loop's own float16 path on the CPU (autocast float16 + GradScaler): steps 3 and 4 get an infinite
    gradient; the parameters and optimizer state stay as they were, the loss scale halves, and training goes on."""
    poisoned, seen = POISONED_STEPS, []
    real_step = train.optimizer_step

    def optimizer_step(optimizer, scaler, grad_clip):
        call = len(seen)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if call in poisoned:
            params[0].grad[0].fill_(math.inf)
        before = [p.detach().clone() for p in params]
        state_before = {k: v.clone() for k, v in optimizer.state[params[1]].items()} if optimizer.state else {}
        scale = scaler.get_scale()
        grad_norm = real_step(optimizer, scaler, grad_clip)
        changed = not all(torch.equal(a, p) for a, p in zip(before, params))
        same_state = all(torch.equal(v, optimizer.state[params[1]][k]) for k, v in state_before.items())
        seen.append((call, changed, same_state, scale, scaler.get_scale(), float(grad_norm)))
        return grad_norm

    monkeypatch.setattr(train, "optimizer_step", optimizer_step)
    monkeypatch.setattr(train, "resolve_dtype", lambda dtype, device: torch.float16)  # CPU refuses float16 otherwise
    out = tmp_path / "out"
    train.main(TrainConfig(**{**TINY, "out_dir": str(out), "data_dir": str(tiny_char_data), "max_iters": 8,
                              "lr_decay_iters": 8, "grad_clip": 0.0}))
    assert len(seen) == 8  # the run went on to max_iters
    for call, changed, same_state, scale_before, scale_after, grad_norm in seen:
        if call in poisoned:
            assert not changed and same_state, f"step {call}: an overflowing step was applied"
            assert scale_after == scale_before / 2 and math.isinf(grad_norm)
    assert any(changed for call, changed, *_ in seen if call not in poisoned)
    ckpt = load_checkpoint(out)
    assert ckpt["iter_num"] == 8 and ckpt["scaler"]["scale"] <= 65536.0 / 4
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
