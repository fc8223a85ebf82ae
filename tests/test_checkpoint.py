"""forge/checkpoint.py: atomic saves, history, safe and clear loading, RNG state, old nanoGPT checkpoints."""
import errno
import os
import random

import numpy as np
import pytest
import torch

import train
from forge import checkpoint
from forge.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from model import GPT, GPTConfig
from tests.test_train import tiny_config
from tests.util import run_py, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, dropout=0.0, bias=True)


def state(iter_num=1, **extra):
    torch.manual_seed(iter_num)
    model = GPT(GPTConfig(**ARGS))
    return {"model": model.state_dict(), "model_args": dict(ARGS), "iter_num": iter_num, "best_val_loss": 1.0,
            "config": {}, **extra}


def test_save_is_atomic_and_keeps_numbered_history(tmp_path):
    for it in (1, 2, 3, 4):
        save_checkpoint(tmp_path, state(it), keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep_last.json", "ckpt-3.pt", "ckpt-4.pt", "ckpt.pt"]
    assert load_checkpoint(tmp_path)["iter_num"] == 4
    assert load_checkpoint(tmp_path / "ckpt-3.pt")["iter_num"] == 3
    save_checkpoint(tmp_path, state(5))  # keep_last=0 leaves the history alone
    assert load_checkpoint(tmp_path / "ckpt-4.pt")["iter_num"] == 4


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, state(1))
    before = snapshot(tmp_path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device; the previous checkpoint is intact"):
        save_checkpoint(tmp_path, state(2))
    assert snapshot(tmp_path) == before  # no temporary file left behind either


def test_out_dir_that_cannot_be_created_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="cannot save the checkpoint in .*file/out"):
        save_checkpoint(tmp_path / "file" / "out", state(1))


