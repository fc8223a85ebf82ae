"""HellaSwag scoring: a constructed model whose answers we know, acc vs acc_norm, files, ranks."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from forge import hellaswag
from forge.hellaswag import HellaSwagError, ending_losses, hellaswag_accuracy, load_hellaswag, read_examples

WORDS = ["<unk>", "the", "cat", "dog", "sat", "on", "mat", "ran", "away", "barked", "slept", "."]


class WordTokenizer:
    """Whitespace words -> ids; enough to feed hand-written examples to a hand-built model."""

    vocab_size = len(WORDS)
    eot_token = None

    def encode(self, text):
        return [WORDS.index(w) if w in WORDS else 0 for w in text.split()]

    def decode(self, ids):
        return " ".join(WORDS[i] for i in ids)


class BigramTable(nn.Module):
    """logits[prev] = log P(next | prev): the model's next-token probabilities are set by hand."""

    def __init__(self, probs: dict, block_size=64):
        super().__init__()
        V = len(WORDS)
        table = torch.full((V, V), 1e-3)
        for (prev, nxt), p in probs.items():
            table[WORDS.index(prev), WORDS.index(nxt)] = p
        table = table / table.sum(dim=1, keepdim=True)
        self.log_probs = nn.Parameter(table.log())
        self.config = type("Config", (), {"block_size": block_size})()

    def forward(self, idx, targets=None):
        logits = self.log_probs[idx]  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss


# After "cat", "sat" is likely (0.5); the long ending "sat on the mat ." has every token likely
# (0.9) except its first, so its summed loss is larger than the single word "ran" (0.3) but its
# mean loss is the smallest: acc (sum) picks "ran", acc_norm (mean) picks the long ending.
PROBS = {
    ("cat", "sat"): 0.2, ("cat", "ran"): 0.3, ("cat", "barked"): 0.01, ("cat", "slept"): 0.1,
    ("sat", "on"): 0.9, ("on", "the"): 0.9, ("the", "mat"): 0.9, ("mat", "."): 0.9,
    ("dog", "barked"): 0.9, ("dog", "ran"): 0.05,
    ("the", "cat"): 0.05, ("the", "dog"): 0.04,
}
LONG_VS_SHORT = {"ctx": "the cat", "endings": ["sat on the mat .", "ran", "barked", "slept"], "label": 0}
DOG = {"ctx": "the dog", "endings": ["ran", "slept", "barked", "sat"], "label": 2}


def _model():
    torch.manual_seed(0)
    return BigramTable(PROBS)


def test_ending_losses_are_the_hand_computed_cross_entropies():
    model = _model()
    tok = WordTokenizer()
    P = model.log_probs.detach().exp()
    p = lambda a, b: P[WORDS.index(a), WORDS.index(b)].item()  # noqa: E731
    rows = [(tok.encode("the cat"), tok.encode(" sat on the mat .")), (tok.encode("the cat"), tok.encode(" ran"))]
    sums, counts = ending_losses(model, rows, block_size=64, device="cpu")
    long_sum = -sum(math.log(p(a, b)) for a, b in [("cat", "sat"), ("sat", "on"), ("on", "the"), ("the", "mat"), ("mat", ".")])
    assert counts.tolist() == [5, 1]
    assert sums.tolist() == pytest.approx([long_sum, -math.log(p("cat", "ran"))], rel=1e-5)
    # the long ending: larger total, smaller mean, which is where acc and acc_norm part ways
    assert sums[0] > sums[1] and sums[0] / 5 < sums[1] / 1


def test_acc_uses_sum_and_acc_norm_uses_mean():
    tok, model = WordTokenizer(), _model()
    assert hellaswag_accuracy(model, [LONG_VS_SHORT], tok, "cpu") == (0.0, 1.0)
    assert hellaswag_accuracy(model, [DOG], tok, "cpu") == (1.0, 1.0)
    wrong = {**DOG, "label": 3}
    acc, acc_norm = hellaswag_accuracy(model, [LONG_VS_SHORT, DOG, wrong, DOG], tok, "cpu", batch_size=3)
    assert (acc, acc_norm) == (0.5, 0.75)


def test_rank_shares_partition_the_examples_and_mode_is_restored():
    tok, model = WordTokenizer(), _model()
    model.train()
    examples = [LONG_VS_SHORT, DOG, {**DOG, "label": 0}]
    shares = [hellaswag_accuracy(model, examples, tok, "cpu", rank=r, world_size=2, batch_size=1) for r in range(2)]
    assert shares == [(0.0, 0.5), (1.0, 1.0)]  # rank 0: examples 0 and 2; rank 1: example 1 (no process group)
    assert model.training


def test_long_rows_keep_their_last_block_size_tokens():
    tok, model = WordTokenizer(), _model()
    rows = [(tok.encode("the dog the dog the dog the cat"), tok.encode(" sat on"))]
    full, _ = ending_losses(model, rows, block_size=64, device="cpu")
    cropped, n = ending_losses(model, rows, block_size=3, device="cpu")
    assert n.item() == 2 and cropped.item() == pytest.approx(full.item(), rel=1e-6)  # a bigram needs one token back


