"""GPT-2 import and export against Hugging Face transformers (a test-only reference), on small
randomly initialised models saved to temporary directories: no download needed."""
import json
import sys

import pytest
import torch

from model import GPT, GPTConfig, ModelError

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

# initializer_range 0.2 (not GPT-2's 0.02): activations large enough that an exact GELU instead of
# the tanh one, or a wrong LayerNorm epsilon, moves the logits by more than the 1e-4 tolerance
HF_SMALL = dict(
    n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=32, initializer_range=0.2,
    bos_token_id=None, eos_token_id=None,
)


def make_hf_model(seed=0, **overrides):
    """A small GPT-2 with random weights, biases included (HF initialises them to zero: perturb them)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**{**HF_SMALL, **overrides}, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf


def make_our_model(**config):
    """Our GPT with weights ten times GPT-2's initial scale, for the same reason as HF_SMALL's."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10).add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


def our_logits(model, idx):
    model.eval()
    with torch.no_grad():
        logits, _ = model(idx, targets=torch.zeros_like(idx))  # with targets: every position
    return logits


def save_hf(hf, path, form):
    if form == "safetensors":
        hf.save_pretrained(path)
        assert (path / "model.safetensors").is_file()
    elif form == "bin":  # the classic pickle format, as older transformers and the Hub wrote it
        path.mkdir()
        hf.config.save_pretrained(path)
        torch.save(hf.state_dict(), path / "pytorch_model.bin")
    else:  # "sharded": model.safetensors.index.json + shards
        hf.save_pretrained(path, max_shard_size="50KB")
        assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.mark.parametrize("form", ["safetensors", "bin", "sharded"])
def test_from_pretrained_logits_match_transformers(tmp_path, form):
    hf = make_hf_model()
    path = save_hf(hf, tmp_path / "hf", form)
    model = GPT.from_pretrained(path)
    assert model.config.block_size == 32 and model.config.vocab_size == 100 and model.config.n_layer == 2
    idx = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(our_logits(model, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)


def test_save_pretrained_round_trip_loads_in_transformers_with_equal_logits(tmp_path):
    model = make_our_model(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=64)
    model.save_pretrained(tmp_path / "export", vocab_size=100)  # drop the 28 padding rows
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["vocab_size"] == 100 and config["n_positions"] == 32
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    idx = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hf_logits(hf, idx), our_logits(model, idx)[..., :100], atol=1e-4, rtol=0)
    # and back into our GPT
    reloaded = GPT.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(our_logits(reloaded, idx), our_logits(model, idx)[..., :100], atol=1e-5, rtol=0)


def test_save_pretrained_bias_free_model_exports_zero_biases(tmp_path):
    model = make_our_model(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, bias=False)
    model.save_pretrained(tmp_path / "export")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    idx = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hf_logits(hf, idx), our_logits(model, idx), atol=1e-4, rtol=0)


def test_save_pretrained_replaces_an_earlier_export_but_refuses_other_directories(tmp_path):
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
    model.save_pretrained(tmp_path / "export")
    model.save_pretrained(tmp_path / "export")  # again: an earlier export is replaced
    (tmp_path / "empty").mkdir()
    model.save_pretrained(tmp_path / "empty")  # an empty directory is fine
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="precious"):
        model.save_pretrained(precious)
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "export", "precious"]  # no temp dirs left
    with pytest.raises(ModelError, match="vocab_size"):
        model.save_pretrained(tmp_path / "other", vocab_size=33)


def test_from_pretrained_override_args(tmp_path):
    path = save_hf(make_hf_model(), tmp_path / "hf", "safetensors")
    model = GPT.from_pretrained(path, override_args=dict(dropout=0.1, block_size=16))
    assert model.config.dropout == 0.1 and model.config.block_size == 16
    assert model.transformer.wpe.weight.shape == (16, 64)
    with pytest.raises(ModelError, match="n_layer"):
        GPT.from_pretrained(path, override_args=dict(n_layer=3))
    with pytest.raises(ModelError, match="block_size"):
        GPT.from_pretrained(path, override_args=dict(block_size=64))


