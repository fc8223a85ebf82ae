"""forge/metrics.py: console lines, metrics.jsonl across resumes, torn lines, train_config.json, rank-0 only."""
import json

from forge.metrics import MetricsLog, git_commit, read_metrics


def _log_steps(log, iters):
    for it in iters:
        log.log_step(it, loss=4.0 - it / 10, lr=1e-3, grad_norm=1.5, ms=12.0, tokens_per_sec=1000.0, mfu=None)


def test_console_line_and_records(tmp_path, capsys):
    log = MetricsLog(tmp_path)
    log.start(0)
    log.log_step(10, loss=2.5, lr=6e-4, grad_norm=0.75, ms=123.4, tokens_per_sec=45678.0, mfu=0.412)
    log.log_eval(10, train_loss=2.4, val_loss=2.6, lr=6e-4)
    log.log_step(11, loss=float("nan"), lr=6e-4, grad_norm=float("inf"), ms=1.0, tokens_per_sec=1.0, mfu=None)
    log.close()
    out = capsys.readouterr().out
    assert "iter 10: loss 2.5000, lr 6.000e-04, grad norm 0.750, 123.4 ms/iter, 45,678 tok/s, mfu 41.20%" in out
    assert "step 10: train loss 2.4000, val loss 2.6000" in out
    step, evaluation, nonfinite = read_metrics(tmp_path / "metrics.jsonl")
    assert step == {"iter": 10, "loss": 2.5, "lr": 6e-4, "grad_norm": 0.75, "ms": 123.4, "tokens_per_sec": 45678.0,
                    "mfu": 0.412, "time_s": step["time_s"]}
    assert evaluation["train_loss"] == 2.4 and evaluation["val_loss"] == 2.6 and evaluation["time_s"] >= 0
    assert nonfinite["loss"] is None and nonfinite["grad_norm"] is None  # valid JSON, not NaN


def test_resume_drops_records_from_the_resumed_step_and_a_torn_line(tmp_path):
    log = MetricsLog(tmp_path)
    log.start(0)
    _log_steps(log, range(8))
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iter": 8, "loss": 3.')  # killed mid-write
    assert [r["iter"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(8))
    log = MetricsLog(tmp_path)
    log.start(5)  # resumed from a checkpoint at iter 5: steps 5.. are redone
    _log_steps(log, range(5, 7))
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iter"] for line in lines] == list(range(7))


def test_other_ranks_write_nothing(tmp_path, capsys):
    log = MetricsLog(tmp_path / "out", enabled=False)
    log.write_config({"a": 1})
    log.start(0)
    _log_steps(log, range(3))
    log.info("hello")
    log.close()
    assert not (tmp_path / "out").exists() and capsys.readouterr().out == ""


def test_config_json_carries_the_resolved_config_and_commit(tmp_path, capsys):
    commit = MetricsLog(tmp_path).write_config({"n_layer": 4, "out_dir": str(tmp_path)})
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved == {"git_commit": commit, "config": {"n_layer": 4, "out_dir": str(tmp_path)}}
    assert commit == git_commit() and (len(commit) == 40 or commit == "unknown")
    assert commit in capsys.readouterr().out
    assert git_commit(tmp_path) == "unknown"  # not a git checkout
