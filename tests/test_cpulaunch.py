"""`python train.py` on a CPU as one process per physical core (forge/cpulaunch.py): the plan, the same
weights as one process, Ctrl-C / SIGTERM save once, bad input is one line, no relaunch under torchrun."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import train
from configurator import TrainConfig
from forge import cpulaunch
from forge.checkpoint import load_checkpoint
from forge.errors import UserError
from tests.test_distributed_train import TINY, assert_same_weights, step_losses, train_in_process, weights
from tests.util import REPO, assert_clean_error

STEPS = 30
RUN = {**TINY, "max_iters": STEPS, "lr_decay_iters": STEPS, "eval_interval": STEPS}


def cli(out_dir, data_dir, **overrides) -> list:
    return [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}"
            for k, v in {**RUN, "out_dir": str(out_dir), "data_dir": str(data_dir), **overrides}.items()]


def python_env(**extra) -> dict:
    """The user's environment without a thread count (unless extra sets one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", *cpulaunch.TORCHRUN_ENV)}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
               **extra)
    return env


def run_train(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=REPO, env=python_env(**env),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("procs, environ, memory, expected", [
    ("auto", {}, None, (2, 2)),  # 4 cores, accumulation 2: 2 processes, the cores shared out
    ("auto", {}, 1, (1, None)),  # no memory for a second process
    ("auto", {"OMP_NUM_THREADS": "3"}, None, (1, 3)),  # the user set the threads: one process
    (4, {}, None, (4, 1)),
    (2, {"OMP_NUM_THREADS": "1"}, None, (2, 1)),  # both set: both respected
    (1, {}, None, (1, None)),
])
def test_plan_follows_the_cores_the_accumulation_and_the_users_counts(procs, environ, memory, expected):
    cfg = TrainConfig(gradient_accumulation_steps=4 if procs == 4 else 2, n_layer=2, n_embd=64, n_head=2,
                      block_size=32, cpu_procs=procs)
    assert cpulaunch.plan_processes(cfg, cores=4, environ=environ, memory=memory) == expected


def test_plan_counts_one_process_per_core_that_divides_the_accumulation():
    plan = lambda accum, cores: cpulaunch.plan_processes(TrainConfig(gradient_accumulation_steps=accum), cores, {})
    assert plan(40, 8) == (8, 1) and plan(40, 6) == (5, 1) and plan(3, 2) == (1, None) and plan(40, 1) == (1, None)
    with pytest.raises(UserError, match="cpu_procs=3 does not divide gradient_accumulation_steps=40"):
        cpulaunch.plan_processes(TrainConfig(gradient_accumulation_steps=40, cpu_procs=3), 8, {})


def test_physical_cores_count_smt_siblings_once(tmp_path, monkeypatch):
    for cpu, siblings in enumerate(["0,2", "1,3", "0,2", "1,3"]):  # 2 cores with 2 hardware threads each
        (tmp_path / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "topology" / "thread_siblings_list").write_text(siblings + "\n")
    monkeypatch.setattr(cpulaunch, "CPU_SYSFS", tmp_path)
    monkeypatch.setattr(cpulaunch, "cgroup_cpu_quota", lambda: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cpulaunch.physical_cores() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2})  # pinned to one core's two threads
    assert cpulaunch.physical_cores() == 1
    monkeypatch.setattr(cpulaunch, "cgroup_cpu_quota", lambda: 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cpulaunch.physical_cores() == 1


@pytest.mark.parametrize("env, launches", [({}, True), ({"RANK": "0", "WORLD_SIZE": "2"}, False),
                                           ({"OMP_NUM_THREADS": "2"}, False)])
def test_relaunch_only_outside_launchers_and_without_a_thread_count(monkeypatch, env, launches):
    for name in ("OMP_NUM_THREADS", *cpulaunch.TORCHRUN_ENV, cpulaunch.LAUNCHER_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cpulaunch, "physical_cores", lambda: 2)
    started = []
    monkeypatch.setattr(cpulaunch, "run_workers", lambda *args: started.append(args) or 0)
    code = cpulaunch.train_on_cpu_cores(TrainConfig(**TINY), "train.py", ["--max_iters=1"])
    assert [args[:4] for args in started] == ([("train.py", ["--max_iters=1"], 2, 1)] if launches else [])
    assert code == (0 if launches else None)
    assert cpulaunch.train_on_cpu_cores(TrainConfig(**{**TINY, "eval_only": True}), "train.py", []) is None


WORKER_REPORT = """
import json, os, sys, torch
with open(os.path.join(sys.argv[1], os.environ["RANK"]), "w") as f:
    json.dump({k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "OMP_NUM_THREADS")}
              | {"threads": torch.get_num_threads(), "pid": os.getpid(), "session": os.getsid(0)}, f)
"""


@pytest.mark.parametrize("forked", [True, False])
def test_workers_are_forks_of_a_single_threaded_launcher_else_new_interpreters(tmp_path, forked):
    """Each rank gets its environment, its thread count and its own session either way; a launcher that runs
    another thread (where a fork could inherit a held lock) starts new interpreters instead."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER_REPORT)
    launcher = f"""
import json, os, runpy, sys, threading
from forge import cpulaunch
out = sys.argv[1]
if {not forked}:
    threading.Thread(target=threading.Event().wait, daemon=True).start()
assert cpulaunch.forked_workers_safe() == {forked}
code = cpulaunch.run_workers({str(script)!r}, [out], 2, 1, lambda: runpy.run_path({str(script)!r}, run_name="w"))
print(json.dumps({{"code": code, "pid": os.getpid(), "session": os.getsid(0)}}))
"""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", launcher, str(out)], cwd=REPO, env=python_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    parent = json.loads(proc.stdout.strip().splitlines()[-1])
    reports = {name: json.loads((out / name).read_text()) for name in ("0", "1")}
    assert parent["code"] == 0 and len({r["MASTER_PORT"] for r in reports.values()}) == 1
    for rank, report in reports.items():
        assert report["RANK"] == rank and report["WORLD_SIZE"] == "2" and report["OMP_NUM_THREADS"] == "1"
        assert report["threads"] == 1 and report["pid"] == report["session"] != parent["session"]


def test_two_processes_train_the_same_weights_as_one(tmp_path, tiny_char_data):
    one, two = tmp_path / "one", tmp_path / "two"
    train_in_process(tiny_char_data, one, max_iters=STEPS, lr_decay_iters=STEPS, eval_interval=STEPS)
    proc = run_train(*cli(two, tiny_char_data, cpu_procs=2))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert "training on 2 CPU processes x 1 thread(s)" in proc.stdout and "2 process(es) on cpu" in proc.stdout
    losses, expected = step_losses(two), step_losses(one)
    assert sorted(losses) == list(range(STEPS)) and [losses[i] for i in range(STEPS)] == pytest.approx(
        [expected[i] for i in range(STEPS)], rel=1e-5)
    assert_same_weights(weights(two), weights(one))  # the gradient all-reduce sums in another order: rounding only


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_command_saves_once_and_exits_zero(tmp_path, tiny_char_data, signum):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "train.py", *cli(out, tiny_char_data, cpu_procs=2, max_iters=100_000,
                                                              eval_interval=1000, lr_decay_iters=100_000)],
                            cwd=REPO, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(step_losses(out) if (out / "metrics.jsonl").exists() else ()) < 3:
        time.sleep(0.2)
    proc.send_signal(signum)  # to the command only, as a terminal's Ctrl-C or a scheduler's SIGTERM
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in stderr, stdout + stderr
    assert stdout.count(f"saved checkpoint to {out / 'ckpt.pt'} (stopped by {signum.name})") == 1, stdout
    stopped_at = load_checkpoint(out)["iter_num"]
    assert stopped_at >= 3 and sorted(step_losses(out)) == list(range(stopped_at))


def test_bad_input_is_one_line_before_or_after_the_processes_start(tmp_path, tiny_char_data):
    proc = run_train(*cli(tmp_path / "a", tiny_char_data, cpu_procs=3))  # checked before any process starts
    assert_clean_error(proc, "cpu_procs=3", "gradient_accumulation_steps=2")
    assert "training on" not in proc.stdout
    proc = run_train(*cli(tmp_path / "b", tiny_char_data, cpu_procs=2, init_from="resume"))  # found by the workers
    assert_clean_error(proc, "init_from=resume", "ckpt.pt")
    assert "training on 2 CPU processes" in proc.stdout and proc.returncode == 2
