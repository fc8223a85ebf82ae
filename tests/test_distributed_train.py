"""train.py under the launchers on CPU (gloo): DDP and FSDP equal one process, two "nodes" over a
loopback rendezvous, a killed worker restarts and ends like an uninterrupted run, a hung worker
hits the collective timeout, bad input is one line.

Every run trains the same tiny model on the same global batches with dropout 0, so all of them
follow one reference trajectory: a single in-process run that keeps a checkpoint every EVAL steps.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from configurator import TrainConfig
from forge.checkpoint import load_checkpoint, load_model
from forge.metrics import read_metrics
from tests.util import REPO, assert_clean_error

EVAL, MAX_ITERS = 20, 200
# No biases: a key bias gets a gradient of pure rounding noise, which Adam turns into lr-sized steps.
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, gradient_accumulation_steps=2, bias=False,
            dropout=0.0, max_iters=MAX_ITERS, lr_decay_iters=MAX_ITERS, warmup_iters=10, learning_rate=1e-2,
            min_lr=1e-3, eval_interval=EVAL, eval_iters=2, log_interval=1, device="cpu", dtype="float32",
            compile=False)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_char_data):
    """TINY as a config file, which is how the launchers take a configuration."""
    path = tmp_path_factory.mktemp("config") / "tiny.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in {**TINY, "data_dir": str(tiny_char_data)}.items()))
    return path


def train_in_process(data_dir, out_dir, **overrides) -> None:
    """train.py's main in this process: one process, no torchrun, one thread (tiny model, busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(TrainConfig(**{**TINY, "data_dir": str(data_dir), "out_dir": str(out_dir), **overrides}))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_char_data):
    """The uninterrupted one-process run: ckpt-<iter>.pt every EVAL steps and the loss of every step."""
    out = tmp_path_factory.mktemp("reference")
    train_in_process(tiny_char_data, out, keep_last=MAX_ITERS // EVAL)
    return out


def weights(path) -> dict:
    return load_checkpoint(path)["model"]


def step_losses(out_dir) -> dict:
    return {r["iter"]: r["loss"] for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "loss" in r}


# DDP sums the same gradients in the same order as one process: equal up to the last bits. FSDP's
# gradient norm (for clipping) adds per-shard partial sums, a rounding difference that 40 Adam steps
# grow to ~1e-5; a real fault (a shard loaded wrong, ranks initialised apart) is ~1e-1.
EXACT, ROUNDED = dict(rtol=1e-5, atol=1e-6), dict(rtol=1e-4, atol=1e-4)


def assert_same_weights(actual: dict, expected: dict, tolerance=EXACT):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **tolerance, msg=name)


def assert_same_losses(out_dir, reference, last_iter, rel=1e-5):
    losses, expected = step_losses(out_dir), step_losses(reference)
    assert sorted(losses) == list(range(last_iter))
    assert [losses[i] for i in range(last_iter)] == pytest.approx([expected[i] for i in range(last_iter)], rel=rel)


