"""A run and a dataset know what they are made of: the tokenizer a checkpoint records, the largest id a
prepared folder records, and every batch's ids checked against the vocabulary."""
import json

import numpy as np
import pytest

import train
from forge.checkpoint import load_checkpoint
from forge.data import DataError, SequentialWindows, TokenBatches, load_meta
from forge.tokenize import (PreparedFolder, char_meta, check_same_tokenizer, gpt2_meta, tokenizer_identity,
                            write_text_split)
from tests.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prepare_records_the_largest_id_of_each_bin(tmp_path):
    text = "hello world, a small corpus\n" * 40
    meta = char_meta(sorted(set(text)))
    write_text_split(text, tmp_path / "d", meta)
    recorded = load_meta(tmp_path / "d")["max_token_ids"]
    for split in ("train", "val"):
        assert recorded[split] == int(np.fromfile(tmp_path / "d" / f"{split}.bin", dtype=np.uint16).max())
    # statistics and storage are not the tokenizer: the identity is that of the vocabulary alone
    assert tokenizer_identity(load_meta(tmp_path / "d")) == tokenizer_identity({**meta, "dtype": "uint32"})


def test_identity_tells_vocabularies_of_the_same_size_apart():
    a, b = char_meta(list("abc")), char_meta(list("abd"))
    assert tokenizer_identity(a) != tokenizer_identity(b) and tokenizer_identity(a) == tokenizer_identity(char_meta("abc"))
    assert tokenizer_identity(gpt2_meta())["kind"] == "gpt2" and tokenizer_identity(gpt2_meta())["vocab_size"] == 50257
    check_same_tokenizer(tokenizer_identity(a), a, "data", "model", "advice")  # the same: nothing to say
    check_same_tokenizer(None, b, "data", "model", "advice")  # an old checkpoint without the record
    with pytest.raises(DataError, match=r"another vocabulary of the same size.*advice"):
        check_same_tokenizer(tokenizer_identity(a), b, "data", "model", "advice")
    with pytest.raises(DataError, match="tokenized with 'gpt2' \\(50257 ids\\), not the vocabulary .*'char', 3 ids"):
        check_same_tokenizer(tokenizer_identity(a), gpt2_meta(), "data", "model", "advice")


def write_bins(folder, train_ids, val_ids, meta=None, dtype="<u2"):
    folder.mkdir(parents=True, exist_ok=True)
    np.asarray(train_ids).astype(dtype).tofile(folder / "train.bin")
    np.asarray(val_ids).astype(dtype).tofile(folder / "val.bin")
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def test_an_id_between_the_real_and_the_padded_vocabulary_is_caught_when_its_batch_is_read(tmp_path):
    ids = np.full(400, 50256)
    ids[123] = 50300  # below 50,304 (the padded model has a row for it) but no GPT-2 token
    folder = write_bins(tmp_path / "owt", ids, ids)  # nanoGPT's layout: no metadata, so nothing recorded
    batches = TokenBatches(folder, "train", 4, 16)
    with pytest.raises(DataError, match=r"train.bin holds token id 50300 at token 123,.*50257-id vocabulary"):
        for step in range(200):
            batches.get_batch(step, 0)
    with pytest.raises(DataError, match=r"val.bin holds token id 50300 at token 123"):
        list(SequentialWindows(folder, "val", 16, 4))


def test_a_recorded_largest_id_outside_the_vocabulary_fails_before_any_batch(tmp_path):
    meta = {**char_meta(list("abc")), "max_token_ids": {"train": 2, "val": 7}}
    folder = write_bins(tmp_path / "d", [0, 1, 2] * 20, [0, 1, 2] * 20, meta)
    with pytest.raises(DataError, match=r"meta.json: val.bin holds token id 7 but vocab_size is 3"):
        load_meta(folder)
    (folder / "meta.json").write_text(json.dumps({**meta, "max_token_ids": [2, 7]}), encoding="utf-8")
    with pytest.raises(DataError, match="max_token_ids"):
        load_meta(folder)


def test_bins_read_with_the_wrong_dtype_are_caught(tmp_path):
    meta = {**gpt2_meta(), "dtype": "uint32"}  # the bins are uint16: pairs of ids read as one huge id
    folder = write_bins(tmp_path / "d", np.arange(1000, 1400), np.arange(1000, 1400), meta)
    with pytest.raises(DataError, match=r"train.bin holds token id \d+ at token \d+.*dtype"):
        TokenBatches(folder, "train", 2, 8).get_batch(0, 0)


def test_resume_on_data_of_another_tokenizer_is_an_error(tmp_path, tiny_char_data):
    out = tmp_path / "out"
    train.main(tiny_config(out, tiny_char_data, max_iters=2))
    assert load_checkpoint(out)["tokenizer"] == tokenizer_identity(load_meta(tiny_char_data))
    meta = load_meta(tiny_char_data)
    shuffled = {**meta, "itos": meta["itos"][1:] + meta["itos"][:1]}  # the same size, other characters per id
    with PreparedFolder(tmp_path / "other") as folder:
        for split in ("train", "val"):
            np.fromfile(tiny_char_data / f"{split}.bin", dtype=np.uint16).tofile(folder.temp(f"{split}.bin"))
        folder.commit(shuffled)
    with pytest.raises(DataError, match=r"another vocabulary of the same size"):
        train.main(tiny_config(out, tmp_path / "other", max_iters=4, init_from="resume"))
    assert load_checkpoint(out)["iter_num"] == 2
