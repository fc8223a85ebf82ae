"""train.py end to end on tiny CPU runs: learning, a golden loss trace, exact resume, SIGTERM, divergence, bad input."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from configurator import TrainConfig
from forge.checkpoint import CheckpointError, load_checkpoint, model_args_of
from forge.errors import UserError
from forge.metrics import read_metrics
from forge.precision import resolve_dtype
from tests.util import ABSENT_GPU, REPO, assert_clean_error, run_py, snapshot

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, gradient_accumulation_steps=2, bias=True,
            dropout=0.1, max_iters=8, lr_decay_iters=8, warmup_iters=2, learning_rate=1e-2, min_lr=1e-3,
            eval_interval=4, eval_iters=2, log_interval=1, device="cpu", dtype="float32", compile=False)


pytestmark = pytest.mark.usefixtures("one_thread")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the same for subprocesses (see the one_thread fixture)


def tiny_config(out_dir, data_dir, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "out_dir": str(out_dir), "data_dir": str(data_dir), **overrides})


def cli(out_dir, data_dir, **overrides) -> list:
    return [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}"
            for k, v in {**TINY, "out_dir": str(out_dir), "data_dir": str(data_dir), **overrides}.items()]


def step_losses(out_dir) -> dict:
    return {r["iter"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r}


def eval_losses(out_dir) -> dict:
    return {r["iter"]: (r["train_loss"], r["val_loss"]) for r in read_metrics(out_dir / "metrics.jsonl")
            if "val_loss" in r}


def test_get_lr_warms_up_from_nonzero_then_decays_to_min_lr():
    lrs = [train.get_lr(it, 1.0, 10, 100, 0.1) for it in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[100] == lrs[119] == 0.1
    assert train.get_lr(0, 1.0, 0, 0, 0.1) == 0.1  # no warmup, no decay window: min_lr, no division by zero


def test_loss_falls_and_records_are_written(tmp_path, tiny_char_data):
    out = tmp_path / "out"
    train.main(tiny_config(out, tiny_char_data, max_iters=30, lr_decay_iters=30, eval_interval=15, dropout=0.0))
    evals = eval_losses(out)
    assert sorted(evals) == [0, 15, 30]
    assert evals[30][1] < evals[0][1] - 0.5, evals  # val loss fell well below the initial ~ln(vocab)
    records = read_metrics(out / "metrics.jsonl")
    step = next(r for r in records if "loss" in r)
    assert {"iter", "loss", "lr", "grad_norm", "ms", "tokens_per_sec", "mfu"} <= set(step)
    assert all("time_s" in r for r in records if "val_loss" in r)
    config = __import__("json").loads((out / "train_config.json").read_text())
    assert config["config"]["max_iters"] == 30 and config["git_commit"]
    ckpt = load_checkpoint(out)
    assert ckpt["iter_num"] == 30 and ckpt["best_val_loss"] == pytest.approx(evals[30][1])
    assert {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config",
            "model_type", "scaler", "rng", "data", "wandb_run_id"} <= set(ckpt)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])


# The first losses of a deterministic run (seed 1337, the tiny data, float32 CPU): a change in the model's
# initialisation, the batches, the loss or the optimizer shows up here.
GOLDEN_LOSSES = [4.086981, 3.950459, 3.831696, 3.562040, 3.583791]


def test_golden_loss_trace(tmp_path, tiny_char_data):
    out = tmp_path / "out"
    train.main(tiny_config(out, tiny_char_data, max_iters=5, eval_interval=100))
    losses = [step_losses(out)[i] for i in range(5)]
    print(losses)
    assert losses == pytest.approx(GOLDEN_LOSSES, rel=1e-4, abs=1e-4)


def test_exact_resume_matches_uninterrupted_run(tmp_path, tiny_char_data):
    full, half = tmp_path / "full", tmp_path / "half"
    train.main(tiny_config(full, tiny_char_data))
    train.main(tiny_config(half, tiny_char_data, max_iters=4))
    assert load_checkpoint(half)["iter_num"] == 4
    train.main(tiny_config(half, tiny_char_data, init_from="resume"))
    a, b = load_checkpoint(full), load_checkpoint(half)
    assert a["iter_num"] == b["iter_num"] == 8
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][name][key])), (name, key)
    # the resumed run's metrics.jsonl reads as one run: same losses, no step twice
    assert step_losses(full) == step_losses(half)
    assert eval_losses(full) == eval_losses(half)
    iters = [r["iter"] for r in read_metrics(half / "metrics.jsonl") if "loss" in r]
    assert iters == sorted(set(iters)) == list(range(8))


def test_resume_of_a_finished_run_only_says_so(tmp_path, tiny_char_data, capsys):
    out = tmp_path / "out"
    train.main(tiny_config(out, tiny_char_data, max_iters=2))
    before = snapshot(out)
    train.main(tiny_config(out, tiny_char_data, max_iters=2, init_from="auto"))
    assert "nothing to do" in capsys.readouterr().out
    assert snapshot(out) == before


def test_nonfinite_loss_stops_and_keeps_the_good_checkpoint(tmp_path, tiny_char_data):
    out = tmp_path / "out"
    train.main(tiny_config(out, tiny_char_data, max_iters=4))
    before = snapshot(out / "ckpt.pt")
    # an absurd learning rate diverges; no log line before the save, so the check before saving must catch it
    cfg = tiny_config(out, tiny_char_data, init_from="resume", max_iters=12, learning_rate=1e30, decay_lr=False,
                      grad_clip=0.0, log_interval=1000, eval_interval=4)
    with pytest.raises(UserError, match=r"at iter \d+") as excinfo:
        train.main(cfg)
    step = int(str(excinfo.value).split("at iter ")[1].split(";")[0])
    assert 4 <= step < 8
    assert snapshot(out / "ckpt.pt") == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_resumable_checkpoint_and_exits_zero(tmp_path, tiny_char_data, signum):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    proc = subprocess.Popen([sys.executable, "train.py", *cli(out, tiny_char_data, max_iters=100_000, eval_interval=1000,
                                                              lr_decay_iters=100_000)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(step_losses(out)) < 3:
        time.sleep(0.2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout + stderr
    assert "Traceback" not in stderr and f"stopped by {signum.name}" in stdout and "stopped at iter" in stdout
    ckpt = load_checkpoint(out)
    stopped_at = ckpt["iter_num"]
    assert stopped_at >= 3
    train.main(tiny_config(out, tiny_char_data, init_from="auto", max_iters=stopped_at + 2, lr_decay_iters=100_000,
                           eval_interval=1000))
    assert load_checkpoint(out)["iter_num"] == stopped_at + 2
    iters = [r["iter"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert iters == list(range(stopped_at + 2))


def test_eval_only_evaluates_and_writes_nothing(tmp_path, tiny_char_data, capsys):
    out = tmp_path / "out"
    train.main(tiny_config(out, tiny_char_data, max_iters=4))
    before = snapshot(out)
    train.main(tiny_config(out, tiny_char_data, init_from="resume", eval_only=True))
    assert "step 4: train loss" in capsys.readouterr().out
    assert snapshot(out) == before


def test_evaluations_can_skip_the_start_and_the_train_split(tmp_path, tiny_char_data, capsys):
    """A speedrun's clock runs through its evaluations: eval_at_start=False and eval_train=False leave the
    ones at eval_interval and the end, of val only, with the val losses of a run evaluating everything;
    a resume does not evaluate at its first step either."""
    full, lean = tmp_path / "full", tmp_path / "lean"
    common = dict(max_iters=9, lr_decay_iters=13)
    train.main(tiny_config(full, tiny_char_data, **common))
    capsys.readouterr()
    train.main(tiny_config(lean, tiny_char_data, **common, eval_at_start=False, eval_train=False))
    out = capsys.readouterr().out
    val = {i: eval_losses(full)[i][1] for i in (4, 8, 9)}
    assert sorted(eval_losses(full)) == [0, 4, 8, 9]
    assert re.findall(r"^step \d+: .*$", out, re.M) == [f"step {i}: val loss {v:.4f}" for i, v in val.items()]
    records = [r for r in read_metrics(lean / "metrics.jsonl") if "val_loss" in r]
    assert [(r["iter"], r["val_loss"]) for r in records] == list(val.items())
    assert not any("train_loss" in r for r in records)
    assert step_losses(lean) == step_losses(full)  # the evaluations change nothing in training

    resumed = tmp_path / "resumed"
    train.main(tiny_config(resumed, tiny_char_data, max_iters=8, lr_decay_iters=13))  # a checkpoint at step 8
    capsys.readouterr()
    train.main(tiny_config(resumed, tiny_char_data, max_iters=12, lr_decay_iters=13, init_from="resume",
                           eval_at_start=False, eval_train=False))
    assert re.findall(r"^step (\d+):", capsys.readouterr().out, re.M) == ["12"]  # not 8, where it resumed


def test_wandb_offline_writes_files_and_resume_keeps_the_run(tmp_path, tiny_char_data, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "out"
    train.main(tiny_config(out, tiny_char_data, max_iters=2, wandb_log=True, wandb_project="gptforge-test"))
    run_id = load_checkpoint(out)["wandb_run_id"]
    assert run_id
    train.main(tiny_config(out, tiny_char_data, max_iters=4, wandb_log=True, wandb_project="gptforge-test",
                           init_from="resume"))
    assert load_checkpoint(out)["wandb_run_id"] == run_id
    # one folder per start: offline-run-<time>-<id>, with "-1" appended when both began in the same second
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", r.name) for r in runs)
    assert all((r / f"run-{run_id}.wandb").stat().st_size > 0 for r in runs)


def test_finetune_from_a_local_hf_gpt2_directory(tmp_path, tiny_char_data, monkeypatch):
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=96)).save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    train.main(tiny_config(out, tiny_char_data, init_from=str(tmp_path / "hf"), n_layer=12, max_iters=2, dropout=0.1))
    ckpt = load_checkpoint(out)
    assert ckpt["model_args"]["block_size"] == 16 and ckpt["model_args"]["vocab_size"] == 96  # cropped, GPT-2's vocab
    assert ckpt["model_args"]["n_layer"] == 2 and ckpt["model_args"]["dropout"] == 0.1  # shape from the weights
    train.main(tiny_config(out, tiny_char_data, init_from="resume", n_layer=12, max_iters=4))  # the same config resumes
    assert load_checkpoint(out)["iter_num"] == 4
    finetune = tiny_config(out, tiny_char_data, init_from=str(tmp_path / "hf"), n_layer=12, max_iters=6)
    with pytest.raises(CheckpointError, match="already exists and init_from=.* would overwrite it"):
        train.main(finetune)  # a second fine-tune into the same out_dir
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # but a requeued SLURM job continues its run
    train.main(finetune)
    assert load_checkpoint(out)["iter_num"] == 6
    with pytest.raises(train.ConfigError, match="rotary=True cannot apply to .*pretrained architecture"):
        train.main(tiny_config(tmp_path / "opt", tiny_char_data, init_from=str(tmp_path / "hf"), rotary=True))


def test_finetune_refuses_only_options_that_differ_from_the_weights(tmp_path, tiny_char_data):
    """An option equal to what the GPT-2 folder has fine-tunes, and so does one left at its default (the weights
    decide); one set to another value, or one GPT-2 has no way to express, is one error naming it (the latter
    before any weights are read)."""
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    shape = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=96)
    GPT(GPTConfig(**shape, mlp="gelu_exact", untied_head=True)).save_pretrained(tmp_path / "exact")
    GPT(GPTConfig(**shape)).save_pretrained(tmp_path / "plain")
    exact, plain = str(tmp_path / "exact"), str(tmp_path / "plain")
    for out, options in (("same", dict(mlp="gelu_exact", untied_head=True)), ("default", {})):
        train.main(tiny_config(tmp_path / out, tiny_char_data, init_from=exact, max_iters=1, **options))
        model_args = model_args_of(load_checkpoint(tmp_path / out))
        assert model_args["mlp"] == "gelu_exact" and model_args["untied_head"] is True
    with pytest.raises(train.ConfigError, match=r"mlp='gelu_exact', untied_head=True cannot apply to .*pretrained "
                                                r"architecture \(its weights have mlp='gelu', untied_head=False\)"):
        train.main(tiny_config(tmp_path / "other", tiny_char_data, init_from=plain, mlp="gelu_exact",
                               untied_head=True))
    (tmp_path / "plain" / "model.safetensors").unlink()  # GPT-2 cannot express these: refused without reading weights
    with pytest.raises(train.ConfigError, match=r"mlp='swiglu', logit_softcap=30.0 cannot apply to .*"
                                                r"GPT-2 has no such option"):
        train.main(tiny_config(tmp_path / "swiglu", tiny_char_data, init_from=plain, mlp="swiglu", logit_softcap=30.0))
    assert not (tmp_path / "other").exists() and not (tmp_path / "swiglu").exists()

def test_bigram_baseline_trains_and_resumes(tmp_path, tiny_char_data):
    out = tmp_path / "out"
    train.main(tiny_config(out, tiny_char_data, model_type="bigram", max_iters=4, learning_rate=0.1))
    evals = eval_losses(out)
    assert evals[4][1] < evals[0][1]
    with pytest.raises(CheckpointError, match="trained with model_type='bigram' but the config says model_type='gpt'"):
        train.main(tiny_config(out, tiny_char_data, init_from="resume", max_iters=6))


def test_gradient_accumulation_must_split_across_ranks():
    assert train.accumulation_per_rank(8, 4) == 2
    with pytest.raises(train.ConfigError, match="gradient_accumulation_steps=8 is not divisible by the 3"):
        train.accumulation_per_rank(8, 3)


def test_dtype_resolution(monkeypatch):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(UserError, match="float16 needs a GPU"):
        resolve_dtype("float16", "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    assert resolve_dtype("auto", "cuda") == torch.float16
    with pytest.raises(UserError, match="dtype=bfloat16 but Tesla V100 has no bfloat16"):
        resolve_dtype("bfloat16", "cuda")


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_char_data):
    """A finished tiny run (iter 2) to resume from or corrupt."""
    out = tmp_path_factory.mktemp("trained") / "out"
    train.main(tiny_config(out, tiny_char_data, max_iters=2))
    return out


def _copy_run(trained, tmp_path):
    import shutil

    return shutil.copytree(trained, tmp_path / "run")


def _bad_checkpoint(kind, path):
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt":
        path.write_bytes(b"\x00garbage" * 100)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    elif kind == "pickle_code":
        torch.save({"model": {}, "payload": _Evil()}, path)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("kind, needle", [  # every kind is covered in-process by test_checkpoint.py
    ("truncated", "truncated or corrupt"),
    ("pickle_code", "would run code"),
])
def test_bad_checkpoint_is_a_clean_error(trained, tmp_path, tiny_char_data, kind, needle):
    run = _copy_run(trained, tmp_path)
    _bad_checkpoint(kind, run / "ckpt.pt")
    before = snapshot(run)
    proc = run_py("train.py", *cli(run, tiny_char_data, init_from="resume", max_iters=4), env=ONE_THREAD)
    assert_clean_error(proc, "ckpt.pt", needle)
    assert "this must never run" not in proc.stdout
    assert snapshot(run) == before


def test_bad_inputs_are_clean_errors(trained, tmp_path, tiny_char_data):
    """Each bad input: non-zero exit, one `error:` line naming the culprit, nothing written or changed.

    Wrong types and typos in config files are covered in-process by test_configurator.py."""
    run = _copy_run(trained, tmp_path)
    cases = [
        (cli(run, tiny_char_data, max_iters=4) + ["--n_layr=3"], ["n_layr", "n_layer"]),
        ([str(tmp_path / "missing_config.py")], ["missing_config.py", "not found"]),
        (cli(run, tmp_path / "no_data", max_iters=4, init_from="resume"), ["no_data"]),
        (cli(tmp_path / "fresh", tiny_char_data, init_from="resume"), ["init_from=resume", "ckpt.pt"]),
        (cli(run, tiny_char_data, init_from="scratch", max_iters=4), ["already exists", "init_from=resume"]),
        (cli(run, tiny_char_data, init_from="resume", max_iters=4, n_layer=3), ["n_layer=2", "n_layer=3"]),
        (cli(tmp_path / "fresh", tiny_char_data, block_size=5000), ["block_size"]),
        (cli(tmp_path / "fresh", tiny_char_data, device=ABSENT_GPU), ["device", ABSENT_GPU]),
        (cli(tmp_path / "fresh", tiny_char_data, dtype="float16"), ["float16"]),
        (cli(tmp_path / "fresh", tiny_char_data, init_from="gpt3"), ["init_from", "gpt3"]),
        (cli(run / "train_config.json" / "sub", tiny_char_data), ["train_config.json"]),  # out_dir under a file
    ]
    before = snapshot(tmp_path)
    for args, needles in cases:
        assert_clean_error(run_py("train.py", *args, env=ONE_THREAD), *needles)
        assert snapshot(tmp_path) == before, args
    assert not (tmp_path / "fresh").exists()


def test_help_lists_every_key():
    proc = run_py("train.py", "--help", check=True)
    for field in TrainConfig.__dataclass_fields__:
        assert f"--{field}=" in proc.stdout
    assert "peak learning rate" in proc.stdout
