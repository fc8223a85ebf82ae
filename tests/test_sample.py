"""sample.py: seeded determinism, greedy with the KV cache = without, top-k/top-p support, the CLI, bad input."""
import json

import numpy as np
import pytest
import torch

import sample
from forge.errors import UserError
from forge.checkpoint import build_model, save_checkpoint
from forge.tokenize import char_meta, get_tokenizer, gpt2_meta
from model import BigramLanguageModel
from tests.util import assert_clean_error, run_py, snapshot

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40
TINY_GPT = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 16, "dropout": 0.0, "bias": True}


def make_char_dataset(folder, text=TEXT):
    """A prepared char dataset (meta.json, train.bin, val.bin: 90/10) as data/*/prepare.py writes it."""
    folder.mkdir(parents=True)
    itos = sorted(set(text))
    ids = np.array([itos.index(c) for c in text], dtype="<u2")
    cut = int(len(ids) * 0.9)
    ids[:cut].tofile(folder / "train.bin")
    ids[cut:].tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps(char_meta(itos)))
    return folder


def make_run(out_dir, data_dir, vocab_size, model_args=TINY_GPT, seed=0):
    """A training run's out_dir with a ckpt.pt of a randomly initialised model (the classic keys)."""
    torch.manual_seed(seed)
    args = {**model_args, "vocab_size": vocab_size}
    model = build_model("gpt", args)
    save_checkpoint(out_dir, {"model": model.state_dict(), "optimizer": {}, "model_args": args, "model_type": "gpt",
                              "iter_num": 7, "best_val_loss": 9.9,
                              "config": {"dataset": data_dir.name, "data_dir": str(data_dir)}})
    return model.eval()


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("char_run")
    data_dir = make_char_dataset(root / "data" / "tiny_char")
    meta = json.loads((data_dir / "meta.json").read_text())
    model = make_run(root / "out", data_dir, meta["vocab_size"])
    return root / "out", data_dir, model, get_tokenizer(meta)


def _sample(model, prompt, n, seed, **kw):
    kw = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kw}
    gen = torch.Generator().manual_seed(seed)
    return list(sample.generate_tokens(model, prompt, n, generator=gen, device="cpu", **kw))


def test_seeded_sampling_is_deterministic(char_run):
    _, _, model, _ = char_run
    first, again, other = (_sample(model, [1, 2, 3], 40, seed) for seed in (5, 5, 6))
    assert first == again and first != other


def test_greedy_with_kv_cache_equals_full_recompute(char_run):
    _, _, model, _ = char_run
    prompt, n_new = [3, 1, 4, 1, 5], 30  # 35 tokens > block_size 16: the window slides
    cached = _sample(model, prompt, n_new, seed=0, temperature=0.0)
    idx = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n_new):
            logits, _ = model(idx[:, -model.config.block_size:])  # no cache: the whole cropped context
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached == idx[0, len(prompt):].tolist()
    assert _sample(model, prompt, n_new, seed=1, temperature=0.0) == cached  # greedy ignores the seed


def test_top_k_and_top_p_restrict_the_support():
    probs = torch.tensor([0.05, 0.4, 0.02, 0.3, 0.2, 0.03])  # same next-token distribution after every token
    model = BigramLanguageModel(len(probs), block_size=8)
    with torch.no_grad():
        model.logits_table.weight.copy_(probs.log().expand(len(probs), -1))
    seen = lambda **kw: set(_sample(model, [0], 300, seed=0, **kw))  # noqa: E731
    assert seen() == set(range(6))
    assert seen(top_k=2) == {1, 3}
    assert seen(top_p=0.75) == {1, 3, 4}  # 0.4 + 0.3 < 0.75: the third most likely is needed too
    assert seen(top_p=0.5) == {1, 3}
    assert seen(top_k=2, top_p=0.5) == {1}  # top_p sees the top-2 renormalised: 0.57 alone covers 0.5
    assert seen(top_p=0.3) == {1}


def test_incremental_decoding_never_splits_a_character(gpt2_encoding):
    tokenizer = get_tokenizer(gpt2_meta())
    text = "naïve café — 日本語 🙂🎉 done"
    ids = tokenizer.encode(text)
    decoder = sample.IncrementalDecoder(tokenizer)
    pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert decoder.push(50300) == ""  # a padded-vocabulary id the tokenizer does not know is skipped


