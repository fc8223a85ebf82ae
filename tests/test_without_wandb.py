"""Training, sampling, evaluation and the benchmark run where wandb is not installed (GPU machines may lack it):
wandb is imported only when wandb_log is on, and then its absence is one `error:` line."""
import pytest

from tests.util import assert_clean_error, run_py

# Runs each entry point as `python script.py ARGS` would, with `import wandb` failing as if not installed.
WITHOUT_WANDB = """
import runpy, sys
sys.modules["wandb"] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2", "--gradient_accumulation_steps=1",
        "--eval_interval=2", "--eval_iters=1", "--device=cpu", "--dtype=float32", "--compile=False"]


def without_wandb(*args):
    return run_py("-c", WITHOUT_WANDB, *args, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.usefixtures("one_thread")
def test_entry_points_run_without_wandb_installed(tmp_path, tiny_char_data):
    out, data = str(tmp_path / "run"), f"--data_dir={tiny_char_data}"
    for args in (["train.py", *TINY, data, f"--out_dir={out}", "--max_iters=2"],
                 ["sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=5", "--device=cpu"],
                 ["evaluate.py", f"--out_dir={out}", data, "--limit_tokens=64", "--device=cpu"],
                 ["bench.py", *TINY, "--real_data=False", "--warmup_steps=1", "--steps=1", "--phase_steps=0"]):
        proc = without_wandb(*args)
        assert proc.returncode == 0, f"{args[0]}: {proc.stderr[-2000:]}"

    proc = without_wandb("train.py", *TINY, data, f"--out_dir={tmp_path / 'logged'}", "--max_iters=2", "--wandb_log=True")
    assert_clean_error(proc, "wandb_log=True but the wandb package is not installed")