@pytest.mark.parametrize("kind, message", [
    ("missing", "no checkpoint at"),
    ("empty", "is empty"),
    ("truncated", "truncated or corrupt"),
    ("garbage", "truncated or corrupt"),
    ("not_a_dict", "not a training checkpoint"),
    ("no_model", "not a training checkpoint"),
    ("code", "holds a pickled .*print.*would run code"),
])
def test_unloadable_checkpoints_are_clear_errors(tmp_path, kind, message, capsys):
    path = tmp_path / "ckpt.pt"
    if kind != "missing":
        save_checkpoint(tmp_path, state(1))
        data = path.read_bytes()
        if kind == "empty":
            path.write_bytes(b"")
        elif kind == "truncated":
            path.write_bytes(data[: len(data) // 3])
        elif kind == "garbage":
            path.write_bytes(b"\x80\x02garbage" * 50)
        elif kind == "not_a_dict":
            torch.save([torch.zeros(1)], path)
        elif kind == "no_model":
            torch.save({"weights": torch.zeros(1)}, path)
        elif kind == "code":
            torch.save({"model": {}, "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)
    assert "this must never run" not in capsys.readouterr().out


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_prefixes_are_stripped_and_load_model_rebuilds(tmp_path):
    s = state(1)
    s["model"] = {f"_orig_mod.module.{k}": v for k, v in s["model"].items()}
    torch.save(s, tmp_path / "ckpt.pt")
    model, ckpt = load_model(tmp_path, "cpu")
    assert not model.training and ckpt["model_type"] == "gpt"
    reference = state(1)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())


def test_load_model_rejects_weights_of_another_shape(tmp_path):
    s = state(1)
    s["model_args"] = {**ARGS, "n_embd": 32}
    save_checkpoint(tmp_path, s)
    with pytest.raises(CheckpointError, match=r"does not fit the model \(shape of"):
        load_model(tmp_path)


# Loads a 128 MiB checkpoint and prints how much the process's resident memory grew, in MiB.
RESIDENT_GROWTH_ON_LOAD = """
import os, sys
from forge.checkpoint import load_checkpoint
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20
before = resident_mib()
ckpt = load_checkpoint(sys.argv[1])
print(resident_mib() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from Linux's /proc")
def test_loading_maps_the_checkpoint_instead_of_copying_it(tmp_path):
    """Every rank loads the checkpoint on resume: mapped, they share the page cache instead of a copy each."""
    save_checkpoint(tmp_path, {"model": {"w": torch.ones(32 * 1024 * 1024)}, "iter_num": 1})  # 128 MiB
    growth_mib = int(run_py("-c", RESIDENT_GROWTH_ON_LOAD, tmp_path, check=True).stdout)
    assert growth_mib < 32  # read into memory, it would be >= 128
    assert float(load_checkpoint(tmp_path)["model"]["w"][-1]) == 1.0


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.normal()  # a cached gaussian is part of numpy's state
    save_checkpoint(tmp_path, {**state(1), "rng": checkpoint.gather_rng_states()})
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    assert checkpoint.restore_rng_states(load_checkpoint(tmp_path)["rng"], rank=0, world_size=1) is None  # all of it
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]
    assert "saved by 1 process(es), not 2" in checkpoint.restore_rng_states(load_checkpoint(tmp_path)["rng"], 0, 2)


@pytest.mark.parametrize("visible, restored, note", [
    (2, [0, 1], None),
    (1, [0], "GPU(s) 1 were saved but this process sees 1 GPU(s)"),
    (3, [0, 1], "no saved CUDA random state for GPU(s) 2"),
    (0, [], "GPU(s) 0, 1 were saved but this process sees 0 GPU(s)"),
])
def test_cuda_random_states_restore_per_device_and_say_what_they_could_not(monkeypatch, visible, restored, note):
    """Faked on the CPU through the restoring function: states saved on 2 GPUs, resumed with `visible` GPUs."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((device, int(state[0]))))
    state = {**checkpoint.rng_state(), "cuda": [torch.tensor([10], dtype=torch.uint8), torch.tensor([11], dtype=torch.uint8)]}
    result = checkpoint.set_rng_state(state)
    assert calls == [(i, 10 + i) for i in restored]
    assert result is None if note is None else note in result


def test_old_nanogpt_checkpoint_resumes(tmp_path, tiny_char_data):
    """A checkpoint as nanoGPT wrote it: compiled-model prefixes, mask buffers, index-keyed optimizer, no rng/data/scaler."""
    cfg = tiny_config(tmp_path / "old", tiny_char_data, dropout=0.0, max_iters=6)
    vocab = train.model_vocab_size(train.load_meta(tiny_char_data))
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                      bias=cfg.bias, vocab_size=vocab, dropout=0.0)
    model = GPT(GPTConfig(**model_args))
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu")
    _, loss = model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    loss.backward()
    optimizer.step()
    nanogpt_config = {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "block_size": cfg.block_size,
                      "bias": cfg.bias, "dataset": "shakespeare_char", "batch_size": 12}
    cfg_dir = tmp_path / "old"
    cfg_dir.mkdir()
    old_weights = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    for layer in range(cfg.n_layer):  # the causal-mask buffer nanoGPT kept before torch 2.0
        old_weights[f"_orig_mod.transformer.h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    torch.save({"model": old_weights,
                "optimizer": optimizer.state_dict(), "model_args": model_args, "iter_num": 4,
                "best_val_loss": torch.tensor(3.5), "config": nanogpt_config}, cfg_dir / "ckpt.pt")
    # nanoGPT's MLP is the exact (erf) GELU, and a config built in code sets every key, so it says so
    train.main(tiny_config(cfg_dir, tiny_char_data, dropout=0.0, max_iters=6, init_from="resume", mlp="gelu_exact"))
    resumed = load_checkpoint(cfg_dir)
    assert resumed["iter_num"] == 6 and set(resumed["rng"][0]) >= {"torch", "numpy", "python"}
    assert resumed["data"]["step"] == 6
