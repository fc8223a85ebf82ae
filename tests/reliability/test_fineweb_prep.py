"""data/fineweb/prepare.py killed mid-stream and rerun, and the Hugging Face Hub out of reach."""
import json
import signal
import socket

import pytest

from forge.data import open_split
from forge.tokenize import DataError
from tests.reliability.conftest import wait_for
from tests.util import assert_clean_error, snapshot

pytest.importorskip("datasets")

OUTPUTS = ("train.bin", "val.bin", "meta.json")


def outputs(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in OUTPUTS if (folder / name).exists()}


def test_killed_while_streaming_then_rerun_equals_uninterrupted(forks, tmp_path, shakespeare_text, gpt2_encoding):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):  # ~1.5M characters: a few seconds of tokenizing after the val split
        with open(shards / f"{i:03d}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": shakespeare_text[j:j + 5000]}) + "\n"
                         for j in range(0, min(len(shakespeare_text), 500_000), 5000))
    args = ["data/fineweb/prepare.py", "--input", shards, "--val_documents", "20", "--num_proc", "2"]
    reference = tmp_path / "reference"
    done = forks.run(*args, "--out_dir", reference)
    assert done.returncode == 0, done.stderr
    expected = outputs(reference)

    out = tmp_path / "out"
    child = forks.start(*args, "--out_dir", out)
    assert wait_for(lambda: (out / "train.bin.tmp").exists(), timeout=120), child.stderr()  # val done, train going
    forks.kill(child)  # kill -9 of the process group: the tokenizer workers too
    assert forks.wait(child, 60) == -signal.SIGKILL, "the run finished before the kill: use a bigger corpus"
    assert not (out / "meta.json").exists() and list(out.glob("*.tmp"))
    for split in ("train", "val"):
        with pytest.raises(DataError, match="interrupted"):
            open_split(out, split)

    again = forks.run(*args, "--out_dir", out)
    assert again.returncode == 0, again.stderr
    assert outputs(out) == expected and not list(out.glob("*.tmp"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.mark.parametrize("hub", ["closed_port", "offline"])
def test_hub_out_of_reach_is_one_clear_line(forks, tmp_path, hub):
    env = {"HF_HOME": str(tmp_path / "hf_home")}  # no cached copy of the dataset's metadata to fall back on
    env.update({"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"} if hub == "closed_port" else
               {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    out = tmp_path / "data"
    before = snapshot(tmp_path)
    proc = forks.run("data/fineweb/prepare.py", "--out_dir", out, env=env)
    assert_clean_error(proc, "HuggingFaceFW/fineweb-edu", "--input")
    assert not out.exists() and snapshot(tmp_path) == before
