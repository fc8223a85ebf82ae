"""forge/data.py: the token-bin loader, metadata and tokenizers."""
import json
import pickle

import numpy as np
import pytest
import torch

from forge.data import DataError, SequentialWindows, TokenBatches, load_meta
from forge.tokenize import get_tokenizer


def make_folder(path, tokens, meta=None, val=None):
    """A prepared data folder with the given train tokens (val: a copy unless given)."""
    path.mkdir(parents=True, exist_ok=True)
    meta = meta or {"vocab_size": int(max(tokens)) + 1, "tokenizer": "gpt2", "dtype": "uint16"}
    dtype = np.dtype("<u2" if meta["dtype"] == "uint16" else "<u4")
    np.asarray(tokens, dtype=dtype).tofile(path / "train.bin")
    np.asarray(tokens if val is None else val, dtype=dtype).tofile(path / "val.bin")
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "toy", np.random.default_rng(0).integers(0, 1000, size=5000))


def global_stream(folder, world_size, grad_accum, steps, batch_size=3, block_size=16, seed=1337):
    """Every rank's micro-batches of `steps` optimizer steps, in global order (step, rank, micro-step)."""
    loaders = [TokenBatches(folder, "train", batch_size, block_size, grad_accum_steps=grad_accum, rank=r,
                            world_size=world_size, seed=seed) for r in range(world_size)]
    stream = []
    for _ in range(steps):
        for loader in loaders:
            stream += [loader.next() for _ in range(grad_accum // world_size)]
    return stream


def assert_same_stream(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_world_size_invariance(folder):
    """1 rank x accumulation 4 == 2 ranks x 2 == 4 ranks x 1: the same global batches, exactly."""
    one = global_stream(folder, world_size=1, grad_accum=4, steps=3)
    assert_same_stream(one, global_stream(folder, world_size=2, grad_accum=4, steps=3))
    assert_same_stream(one, global_stream(folder, world_size=4, grad_accum=4, steps=3))
    # not a constant stream: micro-batches differ from each other
    assert not torch.equal(one[0][0], one[1][0])


def test_get_batch_is_pure_and_matches_next(folder):
    loader = TokenBatches(folder, "train", 3, 16, grad_accum_steps=2)
    stream = [loader.next() for _ in range(6)]
    fresh = TokenBatches(folder, "train", 3, 16, grad_accum_steps=2)
    for i, (x, y) in enumerate(stream):  # any order, any number of times
        for _ in range(2):
            gx, gy = fresh.get_batch(step=i // 2, micro_step=i % 2)
            assert torch.equal(gx, x) and torch.equal(gy, y)


def test_batches_are_shifted_windows_of_the_bin(folder):
    tokens = torch.from_numpy(np.fromfile(folder / "train.bin", dtype="<u2").astype(np.int64))
    loader = TokenBatches(folder, "train", 4, 16)
    x, y = loader.get_batch(7, 0)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
    assert x.is_contiguous() and y.is_contiguous()  # the loss views targets as (-1,)
    for offset, row_x, row_y in zip(loader.window_offsets(7, 0), x, y):
        assert torch.equal(row_x, tokens[offset:offset + 16]) and torch.equal(row_y, tokens[offset + 1:offset + 17])
    assert loader.num_tokens == 5000 and loader.vocab_size == load_meta(folder)["vocab_size"]


def test_seed_and_split_give_different_streams(folder):
    base = TokenBatches(folder, "train", 4, 16, seed=1).window_offsets(0, 0)
    assert not np.array_equal(base, TokenBatches(folder, "train", 4, 16, seed=2).window_offsets(0, 0))
    assert not np.array_equal(base, TokenBatches(folder, "val", 4, 16, seed=1).window_offsets(0, 0))
    assert not np.array_equal(base, TokenBatches(folder, "train", 4, 16, seed=1).window_offsets(1, 0))


def test_resume_from_state_dict_continues_the_stream(folder):
    uninterrupted = global_stream(folder, world_size=1, grad_accum=2, steps=5)
    first = TokenBatches(folder, "train", 3, 16, grad_accum_steps=2)
    before = [first.next() for _ in range(4)]  # two optimizer steps
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    assert state["step"] == 2 and state["micro_step"] == 0
    # resume on 2 ranks from rank 0's state: the global stream goes on unchanged
    resumed = [TokenBatches(folder, "train", 3, 16, grad_accum_steps=2, rank=r, world_size=2) for r in range(2)]
    for loader in resumed:
        loader.load_state_dict(state)
    after = [loader.next() for _ in range(3) for loader in resumed]
    assert_same_stream(before + after, uninterrupted)


def test_grad_accum_not_divisible_by_world_size(folder):
    with pytest.raises(DataError, match="gradient_accumulation_steps=3 is not divisible by the world size 2"):
        TokenBatches(folder, "train", 2, 8, grad_accum_steps=3, rank=0, world_size=2)


def test_split_shorter_than_block(tmp_path):
    folder = make_folder(tmp_path / "tiny", range(100), val=range(10))
    TokenBatches(folder, "train", 2, 99)  # exactly block_size + 1 tokens is enough
    with pytest.raises(DataError, match=r"val\.bin has 10 tokens but block_size=16 needs at least 17"):
        TokenBatches(folder, "val", 2, 16)


def test_missing_data_names_the_prepare_script(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*data/mycorpus/prepare\.py.*data/text/prepare\.py"):
        TokenBatches(tmp_path / "mycorpus", "train", 2, 8)
    dataset = tmp_path / "data" / "shakespeare_char"
    dataset.mkdir(parents=True)
    (dataset / "prepare.py").write_text("")
    with pytest.raises(DataError, match=r"train\.bin not found: create it with `python .*shakespeare_char/prepare\.py`"):
        TokenBatches(dataset, "train", 2, 8)


def test_interrupted_preparation_is_not_read(tmp_path):
    folder = tmp_path / "half"
    folder.mkdir()
    np.arange(100, dtype="<u2").tofile(folder / "val.bin")
    (folder / "train.bin.tmp").write_bytes(b"\0" * 64)
    with pytest.raises(DataError, match="interrupted preparation"):
        TokenBatches(folder, "val", 2, 8)


def test_truncated_bin_is_refused(folder):
    with open(folder / "train.bin", "ab") as f:
        f.write(b"\1")
    with pytest.raises(DataError, match="not a whole number of uint16 tokens"):
        TokenBatches(folder, "train", 2, 8)


def test_uint32_bins(tmp_path):
    tokens = np.array([0, 70_000, 65_536, 99_999] * 10)
    folder = make_folder(tmp_path / "big", tokens, meta={"vocab_size": 100_000, "tokenizer": "gpt2", "dtype": "uint32"})
    x, y = TokenBatches(folder, "train", 2, 8).get_batch(0, 0)
    assert set(x.flatten().tolist()) <= {0, 70_000, 65_536, 99_999} and x.max() > 65_535


def test_meta_defaults_to_gpt2_without_metadata(tmp_path):
    assert load_meta(tmp_path) == {"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16"}


def test_legacy_meta_pkl(tmp_path):
    chars = sorted(set("hello world"))
    with open(tmp_path / "meta.pkl", "wb") as f:  # what nanoGPT's shakespeare_char/prepare.py writes
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    meta = load_meta(tmp_path)
    assert meta == {"vocab_size": len(chars), "tokenizer": "char", "dtype": "uint16", "itos": chars}
    assert get_tokenizer(meta).decode(get_tokenizer(meta).encode("hello")) == "hello"


class _RunsCode:
    def __reduce__(self):
        import os

        return os.system, ("touch pwned",)


def test_malicious_meta_pkl_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65, "itos": _RunsCode()}))
    with pytest.raises(DataError, match=r"meta\.pkl is not a plain nanoGPT meta\.pkl .*refusing to load"):
        load_meta(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_bad_meta_json(tmp_path):
    (tmp_path / "meta.json").write_text('{"vocab_size": 65, "tokenizer": "char", "itos": ["a"]}')
    with pytest.raises(DataError, match="needs 'itos', a list of 65 single characters"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        load_meta(tmp_path)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sequential_windows_predict_every_token_once(tmp_path, world_size):
    tokens = np.arange(1, 104)  # 103 tokens: 102 targets, windows of 8 -> 13 windows, the last one partial
    folder = make_folder(tmp_path / "seq", tokens)
    targets, counts = [], set()
    for rank in range(world_size):
        windows = SequentialWindows(folder, "val", block_size=8, batch_size=2, rank=rank, world_size=world_size)
        batches = list(windows)
        counts.add(len(batches))
        assert len(batches) == len(windows)
        for x, y in batches:
            assert x.shape == y.shape == (2, 8)
            keep = y != -1
            assert torch.equal(y[keep], x[keep] + 1)  # y is x shifted by one in this corpus
            targets += y[keep].tolist()
    assert len(counts) == 1  # every rank runs the same number of forwards (FSDP)
    assert sorted(targets) == tokens[1:].tolist()


def test_sequential_windows_max_targets(tmp_path):
    folder = make_folder(tmp_path / "seq", np.arange(1, 104))
    windows = SequentialWindows(folder, "val", block_size=8, batch_size=4, max_targets=20)
    targets = [t for _, y in windows for t in y[y != -1].tolist()]
    assert targets == list(range(2, 22)) and len(windows) == 1


def test_char_tokenizer_names_unknown_characters():
    tokenizer = get_tokenizer({"tokenizer": "char", "vocab_size": 3, "itos": ["a", "b", "c"]})
    assert tokenizer.encode("cab") == [2, 0, 1] and tokenizer.decode([2, 0, 1]) == "cab"
    assert tokenizer.eot_token is None and tokenizer.vocab_size == 3
    with pytest.raises(DataError, match=r"2 character\(s\) not in the 3-character vocabulary: 'Z', 'é'"):
        tokenizer.encode("abZcé")


def test_gpt2_tokenizer(gpt2_encoding):
    tokenizer = get_tokenizer({"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16"})
    text = "Hello world<|endoftext|>"
    assert tokenizer.encode(text) == gpt2_encoding.encode_ordinary(text)  # special tokens stay plain text
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eot_token == 50256 and tokenizer.vocab_size == 50257
