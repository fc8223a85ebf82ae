"""torch.compile stays one graph per training step: every model option, activation checkpointing, DDP and
FSDP2 (2 gloo ranks), and after a variable-width (HellaSwag-shaped) evaluation; and compile where it
cannot work falls back to eager with one warning line.

Graphs are counted with a custom backend (a public torch.compile feature) that runs each captured graph
eagerly and counts compilations and calls: fullgraph=True fails on any graph break, and one call per
step shows that the step ran compiled (a recompile-limit fallback would run it eagerly: zero calls).
"""
import os

import pytest
import torch
import torch.multiprocessing as mp

import train
from configurator import TrainConfig
from forge import distributed as D
from forge.hellaswag import ending_losses
from forge.metrics import read_metrics
from model import GPT, GPTConfig
from tests.util import end_spawned_worker, run_py

TINY = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
MODERN = dict(rotary=True, rmsnorm=True, qk_norm=True, mlp="relu2", logit_softcap=15.0, untied_head=True,
              zero_init_proj=True, bias=False)


class GraphCounter:
    """A torch.compile backend: counts the graphs it compiles and the calls into them; runs them eagerly."""

    def __init__(self):
        self.compiled = 0
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.compiled += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)

        return run


class Batches:
    """The loader interface train_step uses: next() -> (x, y)."""

    def __init__(self, batch_size=4, seed=0):
        self.generator = torch.Generator().manual_seed(seed)
        self.batch_size = batch_size

    def next(self):
        x = torch.randint(0, TINY["vocab_size"], (self.batch_size, TINY["block_size"]), generator=self.generator)
        return x, x.roll(-1, dims=1)


def compiled_steps(module, model, counter, steps=2, grad_accum=2):
    """Run training steps; returns the graph calls of each step."""
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches, calls = Batches(), []
    for _ in range(steps):
        before = counter.calls
        loss, _ = train.train_step(module, optimizer, scaler, batches, grad_accum, torch.autocast("cpu", torch.bfloat16), 1.0)
        assert torch.isfinite(loss)
        calls.append(counter.calls - before)
    return calls


@pytest.mark.parametrize("options, checkpointing, precision", [
    ({}, False, "high"),  # GPT-2
    (MODERN, False, "medium"),  # every option, and the CPU's plain-matmul attention
    (dict(mlp="swiglu", logit_softcap=30.0), True, "high"),  # activation checkpointing
])
def test_training_step_is_one_graph(options, checkpointing, precision):
    torch.set_float32_matmul_precision(precision)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, **options))
    counter = GraphCounter()
    module = D.parallelize(model, D.DistInfo(), compile=True, activation_checkpointing=checkpointing,
                           compile_options=dict(fullgraph=True, backend=counter))
    assert D.is_compiled(model) and counter.compiled == 1  # compile_problem's probe
    assert compiled_steps(module, model, counter) == [2, 2]  # 2 micro-steps, one graph each, on both steps
    assert counter.compiled == 2


def test_variable_width_evaluation_keeps_training_one_graph():
    """HellaSwag scores rows of every width with the in-place compiled model; training must stay compiled
    (a symbolic is_causal used to make the whole forward fall back to eager for the rest of the run)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    counter = GraphCounter()
    module = D.parallelize(model, D.DistInfo(), compile=True, compile_options=dict(fullgraph=True, backend=counter))
    assert compiled_steps(module, model, counter, steps=1) == [2]
    model.eval()
    for width in (5, 9, 4, 12, 7, 16):
        rows = [([1] * (width - 2), [2, 3]), ([4] * (width - 3), [5, 6, 7])]  # inputs of width - 1 tokens
        sums, counts = ending_losses(model, rows, TINY["block_size"], "cpu")
        assert torch.isfinite(sums).all() and counts.tolist() == [2, 3]
    model.train()
    compiled_before = counter.compiled
    assert compiled_steps(module, model, counter) == [2, 2]
    assert counter.compiled == compiled_before  # the training graph was kept, not recompiled


def two_rank_worker(rank, store, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    dist = D.init_distributed("cpu", timeout_s=120, init_method=f"file://{store}")
    results = {}
    for parallelism in ("ddp", "fsdp"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**TINY))
        counter = GraphCounter()
        module = D.parallelize(model, dist, parallelism=parallelism, compile=True, param_dtype=torch.bfloat16,
                               compile_options=dict(fullgraph=True, backend=counter))
        results[parallelism] = (compiled_steps(module, model, counter), counter.compiled - 1)  # less the probe
    D.destroy()
    torch.save(results, f"{out}.{rank}")
    end_spawned_worker()


def test_ddp_and_fsdp_steps_are_compiled_graphs(tmp_path):
    mp.spawn(two_rank_worker, args=(str(tmp_path / "store"), str(tmp_path / "results")), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"results.{rank}")
        assert results["ddp"] == ([2, 2], 1)  # the whole model: one graph per micro-step
        calls, compiled = results["fsdp"]
        assert calls == [2 * TINY["n_layer"]] * 2 and compiled >= 1  # FSDP2: one graph per block (torchtitan's way)


def test_compiled_run_says_compiling_and_never_times_the_compiling_step(monkeypatch, capsys, tmp_path, tiny_char_data):
    """The first logged ms/iter and MFU exclude compilation (the eager backend stands in for inductor)."""
    def parallelize_eagerly(*args, **kwargs):
        return D.parallelize(*args, **kwargs, compile_options=dict(backend="eager"))

    monkeypatch.setattr(train, "parallelize", parallelize_eagerly)
    cfg = TrainConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2, gradient_accumulation_steps=1,
                      max_iters=3, eval_interval=10, eval_iters=1, log_interval=1, device="cpu", dtype="float32",
                      compile=True, peak_flops=1e12, out_dir=str(tmp_path / "out"), data_dir=str(tiny_char_data))
    train.main(cfg)
    lines = capsys.readouterr().out.splitlines()
    compiling = [i for i, line in enumerate(lines) if line.startswith("compiling...")]
    first_step = next(i for i, line in enumerate(lines) if line.startswith("iter 0:"))
    assert len(compiling) == 1 and compiling[0] < first_step
    assert lines[first_step].endswith("not timed (compiling)") and lines[first_step + 1].startswith("compiled in ")
    assert "ms/iter" in next(line for line in lines if line.startswith("iter 1:"))
    steps = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert steps[0]["ms"] is None and steps[0]["mfu"] is None and steps[0]["loss"] > 0
    assert all(r["ms"] > 0 and r["mfu"] > 0 for r in steps[1:]) and len(steps) == 3


def test_compile_without_a_compiler_warns_and_trains_eagerly(tmp_path, tiny_char_data):
    """No C compiler (CXX and CC point nowhere, an empty kernel cache): one warning line, then eager training."""
    env = {"CXX": str(tmp_path / "no-such-c++"), "CC": str(tmp_path / "no-such-cc"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1"}
    args = [f"--{k}={v}" for k, v in dict(n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2, max_iters=2,
                                          eval_interval=2, eval_iters=1, log_interval=1, device="cpu", dtype="float32",
                                          compile=True, out_dir=tmp_path / "out", data_dir=tiny_char_data).items()]
    proc = run_py("train.py", *args, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "compiling..." not in output
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: compile=True")]
    assert len(warnings) == 1 and "--compile=False" in warnings[0], proc.stderr
    assert "iter 1: loss" in proc.stdout and "ms/iter" in proc.stdout


def test_compile_problem_names_the_failure():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no working C compiler\n(cc: not found)")

    assert D.compile_problem("cpu", "eager") is None
    assert "no working C compiler" in D.compile_problem("cpu", broken_backend)