def _two_rank_worker(rank, store_path, jsonl, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        try:
            load_hellaswag(jsonl + ".missing", rank=rank)
        except HellaSwagError as exc:  # rank 0 finds the problem, every rank raises it
            results[f"error{rank}"] = str(exc)
        examples = load_hellaswag(jsonl, rank=rank)
        results[rank] = hellaswag_accuracy(_model(), examples, WordTokenizer(), "cpu", rank=rank, world_size=2,
                                           batch_size=1)
    finally:
        dist.destroy_process_group()


def test_two_ranks_sum_their_counts(tmp_path):
    examples = [LONG_VS_SHORT, DOG, {**DOG, "label": 0}]  # 3 examples: rank 1 runs a discarded dummy batch
    jsonl = _write_jsonl(tmp_path / "hs.jsonl", [json.dumps(ex) for ex in examples])
    results = mp.Manager().dict()
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"), str(jsonl), results), nprocs=2)
    expected = hellaswag_accuracy(_model(), examples, WordTokenizer(), "cpu")
    assert results[0] == results[1] == expected == pytest.approx((1 / 3, 2 / 3))
    assert results["error0"] == results["error1"] and "hs.jsonl.missing not found" in results["error0"]


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_read_examples_validates_each_line(tmp_path):
    good = json.dumps({**DOG, "ind": 7, "ctx_a": "the dog", "ctx_b": ""})
    path = _write_jsonl(tmp_path / "hs.jsonl", [good, "", good, good])
    assert len(read_examples(path)) == 3 and len(read_examples(path, limit=2)) == 2
    cases = [
        ("{not json", "hs.jsonl:2: not valid JSON"),
        (json.dumps({**DOG, "label": 4}), "hs.jsonl:2: 'label'"),
        (json.dumps({**DOG, "endings": "ran"}), "hs.jsonl:2: 'endings'"),
        (json.dumps({"endings": DOG["endings"], "label": 0}), "hs.jsonl:2: 'ctx'"),
        ("[1, 2]", "hs.jsonl:2: expected a JSON object"),
    ]
    for bad, message in cases:
        _write_jsonl(path, [good, bad])
        with pytest.raises(HellaSwagError, match=message):
            read_examples(path)
    with pytest.raises(HellaSwagError, match="not found"):
        read_examples(tmp_path / "missing.jsonl")


def test_download_is_atomic_and_cached(tmp_path, monkeypatch):
    source = _write_jsonl(tmp_path / "official.jsonl", [json.dumps(DOG)] * 3)
    monkeypatch.setattr(hellaswag, "HELLASWAG_VAL_URL", source.as_uri())
    cache = tmp_path / "cache"
    assert len(load_hellaswag(cache_dir=cache, limit=2)) == 2
    assert sorted(os.listdir(cache)) == ["hellaswag_val.jsonl"]  # no temporary file left behind
    with pytest.raises(HellaSwagError, match="official validation set has 10042"):
        load_hellaswag(cache_dir=cache)  # a short cached file is not mistaken for the full set
    monkeypatch.setattr(hellaswag, "HELLASWAG_VAL_URL", (tmp_path / "nowhere.jsonl").as_uri())
    with pytest.raises(HellaSwagError, match="could not download .* --input"):
        load_hellaswag(cache_dir=tmp_path / "empty")
    assert os.listdir(tmp_path / "empty") == []


def test_char_tokenizer_is_refused():
    with pytest.raises(HellaSwagError, match="GPT-2 BPE.*'char'"):
        hellaswag.check_tokenizer("char")


def test_training_logs_hellaswag_alongside_val_loss(tmp_path, gpt2_encoding):
    from forge.metrics import read_metrics
    from forge.tokenize import char_meta, gpt2_meta
    from tests.util import assert_clean_error, run_py

    data = tmp_path / "data" / "bpe"
    data.mkdir(parents=True)
    ids = np.array(gpt2_encoding.encode_ordinary("The cat sat on the mat. The dog barked. " * 20), dtype="<u2")
    ids.tofile(data / "train.bin")
    ids.tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps(gpt2_meta()))
    hs = _write_jsonl(tmp_path / "hs.jsonl", [json.dumps(ex) for ex in (LONG_VS_SHORT, DOG, DOG)])
    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=32", "--batch_size=2", "--gradient_accumulation_steps=1",
            "--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--log_interval=1", "--compile=False", "--device=cpu",
            "--warmup_iters=0", "--lr_decay_iters=4"]
    out = tmp_path / "out"
    run_py("train.py", f"--data_dir={data}", f"--out_dir={out}", *tiny, "--eval_hellaswag_interval=4",
           f"--hellaswag_path={hs}", "--hellaswag_limit=2", check=True)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 2, 4]
    assert [("hellaswag_acc_norm" in r, "hellaswag_acc" in r) for r in evals] == [(True, True), (False, False), (True, True)]
    assert all(r["hellaswag_acc_norm"] in (0.0, 0.5, 1.0) for r in evals if "hellaswag_acc_norm" in r)  # 2 examples

    chars = tmp_path / "data" / "chars"
    chars.mkdir()
    (np.arange(100, dtype="<u2") % 3).tofile(chars / "train.bin")
    (np.arange(100, dtype="<u2") % 3).tofile(chars / "val.bin")
    (chars / "meta.json").write_text(json.dumps(char_meta(["a", "b", "c"])))
    proc = run_py("train.py", f"--data_dir={chars}", f"--out_dir={tmp_path / 'out-char'}", *tiny,
                  "--eval_hellaswag_interval=2", f"--hellaswag_path={hs}")
    assert_clean_error(proc, "GPT-2 BPE", "'char'")
    assert not (tmp_path / "out-char").exists()