def test_from_pretrained_bad_inputs_name_the_culprit(tmp_path):
    with pytest.raises(ModelError, match=r"unknown pretrained model 'gpt3'.*gpt2-medium"):
        GPT.from_pretrained("gpt3")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"empty is not a GPT-2 checkpoint: it has no config.json"):
        GPT.from_pretrained(empty)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="model_type 'llama'"):
        GPT.from_pretrained(llama)
    no_weights = tmp_path / "no_weights"
    transformers.GPT2Config(**HF_SMALL).save_pretrained(no_weights)
    with pytest.raises(ModelError, match="neither model.safetensors nor pytorch_model.bin"):
        GPT.from_pretrained(no_weights)
    relu = tmp_path / "relu"  # ("gelu", the exact one, loads as mlp='gelu_exact': see the test below)
    make_hf_model(activation_function="relu").save_pretrained(relu)
    with pytest.raises(ModelError, match="activation_function='relu'"):
        GPT.from_pretrained(relu)
    # weights that do not match config.json
    mismatched = save_hf(make_hf_model(), tmp_path / "mismatched", "safetensors")
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(ModelError, match=r"missing h\.2\."):
        GPT.from_pretrained(mismatched)
    corrupt = save_hf(make_hf_model(), tmp_path / "corrupt", "safetensors")
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        GPT.from_pretrained(corrupt)


