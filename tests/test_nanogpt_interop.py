"""nanoGPT in both directions, with its formats written as nanoGPT writes them (tests/nanogpt_reference.py).

nanoGPT -> us: its checkpoint (seven model_args keys, `_orig_mod.` prefixes from torch.compile, the
`attn.bias` mask buffers of torch < 2.0, an index-keyed AdamW state, its config dict, a tensor
best_val_loss) and its data folder (uint16 bins, meta.pkl) load as the erf-GELU model it is, with
nanoGPT's logits, and resume with `--out_dir --init_from=resume` alone, as the same function.
us -> nanoGPT: a checkpoint of ours that uses only GPT-2's architecture loads in nanoGPT's
sample.py (`GPTConfig(**model_args)`, strict load_state_dict); one with an option nanoGPT lacks is
refused by it, and round-trips through our own loader.
"""
import pickle

import numpy as np
import pytest
import torch

import train
from forge.checkpoint import NANOGPT_MODEL_ARGS, checkpoint_model_args, load_checkpoint, load_model, model_args_of
from forge.data import TokenBatches
from forge.metrics import read_metrics
from forge.tokenize import tokenizer_identity
from tests.nanogpt_reference import (NANOGPT_TRAIN_CONFIG, NanoGPT, NanoGPTConfig, load_like_nanogpt_sample)
from tests.test_train import tiny_config
from tests.util import REPO, run_py

pytestmark = pytest.mark.usefixtures("one_thread")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True)


def write_nanogpt_char_data(folder, text: str):
    """nanoGPT's data/shakespeare_char/prepare.py output: uint16 bins and a meta.pkl with itos/stoi dicts."""
    folder.mkdir(parents=True)
    chars = sorted(set(text))
    stoi, itos = {ch: i for i, ch in enumerate(chars)}, dict(enumerate(chars))
    n = int(len(text) * 0.9)
    np.array([stoi[c] for c in text[:n]], dtype=np.uint16).tofile(folder / "train.bin")
    np.array([stoi[c] for c in text[n:]], dtype=np.uint16).tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return len(chars)


def trained_like_a_real_run(model: NanoGPT) -> NanoGPT:
    """Weights whose MLP inputs are as large as a trained model's (where erf and tanh GELU differ visibly)."""
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight.normal_(0.0, 0.5)
            block.mlp.c_fc.bias.normal_(0.0, 0.5)
            block.mlp.c_proj.weight.normal_(0.0, 0.2)
    return model


def write_nanogpt_run(root, vocab_size: int, flash: bool = True):
    """out-shakespeare-char/ckpt.pt as nanoGPT's train.py saves it at iter 4 (compiled model, AdamW stepped)."""
    torch.manual_seed(0)
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=vocab_size, dropout=0.2)
    model = trained_like_a_real_run(NanoGPT(NanoGPTConfig(**model_args), flash))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))
    _, loss = model(torch.randint(0, vocab_size, (2, 16)), torch.randint(0, vocab_size, (2, 16)))
    loss.backward()
    optimizer.step()
    config = {**NANOGPT_TRAIN_CONFIG, "out_dir": "out-shakespeare-char", "eval_interval": 2, "eval_iters": 2,
              "log_interval": 1, "always_save_checkpoint": False, "dataset": "shakespeare_char",
              "gradient_accumulation_steps": 1, "batch_size": 4, "learning_rate": 1e-3, "max_iters": 4,
              "lr_decay_iters": 50, "min_lr": 1e-4, "beta2": 0.99, "warmup_iters": 2, **model_args}
    out = root / "out-shakespeare-char"
    out.mkdir()
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "model_args": model_args, "iter_num": 4,
                "best_val_loss": torch.tensor(4.1), "config": config}, out / "ckpt.pt")
    return model.eval(), out


@pytest.fixture
def nanogpt_workspace(tmp_path, shakespeare_text):
    """A folder laid out as nanoGPT's repository after a run: data/shakespeare_char and out-shakespeare-char."""
    vocab_size = write_nanogpt_char_data(tmp_path / "data" / "shakespeare_char", shakespeare_text[:20_000])
    return tmp_path, vocab_size


def all_logits(model, idx):
    with torch.no_grad():
        logits, _ = model(idx, torch.zeros_like(idx))  # with targets: every position's logits
    return logits