def launcher_env(**extra) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def launch(script, *args, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "launch" / script), *map(str, args)], cwd=REPO, env=launcher_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def start(script, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(REPO / "launch" / script), *map(str, args)], cwd=REPO,
                            env=launcher_env(**(env or {})), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_ok(proc):
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pid(launcher: subprocess.Popen, rank: int, deadline_s: float = 60) -> int:
    """The pid of the worker with RANK=rank among the launcher's children (torchrun's workers)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child)
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher.pid}")


def wait_for(path: Path, launcher: subprocess.Popen, deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    while not path.exists():
        assert launcher.poll() is None, f"launcher exited {launcher.returncode} before {path} appeared: " \
                                        f"{launcher.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_two_nodes_train_together_and_ddp_equals_one_process(tmp_path, config_file, reference):
    """Two launchers (the real multi-node code path: c10d rendezvous on loopback), one process each:
    a 2-process DDP run with the same global batch as the 1-process reference, step for step."""
    out, endpoint = tmp_path / "two_nodes", f"127.0.0.1:{free_port()}"
    nodes = [start("multi_node.sh", "--nnodes=2", f"--rdzv_endpoint={endpoint}", "--rdzv_id=loopback",
                   "--nproc_per_node=1", "--max_restarts=0", config_file, f"--out_dir={out}", "--max_iters=40")
             for _ in range(2)]
    for node in nodes:
        stdout, stderr = node.communicate(timeout=240)
        assert_ok(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    assert_same_losses(out, reference, 40)
    assert_same_weights(weights(out), weights(reference / "ckpt-40.pt"))


def test_fsdp_trains_resumes_and_loads_in_one_process_and_sample(tmp_path, config_file, reference, tiny_char_data):
    out, copy = tmp_path / "fsdp", tmp_path / "fsdp_at_20"
    args = ["--nproc_per_node=2", config_file, f"--out_dir={out}", "--parallelism=fsdp", "--activation_checkpointing=True"]
    assert_ok(launch("single_node.sh", *args, "--max_iters=20"))
    shutil.copytree(out, copy)
    assert_ok(launch("single_node.sh", *args, "--max_iters=40"))  # the launcher's init_from=auto resumes
    assert_same_losses(out, reference, 40, rel=1e-4)
    assert_same_weights(weights(out), weights(reference / "ckpt-40.pt"), ROUNDED)
    # The 2-rank FSDP checkpoint resumes in one process (another world size) on the same trajectory ...
    train_in_process(tiny_char_data, copy, init_from="resume", max_iters=40)
    assert_same_weights(weights(copy), weights(reference / "ckpt-40.pt"), ROUNDED)
    # ... and loads as sample.py / evaluate.py load it.
    model, ckpt = load_model(out)
    assert ckpt["iter_num"] == 40
    assert_same_weights({k: v for k, v in model.state_dict().items() if k in ckpt["model"]}, ckpt["model"])


def test_killed_worker_restarts_from_checkpoint_and_ends_like_uninterrupted(tmp_path, config_file, reference):
    out = tmp_path / "killed"
    launcher = start("single_node.sh", "--nproc_per_node=2", "--max_restarts=1", config_file, f"--out_dir={out}")
    wait_for(out / "ckpt.pt", launcher)
    os.kill(worker_pid(launcher, rank=1), signal.SIGKILL)
    stdout, stderr = launcher.communicate(timeout=240)
    assert_ok(subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr))
    assert "resuming from" in stdout, stdout  # the restarted group continued from the checkpoint
    assert_same_losses(out, reference, MAX_ITERS)  # every step once, none twice, the same losses
    assert_same_weights(weights(out), weights(reference))


def test_hung_worker_hits_the_collective_timeout_with_a_clear_message(tmp_path, config_file):
    out = tmp_path / "hung"
    launcher = start("single_node.sh", "--nproc_per_node=2", "--max_restarts=0", config_file, f"--out_dir={out}",
                     "--dist_timeout_s=3")
    wait_for(out / "ckpt.pt", launcher)
    waiting, hung = worker_pid(launcher, rank=0), worker_pid(launcher, rank=1)
    os.kill(hung, signal.SIGSTOP)  # alive but frozen: its peer waits for it in the next collective
    started = time.monotonic()
    while Path(f"/proc/{waiting}").exists() and time.monotonic() - started < 60:
        time.sleep(0.1)
    assert time.monotonic() - started < 30, "rank 0 did not give up on the hung rank"
    # torchrun now stops the frozen worker (SIGTERM, then SIGKILL after its 30 s grace): do it at once.
    os.kill(hung, signal.SIGKILL)
    stdout, stderr = launcher.communicate(timeout=120)
    line = assert_clean_error(subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr),
                              "rank 0", "waiting up to 3s", "another rank hung or died", "dist_timeout_s")
    assert launcher.returncode == 3, line


def test_world_size_not_dividing_accumulation_is_one_line_on_every_rank(tmp_path, config_file):
    proc = launch("single_node.sh", "--nproc_per_node=2", config_file, f"--out_dir={tmp_path / 'bad'}",
                  "--gradient_accumulation_steps=3")
    assert_clean_error(proc, "gradient_accumulation_steps=3", "2 processes")
    assert proc.returncode == 2
    assert not (tmp_path / "bad" / "ckpt.pt").exists()


ONLY_RANK_1_FAILS = """
import os
from forge.errors import UserError, run_main

def main():
    if os.environ["RANK"] == "1":
        raise UserError("data/only-here/train.bin is missing on this node: copy the data folder there")

run_main(main)
"""


def test_user_error_only_a_silent_rank_hits_is_reported_once_by_the_launcher(tmp_path):
    """run_main prints on local rank 0 only; the launcher prints what rank 1 alone hit, once, after the restarts
    torchrun makes whatever the failure (no public hook skips them; forge.launch.check_before_launch
    catches the mistakes every rank would hit before any worker starts)."""
    script = tmp_path / "only_rank_1_fails.py"
    script.write_text(ONLY_RANK_1_FAILS)
    proc = subprocess.run([sys.executable, "-m", "forge.launch", "--standalone", "--nproc_per_node=2", "--max_restarts=3",
                           str(script)], cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=120)
    assert_clean_error(proc, "rank 1", "data/only-here/train.bin is missing on this node")
    assert proc.returncode == 2


def test_launchers_check_their_arguments_before_starting(tmp_path, config_file):
    assert_clean_error(launch("single_node.sh", config_file, "--max_itrs=3"), "max_itrs", "max_iters")
    assert_clean_error(launch("single_node.sh", "--nproc_per_node=two", config_file), "nproc_per_node")
    assert_clean_error(launch("multi_node.sh", config_file), "--nnodes")
    assert_clean_error(launch("multi_node.sh", "--nnodes=2", "--rdzv_endpoint=node0", config_file), "HOST:PORT")
    assert_clean_error(launch("slurm.sbatch", config_file, env={"SLURM_JOB_ID": ""}), "sbatch")


def test_slurm_script_runs_one_launcher_per_node_with_the_first_host_as_rendezvous(tmp_path, config_file):
    """scontrol and srun replaced by stand-ins that record what the script asks of them (no SLURM here)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "srun_args"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames node-[a,b]" ] && printf "node-a\\nnode-b\\n"\n')
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "NPROC_PER_NODE=$NPROC_PER_NODE" "$@" > {calls}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node-[a,b]", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_GPUS_ON_NODE": "8"}
    assert_ok(launch("slurm.sbatch", config_file, "--max_iters=5", env=env))
    args = calls.read_text().splitlines()
    assert args[args.index("launch/multi_node.sh"):] == [
        "launch/multi_node.sh", "--nnodes=2", "--rdzv_endpoint=node-a:29500", "--rdzv_id=slurm-42",
        str(config_file), "--max_iters=5"]
    assert "--kill-on-bad-exit=1" in args and "--ntasks-per-node=1" in args
    assert args[0] == "NPROC_PER_NODE=8"  # one process per GPU SLURM gave the node
