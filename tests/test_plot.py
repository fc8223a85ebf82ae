"""python -m forge.plot: PNGs from metrics.jsonl, several runs overlaid, clean errors."""
import json
import math

import pytest

from forge.errors import UserError
from forge.plot import main as plot_main
from tests.util import assert_clean_error, run_py, snapshot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fake_run(path, loss_scale=1.0, with_config=True, mfu=0.31, hellaswag=False):
    """A run folder shaped like train.py's: log records, eval records, a torn last line, train_config.json."""
    path.mkdir()
    lines = []
    for it in range(0, 200, 10):
        lines.append({"iter": it, "loss": loss_scale * (4.0 * math.exp(-it / 60) + 1.5), "lr": 1e-3 * min(1, (it + 1) / 50),
                      "ms": 30.0, "tokens_per_sec": 25_000 + it, "mfu": mfu, "grad_norm": 1.0})
        if it % 50 == 0:
            lines.append({"iter": it, "train_loss": loss_scale * (4.0 * math.exp(-it / 60) + 1.45),
                          "val_loss": loss_scale * (4.0 * math.exp(-it / 60) + 1.6), "time_s": it / 10,
                          **({"hellaswag_acc": 0.25 + it / 2000, "hellaswag_acc_norm": 0.26 + it / 1000} if hellaswag else {})})
    text = "".join(json.dumps(rec) + "\n" for rec in lines) + '{"iter": 200, "loss": 1.'  # killed mid-write
    (path / "metrics.jsonl").write_text(text)
    if with_config:
        config = {"batch_size": 12, "block_size": 64, "gradient_accumulation_steps": 1}
        (path / "train_config.json").write_text(json.dumps({"git_commit": "abc", "config": config}))
    return path


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000, f"{path} is not a real picture ({len(data)} bytes)"


def test_one_run_writes_metrics_png(tmp_path):
    run = _fake_run(tmp_path / "out-a")
    proc = run_py("-m", "forge.plot", run, check=True)
    assert "metrics.png" in proc.stdout
    _assert_png(run / "metrics.png")


def test_runs_overlaid_against_tokens(tmp_path):
    a = _fake_run(tmp_path / "out-a")
    b = _fake_run(tmp_path / "out-b", loss_scale=0.9, mfu=None, hellaswag=True)  # a CPU run: MFU unknown
    out = tmp_path / "compare.png"
    run_py("-m", "forge.plot", a, b, f"--out={out}", "--labels=base,new", "--x=tokens", check=True)
    _assert_png(out)


def test_bad_inputs_are_one_clean_line(tmp_path):
    a = _fake_run(tmp_path / "out-a")
    no_config = _fake_run(tmp_path / "out-b", with_config=False)
    empty = tmp_path / "out-empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    before = snapshot(tmp_path)
    assert_clean_error(run_py("-m", "forge.plot", tmp_path / "nope"), "nope", "does not exist")
    cases = [
        ([tmp_path], "metrics.jsonl not found"),
        ([empty], "no loss records"),
        ([a, "--labels=x,y"], "--labels has 2 names for 1"),
        ([a, no_config, "--x=tokens"], "train_config.json .* in: out-b"),
        ([a, f"--out={tmp_path / 'no' / 'dir.png'}"], "folder .* does not exist"),
        ([a, "--x=time"], "invalid choice: 'time'"),
        ([], "required: OUT_DIR"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            plot_main([str(arg) for arg in argv])
    assert snapshot(tmp_path) == before


def test_missing_matplotlib_says_what_to_install(tmp_path):
    blocker = tmp_path / "blocker" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    run = _fake_run(tmp_path / "out-a")
    proc = run_py("-m", "forge.plot", run, env={"PYTHONPATH": str(blocker.parent)})
    assert_clean_error(proc, "pip install -e '.[plot]'")
    assert not (run / "metrics.png").exists()


def test_tokens_per_iter_reads_old_runs_config_json_but_never_a_hugging_face_one(tmp_path):
    from forge.plot import tokens_per_iter_from_config

    config = {"batch_size": 4, "block_size": 8, "gradient_accumulation_steps": 2}
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"git_commit": "abc", "config": config}))
    assert tokens_per_iter_from_config(old) == 64
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", **config}))
    assert tokens_per_iter_from_config(hf) is None