@pytest.mark.parametrize("flash", [True, False], ids=["torch2", "mask-buffers"])
def test_nanogpt_checkpoint_loads_as_erf_gelu_with_nanogpts_logits(nanogpt_workspace, flash):
    root, vocab_size = nanogpt_workspace
    reference, out = write_nanogpt_run(root, vocab_size, flash)
    model, ckpt = load_model(out)
    assert model.config.mlp == "gelu_exact" and model_args_of(ckpt)["mlp"] == "gelu_exact"
    idx = torch.randint(0, vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    ours, theirs = all_logits(model, idx), all_logits(reference, idx)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # the check can fail: read as GPT-2's tanh GELU, the same weights give other logits
    tanh = train.build_model("gpt", {**model_args_of(ckpt), "mlp": "gelu"})
    tanh.load_state_dict(model.state_dict())
    assert (all_logits(tanh.eval(), idx) - theirs).abs().max() > 10 * 1e-6


def test_resumed_nanogpt_run_continues_the_same_function(nanogpt_workspace):
    root, vocab_size = nanogpt_workspace
    reference, out = write_nanogpt_run(root, vocab_size)
    # as in nanoGPT: only the run folder and what changes; the shape, dataset (data/shakespeare_char, from the
    # working directory) and schedule come from the checkpoint; the device is this machine's (nanoGPT recorded
    # cuda). float32 and no compilation here, for an exact comparison and a quick test.
    proc = run_py(REPO / "train.py", "--out_dir=out-shakespeare-char", "--init_from=resume", "--max_iters=6",
                  "--dtype=float32", "--compile=False", cwd=root, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    evals = {r["iter"]: r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r}
    # the first evaluation, before any step, is nanoGPT's own model on the same batches
    batches = TokenBatches(root / "data" / "shakespeare_char", "val", 4, 16, seed=1337 + train.EVAL_SEED_OFFSET)
    with torch.no_grad():
        expected = np.mean([reference(*batches.get_batch(k, 0))[1].item() for k in range(2)])
    assert evals[4]["val_loss"] == pytest.approx(expected, rel=1e-6)
    resumed = load_checkpoint(out)
    assert resumed["iter_num"] == 6 and resumed["model_options"]["mlp"] == "gelu_exact"
    assert set(resumed["model_args"]) == set(NANOGPT_MODEL_ARGS)
    assert resumed["config"]["dataset"] == "shakespeare_char" and resumed["config"]["n_embd"] == 32
    # still nanoGPT's: its sample.py loads the continued run and computes what we compute
    idx = torch.randint(0, vocab_size, (2, 16))
    torch.testing.assert_close(all_logits(load_like_nanogpt_sample(out / "ckpt.pt"), idx),
                               all_logits(load_model(out)[0], idx), rtol=0, atol=1e-6)


def test_sample_py_takes_nanogpts_keys_on_a_nanogpt_run(nanogpt_workspace):
    root, vocab_size = nanogpt_workspace
    write_nanogpt_run(root, vocab_size)
    (root / "prompt.txt").write_text("ROMEO:", encoding="utf-8")
    proc = run_py(REPO / "sample.py", "--init_from=resume", "--out_dir=out-shakespeare-char", "--start=FILE:prompt.txt",
                  "--num_samples=2", "--max_new_tokens=5", "--temperature=0.8", "--top_k=200", "--seed=1337",
                  "--device=cpu", "--dtype=float32", "--compile=False", cwd=root, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    samples = proc.stdout.split("---------------\n")
    assert len(samples) == 3 and all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 5 + 1 for s in samples[:2])


@pytest.mark.parametrize("mlp", ["gelu_exact", "gelu"])
def test_our_gpt2_architecture_checkpoint_loads_in_nanogpts_sample_py(tmp_path, tiny_char_data, mlp):
    out = tmp_path / "out"
    train.main(tiny_config(out, tiny_char_data, max_iters=2, mlp=mlp))
    ckpt = load_checkpoint(out)
    assert list(ckpt["model_args"]) == list(NANOGPT_MODEL_ARGS)  # exactly nanoGPT's GPTConfig fields
    assert ckpt["model_options"]["mlp"] == mlp and ckpt["tokenizer"]["kind"] == "char"
    theirs, (ours, _) = load_like_nanogpt_sample(out / "ckpt.pt"), load_model(out)
    idx = torch.randint(0, ours.config.vocab_size, (2, 16))
    if mlp == "gelu_exact":  # nanoGPT's own function: the same logits
        torch.testing.assert_close(all_logits(theirs, idx), all_logits(ours, idx), rtol=0, atol=1e-6)
    else:  # GPT-2's tanh GELU, run by nanoGPT with erf as it runs OpenAI's GPT-2: close, not equal
        torch.testing.assert_close(all_logits(theirs, idx), all_logits(ours, idx), rtol=0, atol=1e-2)


def test_an_option_nanogpt_lacks_stays_ours(tmp_path, tiny_char_data):
    out = tmp_path / "out"
    train.main(tiny_config(out, tiny_char_data, max_iters=2, rmsnorm=True, mlp="swiglu"))
    ckpt = load_checkpoint(out)
    assert ckpt["model_args"]["rmsnorm"] is True and ckpt["model_args"]["mlp"] == "swiglu"
    with pytest.raises(TypeError, match="rmsnorm|mlp"):  # nanoGPT refuses it instead of running other weights
        load_like_nanogpt_sample(out / "ckpt.pt")
    model, _ = load_model(out)
    assert model.config.rmsnorm and model.config.mlp == "swiglu"
    # and resuming with the stored config alone keeps the options
    proc = run_py(REPO / "train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=4", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(out)["iter_num"] == 4 and load_model(out)[0].config.rmsnorm


def test_checkpoint_model_args_split():
    gpt2 = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=65, dropout=0.0,
                rotary=False, rmsnorm=False, mlp="gelu", logit_softcap=0.0)
    entries = checkpoint_model_args(gpt2)
    assert list(entries["model_args"]) == list(NANOGPT_MODEL_ARGS)
    assert entries["model_options"] == {"rotary": False, "rmsnorm": False, "mlp": "gelu", "logit_softcap": 0.0}
    assert model_args_of(entries) == gpt2  # our loader gets every field back
    assert checkpoint_model_args({**gpt2, "logit_softcap": 30.0})["model_args"]["logit_softcap"] == 30.0
    assert model_args_of({"model_args": {k: gpt2[k] for k in NANOGPT_MODEL_ARGS}})["mlp"] == "gelu_exact"
    assert model_args_of({"model_args": gpt2})["mlp"] == "gelu"  # our older checkpoints: full model_args
    assert checkpoint_model_args({"vocab_size": 65, "block_size": 16}, "bigram") == \
        {"model_args": {"vocab_size": 65, "block_size": 16}}
    assert tokenizer_identity({"tokenizer": "gpt2", "vocab_size": 50257})["kind"] == "gpt2"
