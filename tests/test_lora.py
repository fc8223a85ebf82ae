"""LoRA fine-tuning (forge/lora.py) and prompt/response data with a loss mask, on tiny models.

The base model is what users bring: a GPT-2 folder written by transformers with GPT-2's real config
(vocabulary 50,257, 1,024 positions; tiny depth and width). The pairs are a .jsonl file prepared by
data/text/prepare.py --format prompt_response, as a user would.
"""
import json
import random
import shutil

import numpy as np
import pytest
import torch

import train
from configurator import TrainConfig
from forge.checkpoint import load_checkpoint, load_model
from forge.data import SequentialWindows, TokenBatches, load_meta
from forge.lora import LoRASpec, apply_lora, merge_adapters, prepare_finetune
from model import GPT, GPTConfig
from tests.util import REPO, run_py

pytestmark = pytest.mark.usefixtures("one_thread")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TINY = dict(block_size=24, batch_size=2, gradient_accumulation_steps=2, max_iters=4, lr_decay_iters=4, warmup_iters=1,
            learning_rate=1e-2, min_lr=1e-3, eval_interval=2, eval_iters=2, log_interval=1, device="cpu",
            dtype="float32", compile=False, finetune="lora", lora_rank=4, lora_dropout=0.1, weight_decay=0.0)


def write_pairs(path, n=60, seed=0, drop=None):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            row = {"prompt": f"Q: {a}+{b}=", "response": f"{a + b}."}
            if drop:
                row.pop(drop)
            f.write(json.dumps(row) + "\n")
    return path


