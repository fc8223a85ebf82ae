"""python -m forge.export: a training run becomes a folder transformers loads with the same logits,
and whose tokenizer and text-generation pipeline give what sample.py gives."""
import json
import shutil
import stat

import pytest
import torch

from forge.checkpoint import checkpoint_model_args, save_checkpoint
from forge.export import main as export_main
from model import GPT, GPTConfig
from sample import SEPARATOR
from tests.util import assert_clean_error, run_py, snapshot


def make_run(out_dir, data_dir, model_type="gpt", padding=3, scale=1.0, **options):
    """A checkpoint of a small GPT whose vocabulary is the dataset's padded by `padding` rows.

    scale > 1 spreads the logits (greedy decoding then does not hinge on rounding); the padded
    rows are zero, so their logits (0) never win.
    """
    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    args = {**dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=vocab + padding, bias=True, dropout=0.0),
            **options}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
        model.transformer.wte.weight[vocab:] = 0
    save_checkpoint(out_dir, {"model": model.state_dict(), **checkpoint_model_args(args, model_type),  # as train.py
                              "model_type": model_type, "iter_num": 1, "config": {"data_dir": str(data_dir)}})
    return model, vocab


def test_export_drops_padding_and_matches_transformers(tmp_path, tiny_char_data):
    transformers = pytest.importorskip("transformers")
    model, vocab = make_run(tmp_path / "run", tiny_char_data)
    run_py("-m", "forge.export", tmp_path / "run", tmp_path / "hf", check=True)

    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vocab_size == vocab  # the padded rows are gone
    idx = torch.randint(0, vocab, (2, 16))
    with torch.no_grad():
        ours, _ = model.eval()(idx, idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(theirs, ours[..., :vocab], atol=1e-4, rtol=1e-4)


def test_export_refuses_to_overwrite_a_foreign_folder(tmp_path, tiny_char_data):
    make_run(tmp_path / "run", tiny_char_data)
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("my work")
    before = snapshot(dest)
    assert_clean_error(run_py("-m", "forge.export", tmp_path / "run", dest), str(dest))
    assert snapshot(dest) == before


def test_export_bad_inputs(tmp_path, tiny_char_data):
    assert_clean_error(run_py("-m", "forge.export", tmp_path / "missing", tmp_path / "hf"), "missing")
    assert_clean_error(run_py("-m", "forge.export", tmp_path), "dest")  # argument missing: usage error, one line
    assert not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory):
    """A GPT-2 BPE data folder as nanoGPT's OpenWebText one, with our meta.json (the run reads only the meta)."""
    folder = tmp_path_factory.mktemp("gpt2_data")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16"}))
    return folder


def greedy_sample(run, prompt, max_new_tokens):
    proc = run_py("sample.py", f"--out_dir={run}", f"--start={prompt}", "--temperature=0",
                  f"--max_new_tokens={max_new_tokens}", "--num_samples=1", "--device=cpu", check=True)
    assert proc.stdout.endswith(f"\n{SEPARATOR}\n")
    return proc.stdout.removesuffix(f"\n{SEPARATOR}\n")


def modes(folder):
    """Permission bits of a folder and of each file in it."""
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]}


