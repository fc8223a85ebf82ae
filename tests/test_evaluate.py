"""evaluate.py: the whole-split loss equals a hand computation, ranks agree, HellaSwag runs, bad input."""
import contextlib
import json
import math
import re

import numpy as np
import pytest
import torch

import evaluate
from forge.checkpoint import build_model
from forge.errors import UserError
from forge.tokenize import gpt2_meta
from tests.test_sample import TINY_GPT, make_char_dataset, make_run
from tests.util import assert_clean_error, run_py, snapshot

BATCH = 3


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_run")
    data_dir = make_char_dataset(root / "data" / "tiny_char")
    meta = json.loads((data_dir / "meta.json").read_text())
    model = make_run(root / "out", data_dir, meta["vocab_size"], seed=1)
    return root / "out", data_dir, model


def reference_loss(model, tokens: np.ndarray, block_size: int) -> tuple[float, int]:
    """Mean cross-entropy over consecutive windows, each scored alone, every token after the first once."""
    tokens = torch.from_numpy(tokens.astype(np.int64))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, block_size):
            x = tokens[start:start + block_size][None]
            y = tokens[start + 1:start + block_size + 1][None]
            x = x[:, :y.size(1)]
            logits, _ = model(x, y)
            total += torch.nn.functional.cross_entropy(logits[0], y[0], reduction="sum").item()
            count += y.size(1)
    return total / count, count


def _reported(stdout: str) -> tuple[float, int]:
    match = re.search(r"loss (\d+\.\d+), perplexity (\d+\.\d+) over ([\d,]+) tokens", stdout)
    assert match, stdout
    loss, ppl, n = float(match[1]), float(match[2]), int(match[3].replace(",", ""))
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)
    return loss, n


def test_loss_over_the_whole_split_equals_hand_computed(char_run, capsys):
    out_dir, data_dir, model = char_run
    val = np.fromfile(data_dir / "val.bin", dtype="<u2")
    expected, count = reference_loss(model, val, 16)
    assert count == len(val) - 1 and (len(val) - 1) % 16 and (len(val) - 1) // 16 % BATCH  # partial window and batch
    evaluate.main(evaluate.load_config([f"--out_dir={out_dir}", f"--batch_size={BATCH}", "--device=cpu"],
                                       evaluate.EvalConfig))
    loss, n = _reported(capsys.readouterr().out)
    assert n == count and loss == pytest.approx(expected, abs=1e-4)
    # a shorter window and a token limit follow the same protocol
    expected, _ = reference_loss(model, val[:101], 8)
    evaluate.main(evaluate.load_config([f"--out_dir={out_dir}", "--block_size=8", "--limit_tokens=100", "--device=cpu"],
                                       evaluate.EvalConfig))
    assert _reported(capsys.readouterr().out) == (pytest.approx(expected, abs=1e-4), 100)


def test_split_loss_equals_the_full_logits_path(char_run):
    """The chunked head (return_logits=False) sums the same token losses as full logits, ignored targets and an
    all-padding batch (a NaN mean) included."""
    model = char_run[2]
    V = model.config.vocab_size
    torch.manual_seed(0)
    batches = [(torch.randint(0, V, (3, 16)), torch.randint(0, V, (3, 16))) for _ in range(2)]
    batches[0][1][1, 5:] = -1
    batches[1][1][:] = -1

    class Windows(list):
        device = torch.device("cpu")

    total, n = evaluate.split_loss(model, Windows(batches), contextlib.nullcontext(), world_size=1)
    with torch.no_grad():
        expected = sum(torch.nn.functional.cross_entropy(model(x, y)[0].flatten(0, 1), y.flatten(), ignore_index=-1,
                                                         reduction="sum").item() for x, y in batches)
    assert n == 2 * 16 + 5 and total == pytest.approx(expected, rel=1e-6)


def test_two_ranks_under_torchrun_give_the_same_loss(char_run):
    out_dir, data_dir, model = char_run
    expected, count = reference_loss(model, np.fromfile(data_dir / "train.bin", dtype="<u2"), 16)
    proc = run_py("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py",
                  f"--out_dir={out_dir}", "--split=train", f"--batch_size={BATCH}", "--device=cpu", check=True)
    assert "2 process(es)" in proc.stdout
    loss, n = _reported(proc.stdout)
    assert n == count and loss == pytest.approx(expected, abs=1e-4)


def test_hellaswag_and_gpt2_folder(tmp_path, gpt2_encoding):
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf"
    build_model("gpt", {**TINY_GPT, "block_size": 64, "vocab_size": 50257}).save_pretrained(hf_dir)
    example = {"ctx": "A man is sitting on a roof. He", "label": 1,
               "endings": ["is using wrap to wrap a pair of skis.", "starts pulling up roofing on a roof.",
                           "is ripping level tiles off.", "is holding a rubik's cube."]}
    hs = tmp_path / "hellaswag_val.jsonl"
    hs.write_text("".join(json.dumps({**example, "label": i % 4}) + "\n" for i in range(6)))
    data_dir = tmp_path / "data" / "bpe"
    data_dir.mkdir(parents=True)
    np.array(gpt2_encoding.encode_ordinary("Hello there. " * 30), dtype="<u2").tofile(data_dir / "val.bin")
    (data_dir / "meta.json").write_text(json.dumps(gpt2_meta()))
    proc = run_py("evaluate.py", f"--init_from={hf_dir}", f"--data_dir={data_dir}", "--hellaswag=True",
                  f"--input={hs}", "--limit=5", "--batch_size=2", "--device=cpu", check=True)
    _reported(proc.stdout)
    match = re.search(r"HellaSwag: acc (\d\.\d+), acc_norm (\d\.\d+) over 5 examples", proc.stdout)
    assert match, proc.stdout
    # the same answer for all 5 examples, whose labels cycle 0..3: 1 or 2 of them are right
    assert float(match[1]) in (0.2, 0.4) and float(match[2]) in (0.2, 0.4)


def test_bad_inputs(char_run, tmp_path):
    out_dir, data_dir, _ = char_run
    other = make_char_dataset(tmp_path / "data" / "other", text="xyz\n" * 300)
    before = snapshot(out_dir.parent)
    assert_clean_error(run_py("evaluate.py", f"--out_dir={out_dir}", "--hellaswag=True", "--loss=False", "--device=cpu"),
                       "GPT-2 BPE", "'char'")
    cases = [
        ([f"--data_dir={other}"], "tokenized with 'char'.*evaluate it on data prepared with its own tokenizer"),
        ([f"--data_dir={tmp_path / 'data' / 'missing'}"], "data folder .*missing does not exist"),
        (["--split=test"], "test.bin not found"),
        (["--init_from=gpt2", f"--data_dir={tmp_path / 'owt'}"], "owt does not exist"),  # before any download
        (["--block_size=32"], "block_size=32 is longer than the model's context"),
        ([f"--out_dir={tmp_path / 'nope'}"], "does not exist"),
        (["--loss=False"], "nothing to do"),
        (["--limit_token=5"], "did you mean 'limit_tokens'"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            evaluate.main(evaluate.load_config([f"--out_dir={out_dir}", "--device=cpu", *argv], evaluate.EvalConfig))
    assert snapshot(out_dir.parent) == before
