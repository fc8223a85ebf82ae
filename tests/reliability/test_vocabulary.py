"""Bad input of one class: token ids and tokenizers that do not belong to the model.

Ids outside the tokenizer's vocabulary (including those between GPT-2's 50,257 and the padded
50,304, which a padded model would silently train on), bins read with the wrong dtype, data or
metadata of another tokenizer (also of the same size) for resuming, sampling, evaluating and
fine-tuning GPT-2, and a resume whose explicit shape conflicts with the run. Each case: non-zero
exit, one `error:` line naming the culprit, no traceback, no file of the workspace changed and no
checkpoint written. Where metadata records the largest ids, the error comes before anything is
written; in a legacy folder without it, when the first batch is read (the first evaluation).
"""
import json

import numpy as np
import pytest
import torch

from tests.conftest import make_char_dataset
from tests.reliability.conftest import cli
from tests.util import assert_clean_error, snapshot


@pytest.fixture(scope="module")
def vocab_ws(forks, tmp_path_factory, shakespeare_text):
    root = tmp_path_factory.mktemp("vocabulary")
    data = make_char_dataset(root / "data" / "char", shakespeare_text[:20_000])
    meta = json.loads((data / "meta.json").read_text())
    same_size = make_char_dataset(root / "data" / "same_size", shakespeare_text[:20_000])
    (same_size / "meta.json").write_text(json.dumps({**meta, "itos": meta["itos"][1:] + meta["itos"][:1]}))
    bad_val = make_char_dataset(root / "data" / "bad_val", shakespeare_text[:20_000])
    val = np.fromfile(bad_val / "val.bin", dtype="<u2")
    val[len(val) // 2] = meta["vocab_size"] + 3
    val.tofile(bad_val / "val.bin")
    recorded = make_char_dataset(root / "data" / "recorded", shakespeare_text[:20_000])
    (recorded / "meta.json").write_text(json.dumps({**meta, "max_token_ids": {"train": meta["vocab_size"] + 3,
                                                                               "val": 10}}))
    legacy = root / "data" / "owt"  # nanoGPT's OpenWebText layout: no metadata; one id in GPT-2's padding
    legacy.mkdir()
    ids = np.random.default_rng(0).integers(0, 50257, 3000).astype("<u2")
    ids[::50] = 50300
    ids.tofile(legacy / "train.bin")
    ids.tofile(legacy / "val.bin")
    wrong_dtype = make_char_dataset(root / "data" / "wrong_dtype", shakespeare_text[:20_000])
    (wrong_dtype / "meta.json").write_text(json.dumps({**meta, "dtype": "uint32"}))
    run = root / "runs" / "good"
    done = forks.run("train.py", *cli(run, data, max_iters=2, lr_decay_iters=2))
    assert done.returncode == 0, done.stderr
    hf = root / "gpt2-tiny"  # what transformers writes for GPT-2: its real 50,257-id vocabulary
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16)).save_pretrained(hf)
    return root


def fresh(root, data="char", **overrides):
    return cli(root / "fresh" / data, root / "data" / data, max_iters=2, lr_decay_iters=2, **overrides)


# (id, entry point, arguments, words the error line must contain)
CASES = [
    ("train-recorded-id-outside-vocab", "train.py", lambda r: fresh(r, "recorded"),
     ["meta.json", "train.bin", "token id"]),
    ("train-id-in-gpt2-padding", "train.py", lambda r: fresh(r, "owt"),
     ["train.bin", "50300", "50257"]),
    ("train-wrong-dtype", "train.py", lambda r: fresh(r, "wrong_dtype"),
     [".bin", "dtype"]),
    ("train-resume-other-tokenizer", "train.py",
     lambda r: [f"--out_dir={r / 'runs' / 'good'}", "--init_from=resume", "--max_iters=4",
                f"--data_dir={r / 'data' / 'same_size'}"], ["same_size", "another vocabulary of the same size", "ckpt.pt"]),
    ("train-resume-conflicting-shape", "train.py",
     lambda r: [f"--out_dir={r / 'runs' / 'good'}", "--init_from=resume", "--max_iters=4", "--n_embd=64"],
     ["n_embd=32", "n_embd=64"]),
    ("train-finetune-gpt2-on-char-data", "train.py",
     lambda r: fresh(r, init_from=str(r / "gpt2-tiny"), n_layer=1, n_embd=16), ["gpt-2 tokenizer", "'char'"]),
    ("sample-other-tokenizer", "sample.py",
     lambda r: [f"--out_dir={r / 'runs' / 'good'}", f"--meta={r / 'data' / 'same_size' / 'meta.json'}"],
     ["same_size", "another vocabulary of the same size"]),
    ("sample-gpt2-with-char-meta", "sample.py",
     lambda r: [f"--init_from={r / 'gpt2-tiny'}", f"--meta={r / 'data' / 'char' / 'meta.json'}", "--device=cpu"],
     ["'char'", "'gpt2'"]),
    ("evaluate-other-tokenizer", "evaluate.py",
     lambda r: [f"--out_dir={r / 'runs' / 'good'}", f"--data_dir={r / 'data' / 'same_size'}"],
     ["same_size", "another vocabulary of the same size"]),
    ("evaluate-id-outside-vocab", "evaluate.py",
     lambda r: [f"--out_dir={r / 'runs' / 'good'}", f"--data_dir={r / 'data' / 'bad_val'}"], ["val.bin", "token id"]),
]


@pytest.mark.parametrize("case_id, entry_point, make_args, needles", CASES, ids=[c[0] for c in CASES])
def test_ids_and_tokenizers_that_do_not_belong_are_one_clear_error(forks, vocab_ws, case_id, entry_point, make_args,
                                                                   needles):
    before = snapshot(vocab_ws)
    proc = forks.run(entry_point, *make_args(vocab_ws))
    print(f"{case_id}: {assert_clean_error(proc, *needles)}")
    after = snapshot(vocab_ws)
    assert {k: v for k, v in after.items() if k in before} == before, "a file of the workspace changed"
    assert not any(p.name == "ckpt.pt" for p in set(after) - set(before)), "a checkpoint was written"