def prepare_pairs(jsonl, out_dir, *extra):
    return run_py(REPO / "data" / "text" / "prepare.py", jsonl, "--format", "prompt_response", "--out_dir", out_dir,
                  "--val_fraction", "0.2", *extra, env=ONE_THREAD)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A character-vocabulary prompt/response folder (no BPE download needed)."""
    root = tmp_path_factory.mktemp("pairs")
    proc = prepare_pairs(write_pairs(root / "qa.jsonl"), root / "data", "--tokenizer", "char")
    assert proc.returncode == 0, proc.stderr
    return root / "data"


@pytest.fixture(scope="module")
def bpe_pairs(tmp_path_factory, gpt2_encoding):
    """The same kind of folder in GPT-2 BPE, the tokenizer a GPT-2 checkpoint can be fine-tuned on."""
    root = tmp_path_factory.mktemp("bpe_pairs")
    proc = prepare_pairs(write_pairs(root / "qa.jsonl"), root / "data")
    assert proc.returncode == 0, proc.stderr
    return root / "data"


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    assert (config.vocab_size, config.n_positions) == (50257, 1024)
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def config(out_dir, data_dir, init_from, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "out_dir": str(out_dir), "data_dir": str(data_dir), "init_from": str(init_from),
                          **overrides})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, bpe_pairs, hf_gpt2):
    out = tmp_path_factory.mktemp("lora_run")
    train.main(config(out, bpe_pairs, hf_gpt2))
    return out


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, bias=True), **overrides}))


def test_step_zero_is_the_base_model_and_merging_keeps_the_logits():
    model = tiny_gpt().eval()
    x = torch.randint(0, 64, (2, 16))
    base = model(x, x)[0]
    with torch.autocast("cpu", torch.bfloat16):
        base_bf16 = model(x, x)[0]
    apply_lora(model, LoRASpec(rank=4, alpha=8.0, dropout=0.1))
    assert torch.equal(model(x, x)[0], base)  # B = 0: exactly the base model
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(model(x, x)[0], base_bf16)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora_B"):
                p.normal_(std=0.5)
    unmerged = model(x, x)[0]
    assert not torch.allclose(unmerged, base, atol=1e-3)
    plain = tiny_gpt().eval()
    plain.load_state_dict(merge_adapters(model.state_dict(), 8.0 / 4))
    torch.testing.assert_close(plain(x, x)[0], unmerged, rtol=1e-5, atol=1e-5)


def test_masked_targets_contribute_nothing_to_loss_or_gradients():
    model = tiny_gpt()
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    keep = torch.rand(2, 16) < 0.5
    logits, loss = model(x, torch.where(keep, y, -1))
    logits.retain_grad()
    loss.backward()
    expected = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(loss, expected)
    assert torch.all(logits.grad[~keep] == 0) and torch.all(logits.grad[keep].abs().sum(-1) > 0)


def test_prepare_writes_tokens_mask_and_starts(pairs):
    meta = load_meta(pairs)
    assert meta["loss_mask"] is True and meta["tokenizer"] == "char"
    itos = meta["itos"]
    for split, n in (("train", 48), ("val", 12)):
        tokens = np.fromfile(pairs / f"{split}.bin", dtype="<u2")
        mask = np.fromfile(pairs / f"{split}.mask.bin", dtype=np.uint8)
        starts = np.fromfile(pairs / f"{split}.starts.bin", dtype="<i8")
        assert len(mask) == len(tokens) and len(starts) == n and starts[0] == 0
        first = "".join(itos[t] for t in tokens[starts[0]:starts[1]])
        assert first.startswith("Q: ") and "=" in first
        prompt_len = first.index("=") + 1
        assert mask[:prompt_len].sum() == 0 and mask[prompt_len:starts[1]].all()


def test_windows_start_at_examples_mask_the_prompt_and_are_world_size_invariant(pairs):
    loader = TokenBatches(pairs, "train", 3, 24, grad_accum_steps=4, seed=7)
    starts = set(np.fromfile(pairs / "train.starts.bin", dtype="<i8").tolist())
    itos = load_meta(pairs)["itos"]
    x, y = loader.get_batch(5, 1)
    for row in range(3):
        text = "".join(itos[t] for t in x[row].tolist())
        assert text.startswith("Q: ")
        answer = "".join(itos[t] for t in y[row].tolist() if t >= 0)
        a, b = map(int, text[3:text.index("=")].split("+"))
        assert answer == f"{a + b}."  # only the response is a target; prompt and padding are -1
    assert set(loader.window_offsets(5, 1).tolist()) <= starts
    one = [loader.next() for _ in range(8)]  # 2 optimizer steps of 4 micro-steps
    ranks = [TokenBatches(pairs, "train", 3, 24, grad_accum_steps=4, rank=r, world_size=2, seed=7) for r in (0, 1)]
    two = [[r.next() for _ in range(4)] for r in ranks]
    for step in range(2):
        for micro in range(4):
            expected = one[step * 4 + micro]
            got = two[micro // 2][step * 2 + micro % 2]  # rank r runs global micro-steps 2r and 2r + 1
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    resumed = TokenBatches(pairs, "train", 3, 24, grad_accum_steps=4, seed=7)
    resumed.load_state_dict({"step": 1, "micro_step": 0})
    assert all(torch.equal(a, b) for a, b in zip(resumed.next(), one[4]))
    for batches in (loader, resumed, *ranks):
        batches.close()


def test_evaluation_scores_each_example_s_response_once(pairs):
    windows = SequentialWindows(pairs, "val", 24, 5)
    targets = sum(int((y >= 0).sum()) for _, y in windows)
    mask = np.fromfile(pairs / "val.mask.bin", dtype=np.uint8)
    starts = np.fromfile(pairs / "val.starts.bin", dtype="<i8")
    assert targets == int(mask.sum()) - int(mask[starts].sum())  # every response token, never an example's first


def test_lora_run_trains_only_adapters_and_merged_weights_load_everywhere(lora_run, hf_gpt2, bpe_pairs, tmp_path):
    ckpt = load_checkpoint(lora_run)
    base = GPT.from_pretrained(hf_gpt2)
    base.crop_block_size(TINY["block_size"])
    base_sd = base.state_dict()
    lora = ckpt["lora"]
    assert (lora["rank"], lora["alpha"], lora["targets"]) == (4, 16.0, ["c_attn", "c_proj", "c_fc"])
    assert len(lora["base"]) == 8 and len(lora["adapters"]) == 16  # 2 layers x 4 linears
    frozen = {**ckpt["model"], **lora["base"]}  # the merged weights with the stored base put back
    assert frozen.keys() == base_sd.keys()
    for name, tensor in frozen.items():
        assert torch.equal(tensor, base_sd[name]), f"{name} changed: only the adapters may train"
    assert all(v.abs().sum() > 0 for k, v in lora["adapters"].items() if k.endswith("lora_B"))
    assert set(ckpt["optimizer"]["state"]) == set(lora["adapters"])  # Adam state for the adapters alone

    # the unmerged LoRA model (as a resume builds it) and the merged plain one sample.py loads agree
    unmerged, _, _ = train.model_from_checkpoint(ckpt, config(lora_run, bpe_pairs, hf_gpt2, dropout=0.0),
                                                 lora_run / "ckpt.pt")
    prepare_finetune(unmerged, config(lora_run, bpe_pairs, hf_gpt2), ckpt, lora_run / "ckpt.pt")
    merged, _ = load_model(lora_run)
    x = torch.randint(0, load_meta(bpe_pairs)["vocab_size"], (2, TINY["block_size"]))
    unmerged.eval()
    torch.testing.assert_close(merged(x, x)[0], unmerged(x, x)[0], rtol=1e-5, atol=1e-5)

    # the export is a plain GPT-2 folder transformers loads, with the merged weights
    transformers = pytest.importorskip("transformers")
    proc = run_py("-m", "forge.export", lora_run, tmp_path / "hf", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        hf_logits = hf(x).logits
    assert hf_logits.shape[-1] == load_meta(bpe_pairs)["vocab_size"]  # the export drops rows beyond the tokenizer's
    torch.testing.assert_close(hf_logits, merged(x, x)[0][..., :hf_logits.shape[-1]], rtol=1e-4, atol=1e-4)


def test_resume_is_bit_identical(lora_run, bpe_pairs, hf_gpt2, tmp_path):
    out = tmp_path / "resumed"
    train.main(config(out, bpe_pairs, hf_gpt2, max_iters=2))
    train.main(config(out, bpe_pairs, "resume"))
    resumed, straight = load_checkpoint(out), load_checkpoint(lora_run)
    assert resumed["iter_num"] == straight["iter_num"] == 4
    for key in ("model",):
        assert all(torch.equal(resumed[key][k], straight[key][k]) for k in straight[key])
    for part in ("base", "adapters"):
        assert all(torch.equal(resumed["lora"][part][k], v) for k, v in straight["lora"][part].items())
    for name, state in straight["optimizer"]["state"].items():
        assert all(torch.equal(resumed["optimizer"]["state"][name][k], v) for k, v in state.items())


def test_lora_from_one_of_our_own_runs(lora_run, bpe_pairs, tmp_path):
    """init_from=<a run's out_dir>: that run's (merged) weights are the frozen base of a new LoRA run."""
    out = tmp_path / "second"
    train.main(config(out, bpe_pairs, lora_run, max_iters=1, eval_interval=1, lora_targets="c_attn"))
    source, ckpt = load_checkpoint(lora_run), load_checkpoint(out)
    assert set(ckpt["lora"]["base"]) == {f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)}
    assert all(torch.equal(ckpt["lora"]["base"][k], source["model"][k]) for k in ckpt["lora"]["base"])
    assert torch.equal(ckpt["model"]["transformer.wte.weight"], source["model"]["transformer.wte.weight"])


def test_resuming_with_other_lora_settings_is_refused(lora_run, bpe_pairs, hf_gpt2, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(lora_run, out)
    for overrides, needle in (({"lora_rank": 8}, "lora_rank=4"), ({"finetune": "full"}, "finetune='lora'")):
        with pytest.raises(Exception, match=needle):
            train.main(config(out, bpe_pairs, "resume", max_iters=6, **overrides))


def test_finetune_lora_config_trains_gpt2_on_pairs_with_bf16_checkpointing(tmp_path, hf_gpt2, gpt2_encoding):
    """config/finetune_lora.py as shipped (GPT-2 BPE, bf16, activation checkpointing), on a tiny GPT-2."""
    proc = prepare_pairs(write_pairs(tmp_path / "qa.jsonl", n=40), tmp_path / "pairs")
    assert proc.returncode == 0, proc.stderr
    assert load_meta(tmp_path / "pairs")["tokenizer"] == "gpt2"
    out = tmp_path / "out"
    proc = run_py("train.py", "config/finetune_lora.py", f"--data_dir={tmp_path / 'pairs'}", f"--init_from={hf_gpt2}",
                  f"--out_dir={out}", "--block_size=16", "--batch_size=2", "--gradient_accumulation_steps=2",
                  "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--dtype=bfloat16", "--compile=False",
                  "--device=cpu", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LoRA:" in proc.stdout and "trainable parameters" in proc.stdout
    proc = run_py("sample.py", f"--out_dir={out}", "--start=Q: 2+2=", "--max_new_tokens=3", "--num_samples=1",
                  "--device=cpu", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert "Q: 2+2=" in proc.stdout
    proc = run_py("evaluate.py", f"--out_dir={out}", "--device=cpu", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    mask = np.fromfile(tmp_path / "pairs" / "val.mask.bin", dtype=np.uint8)
    assert f"over {int(mask.sum())} tokens" in proc.stdout  # the responses (prompts start with no target)


def test_ddp_two_ranks_equal_one_process_and_fsdp_trains_and_resumes(tmp_path, bpe_pairs, hf_gpt2):
    """2 gloo ranks (torchrun through launch/single_node.sh) train the same adapters as 1 process; FSDP2
    shards the frozen base and the adapters alike, and its run resumes. No dropout: one stream per rank."""
    settings = {**TINY, "lora_dropout": 0.0, "data_dir": str(bpe_pairs), "init_from": str(hf_gpt2)}
    config_file = tmp_path / "tiny_lora.py"
    config_file.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    train.main(TrainConfig(**{**settings, "out_dir": str(tmp_path / "one")}))
    one = load_checkpoint(tmp_path / "one")
    env = {**ONE_THREAD, "PYTHON": __import__("sys").executable}
    for parallelism, max_iters in (("ddp", 4), ("fsdp", 2), ("fsdp", 4)):
        out = tmp_path / parallelism
        proc = run_py("-m", "forge.launch", "--standalone", "--nproc_per_node=2", "--max_restarts=0", "train.py",
                      config_file, f"--out_dir={out}", f"--parallelism={parallelism}", f"--max_iters={max_iters}",
                      *(["--init_from=resume"] if out.exists() else []), env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    for parallelism in ("ddp", "fsdp"):
        two = load_checkpoint(tmp_path / parallelism)
        for name, tensor in {**one["model"], **one["lora"]["adapters"]}.items():
            torch.testing.assert_close({**two["model"], **two["lora"]["adapters"]}[name], tensor, rtol=1e-5,
                                       atol=1e-6, msg=f"{parallelism}: {name}")
        assert all(torch.equal(two["lora"]["base"][k], v) for k, v in one["lora"]["base"].items())


def test_examples_without_a_response_inside_block_size_are_never_drawn(pairs):
    loader = TokenBatches(pairs, "train", 8, 8)  # 'Q: 5+77=' fits 8 tokens, 'Q: 55+77=' does not
    assert loader.examples.skipped > 0 and len(loader.examples) > 0
    assert "left out" in loader.examples.describe() and "cut" in loader.examples.describe()
    for step in range(5):
        x, y = loader.get_batch(step, 0)
        assert ((y >= 0).sum(dim=1) > 0).all()  # every window has a target: no all-ignored (NaN) batch
    loader.close()


def test_prepare_takes_other_field_names_and_splits_by_examples(tmp_path):
    rows = [{"question": f"q{i}?", "answer": f"a{i}", "text": "ignored"} for i in range(10)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    proc = prepare_pairs(tmp_path / "qa.jsonl", tmp_path / "data", "--tokenizer", "char", "--prompt_field", "question",
                         "--response_field", "answer")
    assert proc.returncode == 0, proc.stderr
    itos = load_meta(tmp_path / "data")["itos"]
    val = "".join(itos[t] for t in np.fromfile(tmp_path / "data" / "val.bin", dtype="<u2"))
    assert val == "q8?a8q9?a9"  # the last 20 % of the examples, whole; no separator is invented
    mask = np.fromfile(tmp_path / "data" / "val.mask.bin", dtype=np.uint8)
    assert mask.tolist() == [0, 0, 0, 1, 1] * 2
