"""data/*/prepare.py and the shared streaming pipeline in forge/tokenize.py."""
import json

import numpy as np
import pytest

from forge.data import DataError, TokenBatches, load_meta
from forge.tokenize import DTYPES, PreparedFolder, bin_max_id, char_meta, gpt2_meta, tokenize_to_bin
from tests.util import SHARED, assert_clean_error, run_py, snapshot

HAVE_SHAKESPEARE = (SHARED / "data" / "tinyshakespeare" / "input.txt").is_file()


@pytest.fixture
def shakespeare_file(tmp_path, shakespeare_text):
    path = tmp_path / "input.txt"
    path.write_text(shakespeare_text, encoding="utf-8")
    return path


def nanogpt_char_bins(text):
    """What nanoGPT's data/shakespeare_char/prepare.py writes, computed its way."""
    chars = sorted(list(set(text)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(text)
    train_ids = [stoi[c] for c in text[:int(n * 0.9)]]
    val_ids = [stoi[c] for c in text[int(n * 0.9):]]
    return np.array(train_ids, dtype=np.uint16).tobytes(), np.array(val_ids, dtype=np.uint16).tobytes(), chars


def recorded(meta: dict, out) -> dict:
    """meta as a prepared folder holds it: plus the largest id of each bin, read here from the bins."""
    return {**meta, "max_token_ids": {split: int(np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).max())
                                      for split in ("train", "val")}}


def test_shakespeare_char_is_byte_compatible_with_nanogpt(tmp_path, shakespeare_file, shakespeare_text):
    out = tmp_path / "out"
    run_py("data/shakespeare_char/prepare.py", "--input", shakespeare_file, "--out_dir", out, check=True)
    train, val, chars = nanogpt_char_bins(shakespeare_text)
    assert (out / "train.bin").read_bytes() == train and (out / "val.bin").read_bytes() == val
    assert load_meta(out) == recorded({"vocab_size": len(chars), "tokenizer": "char", "dtype": "uint16", "itos": chars},
                                      out)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    if HAVE_SHAKESPEARE:
        assert (len(train) // 2, len(val) // 2, len(chars)) == (1_003_854, 111_540, 65)


def test_shakespeare_bpe_counts(tmp_path, shakespeare_file, shakespeare_text, gpt2_encoding):
    out = tmp_path / "out"
    run_py("data/shakespeare/prepare.py", "--input", shakespeare_file, "--out_dir", out, "--num_proc", "2", check=True)
    n = int(len(shakespeare_text) * 0.9)
    for split, part in (("train", shakespeare_text[:n]), ("val", shakespeare_text[n:])):
        expected = np.array(gpt2_encoding.encode_ordinary(part), dtype=np.uint16)
        assert np.array_equal(np.fromfile(out / f"{split}.bin", dtype="<u2"), expected)
    assert load_meta(out) == recorded(gpt2_meta(), out)
    if HAVE_SHAKESPEARE:
        assert (out / "train.bin").stat().st_size // 2 == 301_966 and (out / "val.bin").stat().st_size // 2 == 36_059


def test_pipeline_same_bytes_for_any_num_proc_and_chunking(tmp_path, shakespeare_text, gpt2_encoding):
    """Long documents are cut at BPE-safe points only: small chunks and 2 processes change no byte."""
    docs = [shakespeare_text[:60_000], "", "short one", shakespeare_text[60_000:90_000]]
    bins = []
    for num_proc, chunk_chars in ((1, 1 << 18), (2, 1000), (1, 777)):
        path = tmp_path / f"{num_proc}-{chunk_chars}.bin"
        written = tokenize_to_bin(docs, path, gpt2_meta(), num_proc=num_proc, append_eot=True, chunk_chars=chunk_chars)
        assert written.documents == 4 and written.characters == sum(map(len, docs))
        bins.append(path.read_bytes())
    expected = [t for doc in docs for t in gpt2_encoding.encode_ordinary(doc) + [50256]]
    assert bins[0] == np.array(expected, dtype="<u2").tobytes()
    assert bins[0] == bins[1] == bins[2]


def test_uint16_overflow_is_an_error(tmp_path):
    itos = [chr(0x4E00 + i) for i in range(20)] + [chr(0x10000 + i) for i in range(70_000)]
    meta = {**char_meta(itos), "dtype": "uint16"}  # forced: the ids above 65,535 cannot fit
    with pytest.raises(DataError, match="token id 70019 does not fit uint16"):
        tokenize_to_bin([itos[-1]], tmp_path / "x.bin", meta)


def test_own_text_char_vocabulary_above_uint16_is_uint32(tmp_path):
    chars = [chr(c) for c in range(0x20, 0x20 + 70_500) if not 0xD800 <= c <= 0xDFFF]
    corpus = tmp_path / "wide.txt"
    corpus.write_text("".join(chars) * 2, encoding="utf-8")
    out = tmp_path / "wide"
    run_py("data/text/prepare.py", corpus, "--tokenizer", "char", "--out_dir", out, "--num_proc", "1", check=True)
    meta = load_meta(out)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == len(chars) > 65_536
    train = np.fromfile(out / "train.bin", dtype="<u4")
    assert train.max() > 65_535 and "".join(meta["itos"][i] for i in train[:5]) == "".join(chars[:5])
    x, y = TokenBatches(out, "val", 2, 64).get_batch(0, 0)
    assert int(x.max()) < len(chars) and torch_equal_shift(x, y, meta)


def torch_equal_shift(x, y, meta):
    """In a corpus of every character in order, each target is the next character of the vocabulary."""
    return bool(((y - x) % meta["vocab_size"] == 1).all())


def test_own_text_directory_of_txt_and_jsonl(tmp_path, gpt2_encoding):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("First file.\n" * 50, encoding="utf-8")
    (corpus / "sub" / "b.jsonl").write_text("\n".join(json.dumps({"body": f"record {i}"}) for i in range(30)) + "\n\n")
    (corpus / "ignored.csv").write_text("x,y")
    out = tmp_path / "mine"
    run_py("data/text/prepare.py", corpus, "--text_field", "body", "--val_fraction", "0.25", "--out_dir", out,
           "--num_proc", "2", check=True)
    docs = ["First file.\n" * 50] + [f"record {i}" for i in range(30)]
    expected = [t for doc in docs for t in gpt2_encoding.encode_ordinary(doc) + [50256]]
    train, val = np.fromfile(out / "train.bin", dtype="<u2"), np.fromfile(out / "val.bin", dtype="<u2")
    assert train.tolist() + val.tolist() == expected
    assert len(train) == int(len(expected) * 0.75) and load_meta(out) == recorded(gpt2_meta(), out)


def test_bad_jsonl_line_names_file_and_line_and_keeps_the_old_output(tmp_path, shakespeare_file):
    out = tmp_path / "data"
    run_py("data/text/prepare.py", shakespeare_file, "--tokenizer", "char", "--out_dir", out, check=True)
    before = snapshot(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": broken\n')
    assert_clean_error(run_py("data/text/prepare.py", bad, "--out_dir", out, "--force"), "bad.jsonl:3", "not valid JSON")
    missing_field = tmp_path / "nofield.jsonl"
    missing_field.write_text('{"content": "x"}\n')
    assert_clean_error(run_py("data/text/prepare.py", missing_field, "--out_dir", out, "--force"), "nofield.jsonl:1", "--text_field")
    assert snapshot(out) == before


def test_empty_input_and_bad_arguments(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    assert_clean_error(run_py("data/text/prepare.py", empty, "--out_dir", out), "no text", "empty.txt")
    assert_clean_error(run_py("data/text/prepare.py", tmp_path / "nope.txt", "--out_dir", out), "nope.txt", "not found")
    assert_clean_error(run_py("data/text/prepare.py", empty, "--val_fraction", "x"), "--val_fraction")
    assert_clean_error(run_py("data/text/prepare.py", empty, "--val_fraction", "1.5"), "--val_fraction 1.5")
    assert_clean_error(run_py("data/shakespeare_char/prepare.py", "--input", tmp_path / "nope.txt", "--out_dir", out),
                       "nope.txt")
    assert not out.exists()


def test_failed_preparation_leaves_nothing_and_a_rerun_completes(tmp_path):
    out = tmp_path / "prep"

    def documents(fail_after):
        for i in range(10):
            if i == fail_after:
                raise KeyboardInterrupt  # e.g. Ctrl-C mid-way: not even an Exception
            yield f"document {i} " * 100

    meta = char_meta(sorted(set("".join(f"document {i} " for i in range(10)))))
    with pytest.raises(KeyboardInterrupt), PreparedFolder(out) as folder:
        tokenize_to_bin(documents(fail_after=5), folder.temp("train.bin"), meta, chunk_chars=100)
    assert not out.exists()  # a failed first run leaves no folder that looks prepared

    # a process killed mid-way leaves *.tmp files only: the loader refuses them, a rerun replaces them
    out.mkdir()
    (out / "train.bin.tmp").write_bytes(b"\1\0" * 50)
    with pytest.raises(DataError, match="interrupted preparation"):
        TokenBatches(out, "train", 1, 8)
    with PreparedFolder(out) as folder:
        for split in ("train", "val"):
            tokenize_to_bin(documents(fail_after=None), folder.temp(f"{split}.bin"), meta)
        folder.commit(meta)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert TokenBatches(out, "train", 1, 8).num_tokens == sum(len(f"document {i} ") * 100 for i in range(10))


def test_openwebtext_from_a_local_dataset(tmp_path, gpt2_encoding):
    """The OpenWebText path end to end on a small local dataset: nanoGPT's split, EOT after each document."""
    datasets = pytest.importorskip("datasets")
    source = tmp_path / "owt"
    source.mkdir()
    rng = np.random.default_rng(0)
    words = np.array(["the", "cat", "sat", "on", "a", "mat", ".", "\n", "Hello", "world"])
    docs = [" ".join(rng.choice(words, size=rng.integers(1, 60))) for _ in range(2500)]
    (source / "data.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    run_py("data/openwebtext/prepare.py", "--dataset", source, "--out_dir", out, "--num_proc", "2", env=env, check=True)

    reference = datasets.Dataset.from_dict({"text": docs}).train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    for split, name in (("train", "train"), ("val", "test")):
        expected = [t for doc in reference[name]["text"] for t in gpt2_encoding.encode_ordinary(doc) + [50256]]
        assert np.fromfile(out / f"{split}.bin", dtype="<u2").tolist() == expected
    assert load_meta(out) == recorded(gpt2_meta(), out)
    again = run_py("data/openwebtext/prepare.py", "--dataset", source, "--out_dir", out, env=env, check=True)
    assert "already prepared" in again.stdout


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_max_id_reads_every_block(tmp_path, dtype):
    """The largest id wherever it sits: the first block, or a partial last one (blocks of 4M tokens)."""
    tokens = np.zeros((1 << 22) + 3, dtype=DTYPES[dtype])
    path = tmp_path / "train.bin"
    for where, largest in ((0, 9), (-1, 60_000)):
        tokens[:] = 7
        tokens[where] = largest
        tokens.tofile(path)
        assert bin_max_id(path, dtype) == largest
    path.write_bytes(b"")
    assert bin_max_id(path, dtype) == -1