def test_gpt2_bpe_run_exports_gpt2_tokenizer_and_pipeline_equals_sample_py(tmp_path, gpt2_data, gpt2_encoding):
    """A GPT-2 BPE run padded to 50,304 rows becomes a plain GPT-2 folder (50,257): AutoTokenizer is
    GPT-2's (same ids as tiktoken on hard text), and pipeline's greedy text is sample.py's."""
    transformers = pytest.importorskip("transformers")
    make_run(tmp_path / "run", gpt2_data, padding=50304 - 50257, scale=10.0, block_size=64, mlp="gelu_exact")
    dest = tmp_path / "hf"
    proc = run_py("-m", "forge.export", tmp_path / "run", dest, check=True)
    assert "vocab.json" in proc.stdout and "merges.txt" in proc.stdout
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= {p.name for p in dest.iterdir()}
    config = json.loads((dest / "config.json").read_text())
    assert config["vocab_size"] == 50257 and config["activation_function"] == "gelu" and config["eos_token_id"] == 50256

    tokenizer = transformers.AutoTokenizer.from_pretrained(dest)
    assert len(tokenizer) == 50257 and tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.model_max_length == 64
    texts = ["Hello world", "  two leading spaces\n\n\ttab, then CRLF\r\n", "naïve café — 日本語 🤖, Ελληνικά",
             "it's, they're; I'll 1234567 $3.50 ...  !!", "a .b , c ?", " ", "\u00a0\u200bzero-width"]
    for text in texts:
        assert tokenizer(text)["input_ids"] == gpt2_encoding.encode_ordinary(text), text
        assert tokenizer.decode(gpt2_encoding.encode_ordinary(text)) == text
    # vocab.json + merges.txt alone (an export made without the tokenizers package) are GPT-2's too
    without = tmp_path / "without_tokenizer_json"
    without.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(dest / name, without / name)
    from_files = transformers.AutoTokenizer.from_pretrained(without)
    assert all(from_files(text)["input_ids"] == gpt2_encoding.encode_ordinary(text) for text in texts)

    prompt = "The meaning of life is"
    pipe = transformers.pipeline("text-generation", model=str(dest), device="cpu")
    generated = pipe(prompt, max_new_tokens=20, do_sample=False)[0]["generated_text"]
    assert len(gpt2_encoding.encode_ordinary(generated)) > len(gpt2_encoding.encode_ordinary(prompt)) + 10
    assert generated == greedy_sample(tmp_path / "run", prompt, 20)


def test_character_run_exports_a_character_tokenizer_and_pipeline_equals_sample_py(tmp_path, tiny_char_data):
    transformers = pytest.importorskip("transformers")
    make_run(tmp_path / "run", tiny_char_data, scale=10.0, block_size=64)
    dest = tmp_path / "hf"
    run_py("-m", "forge.export", tmp_path / "run", dest, check=True)
    itos = json.loads((tiny_char_data / "meta.json").read_text())["itos"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(dest)
    text = "".join(itos)
    assert tokenizer(text)["input_ids"] == list(range(len(itos)))
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    prompt = "ROMEO:\nWhat"
    pipe = transformers.pipeline("text-generation", model=str(dest), device="cpu")
    generated = pipe(prompt, max_new_tokens=30, do_sample=False)[0]["generated_text"]
    assert len(generated) == len(prompt) + 30 and generated == greedy_sample(tmp_path / "run", prompt, 30)


def test_export_permissions_are_those_of_transformers_save_pretrained(tmp_path, tiny_char_data):
    """Folder and files as transformers' own save_pretrained makes them (the umask's: typically
    0755 and 0644), not a private temporary folder's 0700; an earlier export is replaced in place."""
    transformers = pytest.importorskip("transformers")
    make_run(tmp_path / "run", tiny_char_data)
    run_py("-m", "forge.export", tmp_path / "run", tmp_path / "hf", check=True)
    export_main([str(tmp_path / "run"), str(tmp_path / "hf")])  # again, in this process: replaces the export
    ours = modes(tmp_path / "hf")
    reference = tmp_path / "reference"
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").save_pretrained(reference)
    transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").save_pretrained(reference)
    theirs = modes(reference)
    assert ours["hf"] == theirs["reference"]
    assert {mode for name, mode in ours.items() if name != "hf"} == {mode for name, mode in theirs.items() if name != "reference"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "reference", "run"]  # no temporary folders left


def test_export_where_a_folder_cannot_be_made_is_one_line(tmp_path, tiny_char_data):
    make_run(tmp_path / "run", tiny_char_data)
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    assert_clean_error(run_py("-m", "forge.export", tmp_path / "run", tmp_path / "notes.txt" / "hf"),
                       "cannot write", "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder"
