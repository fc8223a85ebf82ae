"""A disk that fills up or an out_dir that becomes unwritable: a clear error, the previous checkpoint intact.

Real faults where the machine allows them (a tiny tmpfs needs root and mount; chmod needs a non-root
user), and the same faults injected into torch.save in-process everywhere.
"""
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import train
from configurator import TrainConfig
from forge.checkpoint import CheckpointError, load_checkpoint
from tests.reliability.conftest import TINY, cli
from tests.util import assert_clean_error, snapshot


def leftovers(out_dir) -> list:
    return sorted(p.name for p in Path(out_dir).iterdir() if ".tmp" in p.name)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a folder on a tmpfs of that many bytes; skips where this user cannot mount."""
    mounted = []

    def mount(size: int) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a small tmpfs needs root")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture(scope="module")
def checkpoint_size(tmp_path_factory, tiny_char_data) -> int:
    out = tmp_path_factory.mktemp("size") / "out"
    train.main(TrainConfig(**{**TINY, "out_dir": str(out), "data_dir": str(tiny_char_data), "max_iters": 2}))
    return (out / "ckpt.pt").stat().st_size


def test_disk_full_while_saving_is_a_clean_error_and_keeps_the_previous_checkpoint(forks, tmpfs, tiny_char_data,
                                                                                    checkpoint_size):
    """A real full disk: room for one checkpoint and half of the next (the atomic save needs both at once)."""
    out = tmpfs(checkpoint_size * 3 // 2 + 64 * 1024) / "out"
    proc = forks.run("train.py", *cli(out, tiny_char_data, max_iters=8, lr_decay_iters=8))
    error = assert_clean_error(proc, "cannot save the checkpoint", "no space left on device", "previous checkpoint is intact")
    assert str(out) in error
    ckpt = load_checkpoint(out)
    assert ckpt["iter_num"] == 2  # the save at 2 fitted, the one at 4 did not
    assert not leftovers(out)


def test_read_only_out_dir_is_a_clean_error_and_changes_nothing(forks, tmp_path, tmpfs, tiny_char_data):
    """An out_dir that became unwritable between runs (chmod for a normal user; a read-only remount for root,
    whom chmod does not stop)."""
    if os.geteuid() == 0:
        out = tmpfs(8 << 20) / "out"
    else:
        out = tmp_path / "out"
    assert forks.run("train.py", *cli(out, tiny_char_data, max_iters=2)).returncode == 0
    before = snapshot(out)
    if os.geteuid() == 0:
        remount = subprocess.run(["mount", "-o", "remount,ro", str(out.parent)], capture_output=True, text=True)
        assert remount.returncode == 0, remount.stderr
    else:
        out.chmod(0o555)
    try:
        proc = forks.run("train.py", *cli(out, tiny_char_data, max_iters=4, init_from="resume"))
    finally:
        if os.geteuid() != 0:
            out.chmod(0o755)
    assert_clean_error(proc, str(out), "writable")
    assert snapshot(out) == before
    assert load_checkpoint(out)["iter_num"] == 2


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EIO],
                         ids=["ENOSPC", "EACCES", "EROFS", "EIO"])
def test_failing_write_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_char_data, monkeypatch, code):
    """torch.save writes part of the checkpoint, then the OS refuses: CheckpointError naming out_dir and the
    reason; ckpt.pt keeps its bytes; no temporary file remains."""
    out = tmp_path / "out"
    base = {**TINY, "out_dir": str(out), "data_dir": str(tiny_char_data), "max_iters": 4, "lr_decay_iters": 4}
    train.main(TrainConfig(**{**base, "max_iters": 2}))
    before = (out / "ckpt.pt").read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # part of it reached the disk
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError) as excinfo:
        train.main(TrainConfig(**{**base, "init_from": "resume"}))
    message = str(excinfo.value)
    assert str(out) in message and os.strerror(code) in message and "previous checkpoint is intact" in message
    assert "\n" not in message
    assert (out / "ckpt.pt").read_bytes() == before
    assert not leftovers(out)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(out)["iter_num"] == 2


def test_disk_full_when_resuming_is_a_clean_error_and_changes_nothing(forks, tmp_path, tmpfs, tiny_char_data):
    """Resuming rewrites metrics.jsonl (dropping records past the checkpoint) through a temporary copy: on a
    disk without room for that copy, a clean error; the checkpoint and metrics.jsonl as they were."""
    run = tmp_path / "run"
    assert forks.run("train.py", *cli(run, tiny_char_data, max_iters=2)).returncode == 0
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:  # a long run's records
        f.writelines(json.dumps({"iter": 1, "loss": 3.0, "note": "x" * 40}) + "\n" for _ in range(3000))
    used = sum(p.stat().st_size for p in run.iterdir())
    out = shutil.copytree(run, tmpfs(used + 32 * 1024) / "run")
    before = snapshot(out)
    proc = forks.run("train.py", *cli(out, tiny_char_data, max_iters=4, init_from="resume"))
    assert_clean_error(proc, "metrics.jsonl", "no space left on device")
    after = snapshot(out)
    assert after.pop(Path("train_config.json")) and before.pop(Path("train_config.json"))  # rewritten at each start, by design
    assert after == before  # the checkpoint and every metrics record


class FillingFile:
    """A text file on a disk that fills up after `room` more writes: flush (and close) fail with ENOSPC."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, text):
        self.room -= 1
        return self.file.write(text)

    def flush(self):
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.file.flush()

    def close(self):
        self.file.close()
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_filling_up_while_logging_is_a_clean_error(tmp_path, tiny_char_data, monkeypatch):
    """metrics.jsonl's append fails mid-run: UserError naming the file (no traceback from close() either),
    the checkpoint saved before is intact."""
    import forge.metrics
    from forge.errors import UserError

    out = tmp_path / "out"
    base = {**TINY, "out_dir": str(out), "data_dir": str(tiny_char_data), "max_iters": 8, "lr_decay_iters": 8}
    train.main(TrainConfig(**{**base, "max_iters": 2}))
    good = (out / "ckpt.pt").read_bytes()
    monkeypatch.setattr(forge.metrics, "open", lambda *a, **k: FillingFile(open(*a, **k), room=3), raising=False)
    with pytest.raises(UserError, match="cannot write .*metrics.jsonl: No space left on device"):
        train.main(TrainConfig(**{**base, "init_from": "resume"}))
    assert (out / "ckpt.pt").read_bytes() == good
