"""Fine-tuning, evaluating, resuming and sampling GPT-2 with its real vocabulary (50,257 ids, 1,024 positions).

The pretrained folder is what transformers writes for GPT-2: `GPT2Config()`'s own vocabulary and
context, tiny layers. The data is GPT-2 BPE as our prepare pipeline writes it (the real BPE of Tiny
Shakespeare when tiktoken's cache is here, random GPT-2 ids otherwise) and nanoGPT's OpenWebText
layout (uint16 bins, no metadata). The README's commands run with the config files as written;
the overrides only swap in these files and shrink the work.
"""
import numpy as np
import pytest
import torch

from configurator import TrainConfig, read_config_file
from forge.checkpoint import NANOGPT_MODEL_ARGS, load_checkpoint, save_checkpoint
from forge.metrics import read_metrics
from forge.tokenize import (GPT2_EOT, GPT2_VOCAB_SIZE, PreparedFolder, get_tokenizer, gpt2_meta, tokenizer_identity,
                            write_text_split)
from model import GPT, GPTConfig
from tests.util import REPO, run_py

pytestmark = pytest.mark.usefixtures("one_thread")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SMALL = ["--device=cpu", "--compile=False", "--eval_iters=2"]


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A GPT-2 folder as transformers saves it: GPT2Config's real vocabulary (50,257) and n_positions (1,024)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32)
    assert config.vocab_size == GPT2_VOCAB_SIZE and config.n_positions == 1024
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def random_gpt2_ids(n: int, seed: int) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, GPT2_VOCAB_SIZE, n).astype(np.uint16)
    ids[::97] = GPT2_EOT
    return ids


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory, shakespeare_text):
    """data/shakespeare as its prepare script writes it (meta.json with the largest id of each bin)."""
    folder = tmp_path_factory.mktemp("shakespeare")
    try:
        get_tokenizer(gpt2_meta())
        write_text_split(shakespeare_text[:60_000], folder, gpt2_meta())
    except Exception:  # no tiktoken cache and no network: GPT-2 ids of the same shape, same pipeline commit
        with PreparedFolder(folder) as prepared:
            for split, n in (("train", 12_000), ("val", 3_000)):
                random_gpt2_ids(n, seed=n).tofile(prepared.temp(f"{split}.bin"))
            prepared.commit(gpt2_meta())
    return folder


@pytest.fixture(scope="module")
def owt_data(tmp_path_factory):
    """nanoGPT's data/openwebtext: uint16 GPT-2 ids, no metadata at all."""
    folder = tmp_path_factory.mktemp("openwebtext")
    random_gpt2_ids(8_000, seed=1).tofile(folder / "train.bin")
    random_gpt2_ids(4_000, seed=2).tofile(folder / "val.bin")
    return folder


