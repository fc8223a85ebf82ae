"""A run folder holds the user's files too: keep_last deletes only the ckpt-<iter>.pt copies it writes, the
run's config never overwrites another tool's config.json, and an empty out_dir is not the current folder."""
import json

from forge.checkpoint import numbered_checkpoints
from forge.metrics import CONFIG_NAME
from tests.reliability.conftest import cli


def test_keep_last_deletes_only_its_own_numbered_checkpoints(forks, tmp_path, tiny_char_data):
    out = tmp_path / "run"
    first = forks.run("train.py", *cli(out, tiny_char_data, max_iters=2, lr_decay_iters=8, keep_last=2))
    assert first.returncode == 0, first.stderr
    # the user's files, numbered ones included (an older run's, or one copied in by hand: not keep_last's)
    mine = {"ckpt-best.pt": b"the user's best", "ckpt-foo.pt": b"foo", "ckpt-1-old.pt": b"old", "ckpt-.pt": b"x",
            "ckpt-00.pt.bak": b"bak", "ckpt-1.pt": b"an older run's", "ckpt-4.pt": b"copied by hand"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    done = forks.run("train.py", *cli(out, tiny_char_data, max_iters=8, lr_decay_iters=8, keep_last=2,
                                      init_from="resume"))
    assert done.returncode == 0, done.stderr
    assert [p.name for p in numbered_checkpoints(out)] == ["ckpt-1.pt", "ckpt-4.pt", "ckpt-6.pt", "ckpt-8.pt"]
    assert "ckpt-4.pt was not written by keep_last" in done.stderr  # and not overwritten at iter 4
    for name, data in mine.items():
        assert (out / name).read_bytes() == data, f"{name} was touched"


def test_out_dir_that_is_a_hugging_face_folder_keeps_its_config_json(forks, tmp_path, tiny_char_data):
    out = tmp_path / "hf-gpt2"
    out.mkdir()
    hf_config = json.dumps({"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024}).encode()
    (out / "config.json").write_bytes(hf_config)
    done = forks.run("train.py", *cli(out, tiny_char_data, max_iters=2, lr_decay_iters=2))
    assert done.returncode == 0, done.stderr
    assert (out / "config.json").read_bytes() == hf_config
    assert json.loads((out / CONFIG_NAME).read_text())["config"]["max_iters"] == 2