def test_prompts():
    chars = get_tokenizer(char_meta(sorted(set("ab\n"))))
    assert sample.encode_prompt("", chars, 16) == ([chars.encode("\n")[0]], "\n")  # char: start from a newline
    with pytest.raises(UserError, match="no newline"):
        sample.encode_prompt("", get_tokenizer(char_meta(["a", "b"])), 16)
    with pytest.raises(UserError, match="'z'"):
        sample.encode_prompt("abz", chars, 16)


def test_empty_prompt_is_end_of_text_for_bpe(gpt2_encoding):
    assert sample.encode_prompt("", get_tokenizer(gpt2_meta()), 1024) == ([50256], "")


def test_cli_samples_and_streams_greedy(char_run, tmp_path):
    out_dir, _, model, tokenizer = char_run
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("All:\nSpeak")
    args = ["sample.py", f"--out_dir={out_dir}", f"--start=FILE:{prompt}", "--num_samples=2", "--max_new_tokens=12",
            "--seed=3", "--device=cpu"]
    first = run_py(*args, check=True)
    samples = first.stdout.split(f"\n{sample.SEPARATOR}\n")
    assert len(samples) == 3 and samples[2] == ""
    assert all(s.startswith("All:\nSpeak") and len(s) == len("All:\nSpeak") + 12 for s in samples[:2])
    assert "iter 7" in first.stderr
    # one greedy sample, streamed, prompt longer than the context: cropped with a warning; equals the in-process path
    long_prompt = "Before we proceed any further, hear me speak."
    greedy = run_py("sample.py", f"--out_dir={out_dir}", f"--start={long_prompt}", "--temperature=0",
                    "--max_new_tokens=10", "--num_samples=1", "--device=cpu", check=True)
    assert "warning: the prompt is 45 tokens, longer than the model's context of 16" in greedy.stderr
    kept = tokenizer.encode(long_prompt)[-16:]
    expected = tokenizer.decode(kept + _sample(model, kept, 10, seed=0, temperature=0.0))
    assert greedy.stdout == f"{expected}\n{sample.SEPARATOR}\n"


def test_cli_from_a_local_gpt2_folder(tmp_path, gpt2_encoding):
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf"
    build_model("gpt", {**TINY_GPT, "vocab_size": 50257}).save_pretrained(hf_dir)
    proc = run_py("sample.py", f"--init_from={hf_dir}", "--num_samples=1", "--max_new_tokens=8", "--stop_at_eot=True",
                  "--device=cpu", check=True)
    assert proc.stdout.endswith(f"\n{sample.SEPARATOR}\n") and str(hf_dir) in proc.stderr


def test_bad_inputs(char_run, tmp_path, capsys):
    out_dir, data_dir, _, _ = char_run
    moved = tmp_path / "out-moved"  # a run whose data folder is not on this machine
    make_run(moved, tmp_path / "data" / "gone", vocab_size=40)
    bpe_meta = tmp_path / "bpe"
    bpe_meta.mkdir()
    (bpe_meta / "meta.json").write_text(json.dumps(gpt2_meta()))
    before = snapshot(out_dir.parent) | snapshot(moved)
    assert_clean_error(run_py("sample.py", f"--out_dir={out_dir}", "--start=Speak é€", "--device=cpu"),
                       "'é'", "'€'", "not in the")
    assert_clean_error(run_py("sample.py", f"--out_dir={tmp_path / 'nope'}", "--device=cpu"), "nope", "does not exist")
    assert_clean_error(run_py("sample.py", f"--out_dir={moved}", "--device=cpu"),
                       "gone/meta.json not found", "python data/gone/prepare.py", "--meta")
    cases = [
        ([f"--start=FILE:{tmp_path / 'missing.txt'}"], "prompt file .*missing.txt not found"),
        ([f"--out_dir={tmp_path}"], "no checkpoint at"),
        (["--top_p=1.5"], "top_p=1.5 must be in"),
        (["--temperature=-1"], "temperature=-1"),
        (["--num_sample=2"], "did you mean 'num_samples'"),
        ([f"--meta={tmp_path / 'nope.json'}"], "not an existing meta.json"),
        ([f"--meta={bpe_meta}"], "does not fit"),  # 50257 ids for a model of a few dozen
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            sample.main([f"--out_dir={out_dir}", "--device=cpu", *argv])
    # --meta lets a run whose data folder is elsewhere sample
    sample.main([f"--out_dir={moved}", f"--meta={data_dir / 'meta.json'}", "--num_samples=1", "--max_new_tokens=5",
                 "--start=Speak", "--device=cpu"])
    assert capsys.readouterr().out.startswith("Speak")
    assert snapshot(out_dir.parent) | snapshot(moved) == before
