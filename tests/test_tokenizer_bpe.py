"""A byte-level BPE trained on the corpus (data/text/prepare.py --tokenizer bpe): deterministic, exact round
trips, used by training, sampling, evaluation and the Hugging Face export."""
import json

import numpy as np
import pytest

import sample
from forge.data import DataError, load_meta
from forge.tokenize import get_tokenizer
from tests.util import assert_clean_error, run_py

UNICODE = "naïve café — 日本語の文章 🙂🎉 Ünïcödé ñ\n"
RARE = "𝄞"  # seen once: stays as its 4 byte tokens


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_text):
    """Shakespeare in a .txt file and unicode lines in a .jsonl file."""
    folder = tmp_path_factory.mktemp("bpe_corpus")
    (folder / "a.txt").write_text(shakespeare_text[:60_000], encoding="utf-8")
    with open(folder / "b.jsonl", "w", encoding="utf-8") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"{i}: {UNICODE * 3}" + (RARE if i == 7 else "")}) + "\n")
    return folder


def prepare(corpus, out, *extra):
    return run_py("data/text/prepare.py", corpus, "--tokenizer", "bpe", "--vocab_size", "600", "--out_dir", out, *extra)


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("bpe") / "data"
    proc = prepare(corpus, out, "--num_proc", "2")
    assert proc.returncode == 0, proc.stderr
    return out


def outputs(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_training_is_deterministic_and_bins_are_the_documents_encoded(tmp_path, corpus, bpe_data):
    again = tmp_path / "again"
    assert prepare(corpus, again, "--num_proc", "1").returncode == 0
    assert outputs(again) == outputs(bpe_data)  # same tokenizer.json, meta.json and bins, other num_proc
    meta = load_meta(bpe_data)
    assert sorted(outputs(bpe_data)) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"], meta["tokenizer_file"]) == \
        ("bpe", 600, "uint16", "tokenizer.json")
    tokenizer = get_tokenizer(meta, bpe_data)
    docs = [(corpus / "a.txt").read_text(encoding="utf-8")] + \
        [json.loads(line)["text"] for line in (corpus / "b.jsonl").read_text(encoding="utf-8").splitlines()]
    expected = [i for doc in docs for i in tokenizer.encode(doc) + [tokenizer.eot_token]]
    stream = np.concatenate([np.fromfile(bpe_data / f"{split}.bin", dtype="<u2") for split in ("train", "val")])
    assert stream.tolist() == expected  # long documents are cut only where the encoding does not change


def test_round_trips_text_exactly_and_streams_whole_characters(bpe_data):
    tokenizer = get_tokenizer(load_meta(bpe_data), bpe_data)
    text = "Hello  world\t\n\n" + UNICODE + RARE + " <|endoftext|> is plain text here \x00\u200b"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and tokenizer.eot_token not in ids
    assert any(not _valid_utf8(tokenizer.decode_bytes([i])) for i in ids)  # some tokens end mid-character
    decoder = sample.IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_a_changed_or_missing_tokenizer_file_is_refused(tmp_path, bpe_data):
    meta = load_meta(bpe_data)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "tokenizer.json").write_bytes((bpe_data / "tokenizer.json").read_bytes().replace(b'"e"', b'"f"', 1))
    with pytest.raises(DataError, match="SHA-256"):
        get_tokenizer(meta, copy)
    with pytest.raises(DataError, match="tokenizer.json"):
        get_tokenizer(meta, tmp_path / "nowhere")
    with pytest.raises(DataError, match="data folder"):
        get_tokenizer(meta)
    (copy / "meta.json").write_text(json.dumps({**meta, "tokenizer_file": "../elsewhere/tokenizer.json"}))
    with pytest.raises(DataError, match="tokenizer_file"):
        load_meta(copy)


def test_a_model_trained_on_it_samples_text_and_exports_a_working_tokenizer(tmp_path, bpe_data):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    run_py("train.py", f"--data_dir={bpe_data}", f"--out_dir={out}", "--n_layer=1", "--n_head=2", "--n_embd=32",
           "--block_size=32", "--batch_size=8", "--gradient_accumulation_steps=1", "--max_iters=30",
           "--lr_decay_iters=30", "--warmup_iters=0", "--learning_rate=1e-2", "--eval_interval=30", "--eval_iters=1",
           "--log_interval=10", "--compile=False", "--device=cpu", "--dtype=float32", env={"OMP_NUM_THREADS": "1"},
           check=True)
    prompt = "ROMEO: café 🙂"
    sampled = run_py("sample.py", f"--out_dir={out}", f"--start={prompt}", "--max_new_tokens=40", "--device=cpu",
                     "--seed=3", env={"OMP_NUM_THREADS": "1"}, check=True)
    text = sampled.stdout.split(sample.SEPARATOR)[0]
    assert text.startswith(prompt) and len(text) > len(prompt) + 10
    # barely trained, it has learnt Shakespeare's most common bytes: mostly letters and spaces
    assert sum(c.isalpha() or c.isspace() for c in text[len(prompt):]) > 0.6 * len(text[len(prompt):])

    evaluated = run_py("evaluate.py", f"--out_dir={out}", "--device=cpu", "--block_size=32",
                       env={"OMP_NUM_THREADS": "1"}, check=True)
    assert "loss" in evaluated.stdout

    dest = tmp_path / "hf"
    run_py("-m", "forge.export", out, dest, check=True)
    ours = get_tokenizer(load_meta(bpe_data), bpe_data)
    theirs = transformers.AutoTokenizer.from_pretrained(dest)
    text = "Good morrow, cousin! " + UNICODE + RARE
    assert theirs(text)["input_ids"] == ours.encode(text)
    assert theirs.decode(ours.encode(text)) == text
    assert theirs.eos_token_id == ours.eot_token
    model = transformers.AutoModelForCausalLM.from_pretrained(dest)
    assert model.config.vocab_size == ours.vocab_size and model.config.eos_token_id == ours.eot_token


def test_hellaswag_refuses_a_trained_bpe(tmp_path, bpe_data):
    proc = run_py("train.py", f"--data_dir={bpe_data}", f"--out_dir={tmp_path / 'out'}", "--n_layer=1", "--n_head=2",
                  "--n_embd=16", "--block_size=16", "--max_iters=2", "--compile=False", "--device=cpu",
                  "--eval_interval=2", "--eval_hellaswag_interval=2", f"--hellaswag_path={tmp_path / 'hs.jsonl'}")
    assert_clean_error(proc, "HellaSwag", "'bpe'")
    assert not (tmp_path / "out").exists()