def test_from_pretrained_by_name_downloads_config_and_safetensors(tmp_path, monkeypatch):
    """The hub path, offline: hf_hub_download is pointed at a small local checkpoint."""
    import huggingface_hub

    hf = make_hf_model()
    hub_dir = save_hf(hf, tmp_path / "hub", "safetensors")
    requests = []

    def fake_download(repo_id, filename, **kwargs):
        requests.append((repo_id, filename))
        return str(hub_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.chdir(tmp_path)  # no local directory called gpt2-medium here
    model = GPT.from_pretrained("gpt2-medium")
    repo = "openai-community/gpt2-medium"
    assert requests == [(repo, "config.json"), (repo, "model.safetensors")]
    idx = torch.randint(0, 100, (1, 32), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(our_logits(model, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)

    def offline(repo_id, filename, **kwargs):
        raise OSError("Max retries exceeded with url\nsecond line")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelError, match=r"could not download 'gpt2' .*Max retries exceeded with url\); check") as info:
        GPT.from_pretrained("gpt2")
    assert "\n" not in str(info.value)


def test_missing_hub_packages_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"pip install -e '\.\[hf\]'"):
        GPT.from_pretrained("gpt2")
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ModelError, match=r"pip install -e '\.\[hf\]'"):
        model.save_pretrained(tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_untied_head_exports_and_imports(tmp_path):
    model = make_our_model(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, untied_head=True)
    model.save_pretrained(tmp_path / "export", vocab_size=60)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["tie_word_embeddings"] is False
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    idx = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hf_logits(hf, idx), our_logits(model, idx)[..., :60], atol=1e-4, rtol=0)
    reloaded = GPT.from_pretrained(tmp_path / "export")  # tie_word_embeddings=false: untied_head
    assert reloaded.config.untied_head
    torch.testing.assert_close(our_logits(reloaded, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)


def test_exact_gelu_exports_as_activation_gelu_and_imports_back(tmp_path):
    """mlp='gelu_exact' (the erf GELU) is HF's activation_function="gelu", in both directions."""
    model = make_our_model(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, mlp="gelu_exact")
    model.save_pretrained(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["activation_function"] == "gelu"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hf_logits(hf, idx), our_logits(model, idx), atol=1e-4, rtol=0)
    # a folder transformers made with the exact GELU loads as gelu_exact, with transformers' logits
    hf = make_hf_model(activation_function="gelu")
    reloaded = GPT.from_pretrained(save_hf(hf, tmp_path / "hf", "safetensors"))
    assert reloaded.config.mlp == "gelu_exact"
    idx = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(our_logits(reloaded, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)


def test_model_py_copied_alone_still_loads_a_gpt2_folder(tmp_path):
    """Without gptforge's forge package, model.py imports with torch only and from_pretrained reads
    a transformers folder (config.json + model.safetensors) with transformers' logits."""
    import shutil

    from tests.util import REPO, run_py

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(REPO / "model.py", alone / "model.py")
    hf = make_hf_model(activation_function="gelu", tie_word_embeddings=False)
    save_hf(hf, tmp_path / "hf", "safetensors")
    idx = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.save({"idx": idx, "logits": hf_logits(hf, idx)}, tmp_path / "expected.pt")
    script = (
        "import sys; sys.modules['forge'] = None\n"  # as if forge were not installed: its import fails
        "import torch, model\n"
        f"assert model.__file__ == {str(alone / 'model.py')!r}, model.__file__\n"
        f"m = model.GPT.from_pretrained({str(tmp_path / 'hf')!r}, {{'block_size': 16}}).eval()\n"
        "assert m.config.mlp == 'gelu_exact' and m.config.untied_head and m.config.block_size == 16\n"
        f"e = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "idx = e['idx'][:, :16].contiguous()\n"
        "with torch.no_grad(): logits, _ = m(idx, idx)\n"
        "torch.testing.assert_close(logits, e['logits'][:, :16], atol=1e-4, rtol=0)\n"
        "print('ok')\n"
    )
    proc = run_py("-c", script, cwd=alone, env={"PYTHONPATH": ""})
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


def test_gpt2_vocab_and_merges_are_openais_files(gpt2_encoding):
    """Derived from tiktoken's ranks, vocab.json and merges.txt equal OpenAI's encoder.json and
    vocab.bpe, which tiktoken's cache holds (under the SHA-1 of their URLs) when it has them."""
    import hashlib
    import os
    from pathlib import Path

    from forge.hf import gpt2_vocab_and_merges

    vocab, merges = gpt2_vocab_and_merges()
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256 and len(merges) == 50000
    assert vocab["Ġthe"] == 262 and merges[:2] == [("Ġ", "t"), ("Ġ", "a")]
    url = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR", "/nonexistent"))
    encoder_json, vocab_bpe = (cache / hashlib.sha1((url + name).encode()).hexdigest() for name in ("encoder.json", "vocab.bpe"))
    if not (encoder_json.is_file() and vocab_bpe.is_file()):
        pytest.skip("OpenAI's original GPT-2 files are not in the tiktoken cache")
    assert json.loads(encoder_json.read_text(encoding="utf-8")) == vocab
    lines = vocab_bpe.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and [tuple(line.split(" ")) for line in lines[1:] if line] == merges


def test_save_pretrained_writes_the_tokenizer_its_meta_names(tmp_path):
    """meta (the run's tokenizer metadata) sets the exported vocabulary and the tokenizer files;
    a vocab_size that disagrees with it is refused before anything is written."""
    model = make_our_model(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32)
    meta = {"vocab_size": 5, "tokenizer": "char", "dtype": "uint16", "itos": ["\n", " ", "a", "b", "é"]}
    with pytest.raises(ModelError, match="vocab_size=60, but the tokenizer has 5 tokens"):
        model.save_pretrained(tmp_path / "export", vocab_size=60, meta=meta)
    assert not (tmp_path / "export").exists()
    assert model.save_pretrained(tmp_path / "export", meta=meta) == ["tokenizer.json", "tokenizer_config.json"]
    assert json.loads((tmp_path / "export" / "config.json").read_text())["vocab_size"] == 5
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert tokenizer("ab é\n")["input_ids"] == [2, 3, 1, 4, 0] and tokenizer.decode([2, 3, 1, 4, 0]) == "ab é\n"
    assert model.save_pretrained(tmp_path / "export") == []  # no meta: weights only, replacing the export
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
