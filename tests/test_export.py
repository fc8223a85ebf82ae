"""python -m forge.export: a training run becomes a folder transformers loads with the same logits."""
import json

import pytest
import torch

from forge.checkpoint import checkpoint_model_args, save_checkpoint
from model import GPT, GPTConfig
from tests.util import assert_clean_error, run_py, snapshot


def make_run(out_dir, data_dir, model_type="gpt", padding=3):
    """A checkpoint of a small GPT whose vocabulary is the dataset's padded by `padding` rows."""
    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=vocab + padding, bias=True, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
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
