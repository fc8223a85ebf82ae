"""LoRA and prompt/response data: each bad setting is one clear `error:` line, and nothing is written."""
import json

import pytest

from tests.conftest import make_char_dataset
from tests.reliability.conftest import cli
from tests.util import assert_clean_error, snapshot

# (train.py overrides, words the error line must name); every run is a tiny model trained from scratch
TRAIN_CASES = {
    "rank 0": ({"lora_rank": 0}, ["lora_rank=0", "at least 1"]),
    "rank above the matrix": ({"lora_rank": 33}, ["lora_rank=33", "transformer.h.0.attn.c_attn", "32"]),
    "bigram": ({"model_type": "bigram"}, ["finetune=lora", "BigramLanguageModel"]),
    "tied head": ({"lora_targets": "c_attn,lm_head"}, ["lm_head", "tied"]),
    "unknown target": ({"lora_targets": "c_attn,q_proj"}, ["lora_targets", "q_proj"]),
    "muon": ({"optimizer": "muon"}, ["finetune=lora", "muon"]),
    "negative alpha": ({"lora_alpha": -1.0}, ["lora_alpha=-1.0"]),
}
PREPARE_CASES = {
    "missing response": ({"prompt": "Q"}, [], ["qa.jsonl:2", "'response'", "--response_field"]),
    "missing custom prompt field": ({"question": "Q", "answer": "A"}, ["--prompt_field", "instruction",
                                                                      "--response_field", "answer"],
                                    ["qa.jsonl:2", "'instruction'"]),
    "response not a string": ({"prompt": "Q", "response": 3}, [], ["qa.jsonl:2", "'response'"]),
    "a .txt file": ({"prompt": "Q", "response": "A"}, ["--txt"], ["notes.txt", ".jsonl"]),
}


@pytest.mark.parametrize("case", [*TRAIN_CASES, *PREPARE_CASES])
def test_bad_lora_or_pair_input_is_one_clear_error_and_changes_nothing(case, forks, tmp_path, shakespeare_text):
    data = make_char_dataset(tmp_path / "data", shakespeare_text[:5000])
    jsonl = tmp_path / "qa.jsonl"
    if case in TRAIN_CASES:
        overrides, needles = TRAIN_CASES[case]
        args = ["train.py", *cli(tmp_path / "out", data, finetune="lora", max_iters=2, **overrides)]
    else:
        row, options, needles = PREPARE_CASES[case]
        jsonl.write_text(json.dumps({"prompt": "Q", "response": "A", "instruction": "I", "answer": "A"}) + "\n" +
                         json.dumps(row) + "\n", encoding="utf-8")
        if options == ["--txt"]:  # a plain text file has no pairs
            jsonl, options = tmp_path / "notes.txt", []
            jsonl.write_text("just text\n", encoding="utf-8")
        args = ["data/text/prepare.py", jsonl, "--format", "prompt_response", "--tokenizer", "char",
                "--out_dir", tmp_path / "pairs", *options]
    before = snapshot(tmp_path)
    assert_clean_error(forks.run(*map(str, args)), *needles)
    assert snapshot(tmp_path) == before