def test_finetune_shakespeare_resume_sample_and_evaluate(tmp_path, hf_gpt2, bpe_data, gpt2_encoding):
    out = tmp_path / "out-shakespeare"
    # README: python train.py config/finetune_shakespeare.py (the only changes: these weights and data, less work)
    proc = run_py(REPO / "train.py", "config/finetune_shakespeare.py", f"--init_from={hf_gpt2}", f"--data_dir={bpe_data}",
                  f"--out_dir={out}", "--gradient_accumulation_steps=2", "--max_iters=2", *SMALL, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(out)
    assert ckpt["model_args"]["vocab_size"] == GPT2_VOCAB_SIZE and ckpt["model_args"]["block_size"] == 1024
    assert list(ckpt["model_args"]) == list(NANOGPT_MODEL_ARGS) and ckpt["model_options"]["mlp"] == "gelu"
    assert ckpt["tokenizer"] == tokenizer_identity(gpt2_meta()) and ckpt["iter_num"] == 2
    assert ckpt["config"]["learning_rate"] == 3e-5 and ckpt["config"]["dropout"] == 0.1  # the config file's

    # resume needs only the run folder (and what changes): data, schedule and shape come from the run
    proc = run_py(REPO / "train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=4", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    steps = [r["iter"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == [0, 1, 2, 3]

    proc = run_py(REPO / "sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=12", "--temperature=0",
                  "--start=To be", "--device=cpu", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("To be") and len(gpt2_encoding.encode(proc.stdout.split("\n-----")[0])) > 2

    proc = run_py(REPO / "evaluate.py", f"--out_dir={out}", "--limit_tokens=1024", "--batch_size=1", "--block_size=512",
                  "--device=cpu", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert "val.bin: loss" in proc.stdout and "1,024 tokens" in proc.stdout


def test_eval_gpt2_configs_run_as_written(tmp_path, hf_gpt2, owt_data):
    configs = sorted((REPO / "config").glob("eval_gpt2*.py"))
    keys = {f.name for f in TrainConfig.__dataclass_fields__.values()}
    settings = [read_config_file(c, keys) for c in configs]
    assert len(configs) == 4 and all({**s, "init_from": ""} == {**settings[0], "init_from": ""} for s in settings)
    # README: python train.py config/eval_gpt2.py, on nanoGPT's OpenWebText folder (no meta.json)
    proc = run_py(REPO / "train.py", "config/eval_gpt2.py", f"--init_from={hf_gpt2}", f"--data_dir={owt_data}",
                  f"--out_dir={tmp_path / 'out'}", "--batch_size=2", *SMALL, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "out").exists()  # eval_only writes nothing
    loss = float(proc.stdout.split("val loss")[1].split()[0])
    assert abs(loss - np.log(GPT2_VOCAB_SIZE)) < 1.0  # a random 50,257-way model on random ids: ~ln(50257)

    proc = run_py(REPO / "evaluate.py", f"--init_from={hf_gpt2}", f"--data_dir={owt_data}", "--limit_tokens=1024",
                  "--block_size=256", "--device=cpu", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert "loss" in proc.stdout and "1,024 tokens" in proc.stdout


def padded_model_that_prefers_padded_ids() -> GPT:
    """A scratch BPE model (50,304 rows) whose padded rows have by far the largest logits for any input."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50304))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)  # every final hidden state is all ones
        model.lm_head.weight[GPT2_VOCAB_SIZE:] = 10.0  # logit 160 for each padded id, about 0 for the rest
    return model.eval()


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0),
                                      dict(temperature=1.0, top_k=50), dict(temperature=2.0, top_p=0.9)],
                         ids=["greedy", "full", "top_k", "top_p"])
def test_sampling_never_draws_a_padded_id(sampling):
    model = padded_model_that_prefers_padded_ids()
    idx = torch.tensor([[GPT2_EOT]])
    assert (model.generate(idx, 8, **sampling)[0, 1:] >= GPT2_VOCAB_SIZE).all()  # the trap is real
    generated = model.generate(idx, 8, **sampling, vocab_size=GPT2_VOCAB_SIZE)[0, 1:]
    assert (generated < GPT2_VOCAB_SIZE).all()


def test_sample_py_prints_text_from_a_padded_model(tmp_path, bpe_data, gpt2_encoding):
    model = padded_model_that_prefers_padded_ids()
    save_checkpoint(tmp_path / "run", {"model": model.state_dict(), "model_type": "gpt",
                                       "model_args": {**vars(model.config)}, "iter_num": 1,
                                       "config": {"data_dir": str(bpe_data)}})
    proc = run_py(REPO / "sample.py", f"--out_dir={tmp_path / 'run'}", "--num_samples=1", "--max_new_tokens=6",
                  "--temperature=0", "--start=Hello", "--device=cpu", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    best = int(model.lm_head.weight[:GPT2_VOCAB_SIZE].sum(dim=1).argmax())  # the best real id for every input
    assert proc.stdout.split("\n-----")[0] == "Hello" + gpt2_encoding.decode([best] * 6)  # six real tokens
