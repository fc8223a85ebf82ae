"""bench.py: sane, self-consistent figures on a tiny CPU model; real data; the profiler trace; bad input."""
import json
import math
import re

import pytest
import torch

import bench
from bench import BenchConfig
from configurator import ConfigError
from forge.errors import UserError
from forge.optim import build_optimizer
from forge.tokenize import DataError
from tests.util import assert_clean_error, run_py, snapshot

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, gradient_accumulation_steps=2,
            device="cpu", dtype="float32", compile=False, warmup_steps=1, steps=3, phase_steps=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def run_bench(capsys, **overrides) -> str:
    bench.main(BenchConfig(**{**TINY, **overrides}))
    return capsys.readouterr().out


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return float(match.group(1).replace(",", ""))


def test_synthetic_run_prints_consistent_figures(capsys, tmp_path):
    out = run_bench(capsys, real_data=False, vocab_size=50, peak_flops=1e10, out_dir=str(tmp_path))
    assert "vocab 50," in out and "random tokens" in out
    assert "128 tokens per iteration" in out  # 2 x 4 x 16
    # random tokens: the loss starts near ln(vocab)
    assert number(r"loss ([\d.]+) after warm-up", out) == pytest.approx(math.log(50), abs=0.3)
    ms = number(r"ms/iter ([\d.]+)", out)
    assert 0 < ms < 10_000
    assert number(r"tokens/s ([\d,]+)", out) == pytest.approx(128 / (ms / 1000), rel=0.01, abs=1)
    # MFU = FLOPs per token x tokens/s / peak, with the model's own FLOP count
    model = bench.create_model(BenchConfig(**TINY), "scratch", None, 50)[0]
    mfu = model.flops_per_token() * 128 / (ms / 1000) / 1e10
    assert number(r"MFU ([\d.]+)%", out) == pytest.approx(100 * mfu, rel=0.02, abs=0.06)
    assert "peak memory" in out and "MiB peak RSS" in out
    shares = [number(rf"{phase} (\d+)%", out) for phase in bench.PHASES]
    assert sum(shares) == pytest.approx(100, abs=2) and shares[1] > 0 and shares[2] > 0
    assert list(tmp_path.iterdir()) == []  # no profile asked: nothing written


def test_without_a_peak_the_mfu_says_how_to_get_one(capsys):
    out = run_bench(capsys, real_data=False, vocab_size=50, phase_steps=0)
    assert "MFU n/a" in out and "--peak_flops" in out
    assert "time split" not in out  # phase_steps=0 skips the second pass


def test_real_data_uses_the_dataset_and_its_vocabulary(capsys, tiny_char_data):
    vocab_size = json.loads((tiny_char_data / "meta.json").read_text())["vocab_size"]
    out = run_bench(capsys, data_dir=str(tiny_char_data))
    assert f"vocab {vocab_size}," in out and "train split" in out
    # character text: after a few steps the loss is already below uniform guessing
    assert number(r"([\d.]+) at the end", out) < math.log(vocab_size)


def test_random_tokens_take_the_prepared_vocabulary_by_default(capsys, tiny_char_data):
    vocab_size = json.loads((tiny_char_data / "meta.json").read_text())["vocab_size"]
    out = run_bench(capsys, data_dir=str(tiny_char_data), real_data=False, phase_steps=0)
    assert f"vocab {vocab_size}," in out and "random tokens" in out


def test_profile_writes_a_chrome_trace_with_the_phases(capsys, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"a previous run")
    before = snapshot(tmp_path)
    out = run_bench(capsys, real_data=False, vocab_size=50, phase_steps=0, profile=True, profile_steps=2,
                    out_dir=str(tmp_path))
    traces = sorted(tmp_path.glob("bench-trace-*.json"))
    assert len(traces) == 1 and str(traces[0]) in out
    names = {event.get("name") for event in json.loads(traces[0].read_text())["traceEvents"]}
    assert {"data", "forward", "backward", "optimizer"} <= names
    assert {p: b for p, b in snapshot(tmp_path).items() if p.name == "ckpt.pt"} == before
    run_bench(capsys, real_data=False, vocab_size=50, phase_steps=0, profile=True, profile_steps=1,
              out_dir=str(tmp_path))
    assert len(list(tmp_path.glob("bench-trace-*.json"))) == 2  # a second trace never replaces the first


@pytest.mark.parametrize("impl", ["for-loop", "foreach"])
def test_adamw_kernel_switch_keeps_the_arithmetic(impl):
    """The classic-baseline knob changes only the kernel: one step matches the fused one."""
    def one_step(kernel):
        torch.manual_seed(0)
        cfg = BenchConfig(**TINY)
        model = bench.create_model(cfg, "scratch", None, 50)[0]
        optimizer = build_optimizer(model, "adamw", 0.1, 1e-2, (0.9, 0.95), "cpu")
        bench.set_adamw_impl(optimizer, kernel)
        x = torch.randint(0, 50, (4, 16))
        model(x, x)[1].backward()
        optimizer.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.allclose(one_step(impl), one_step("fused"), atol=1e-6)


def test_bad_settings_are_named(tmp_path, tiny_char_data):
    with pytest.raises(DataError, match="real_data=False"):
        bench.main(BenchConfig(**TINY, data_dir=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="vocab_size"):
        bench.main(BenchConfig(**TINY, data_dir=str(tiny_char_data), vocab_size=100))
    with pytest.raises(ConfigError, match="adamw_impl"):
        bench.main(BenchConfig(**TINY, real_data=False, vocab_size=50, optimizer="muon", adamw_impl="fused"))
    with pytest.raises(ConfigError, match="steps"):
        BenchConfig(**{**TINY, "steps": 0})


def test_missing_data_is_one_clean_line(tmp_path):
    before = snapshot(tmp_path)
    proc = run_py("bench.py", f"--data_dir={tmp_path / 'nowhere'}", "--device=cpu", "--compile=False",
                  "--n_layer=1", "--n_head=1", "--n_embd=8", "--block_size=8", "--batch_size=2",
                  env={"OMP_NUM_THREADS": "1"}, timeout=120)
    assert_clean_error(proc, "nowhere", "--real_data=False")
    assert snapshot(tmp_path) == before


def test_medium_matmul_precision_only_where_the_cpu_has_bf16(monkeypatch):
    from forge import precision

    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: False)
    assert precision.set_matmul_precision("medium", "cpu") == "high"
    assert torch.get_float32_matmul_precision() == "high"
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: True)
    assert precision.set_matmul_precision("medium", "cpu") == "medium"
    assert torch.get_float32_matmul_precision() == "medium"
    assert precision.set_matmul_precision("highest", "cpu") == "highest"
    with pytest.raises(UserError, match="matmul_precision"):
        precision.set_matmul_precision("low", "cpu")


def test_medium_matmul_precision_keeps_the_loss():
    """bf16 products with float32 accumulation: the loss moves by bf16 rounding, not more."""
    from forge import precision

    if not precision.cpu_has_bf16_matmul():
        pytest.skip("this CPU has no bf16 matmul hardware: 'medium' falls back to float32")
    torch.manual_seed(0)
    model = bench.create_model(BenchConfig(**{**TINY, "n_embd": 64}), "scratch", None, 50)[0]
    x = torch.randint(0, 50, (4, 16))
    losses = {}
    for name in ("highest", "medium"):
        precision.set_matmul_precision(name, "cpu")
        losses[name] = model(x, x)[1].item()
    assert losses["medium"] != losses["highest"]  # the bf16 path really ran
    assert losses["medium"] == pytest.approx(losses["highest"], abs=2e-2)
