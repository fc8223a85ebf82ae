"""One writer per run folder and per data folder, with real processes: a second writer is refused with one
line while the first lives, and the lock never outlives its holder (kill -9 included)."""
import errno
import re
import subprocess
import sys

import pytest

import forge.io
from forge.errors import UserError
from forge.io import LOCK_NAME, FolderLock
from tests.conftest import make_char_dataset
from tests.reliability.conftest import cli, wait_for
from tests.util import REPO, assert_clean_error, snapshot

HOLD = """
import sys, time
from forge.io import lock_folder
lock_folder(sys.argv[1], sys.argv[2])
print("locked", flush=True)
time.sleep(600)
"""


def hold_lock(folder, role="data preparation") -> subprocess.Popen:
    """Another process holding folder's writer lock, as a live train.py or prepare.py does."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), role], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def kill_9(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


def test_second_training_run_on_a_live_out_dir_is_refused_whatever_init_from(forks, tmp_path, shakespeare_text):
    data = make_char_dataset(tmp_path / "data", shakespeare_text[:20_000])
    out = tmp_path / "run"
    first = forks.start("train.py", *cli(out, data, max_iters=100_000, lr_decay_iters=100_000, eval_interval=1000))
    try:
        assert wait_for(lambda: re.search(r"^iter \d+", first.stdout(), re.MULTILINE), timeout=120), first.stderr()
        for init_from in ("scratch", "auto", "resume"):
            second = forks.run("train.py", *cli(out, data, max_iters=4, init_from=init_from))
            line = assert_clean_error(second, str(out), "in use", "training run")
            assert f"pid {first.pid}" in line
        assert forks.wait(first, 0) is None, "the first run must go on"
    finally:
        forks.kill(first)  # kill -9: the kernel releases its lock
        forks.wait(first)
    # the lock was not left stuck: the next run takes the folder over (and cleans its lock file up at the end)
    (out / "ckpt.pt").unlink(missing_ok=True)
    before = snapshot(out)
    done = forks.run("train.py", *cli(out, data, max_iters=2, lr_decay_iters=2, init_from="auto"))
    assert done.returncode == 0, done.stderr
    assert not (out / LOCK_NAME).exists() and snapshot(out) != before


def test_eval_only_and_sampling_do_not_take_the_lock(forks, tmp_path, shakespeare_text):
    """Reading a live run is allowed: only writers are exclusive."""
    data = make_char_dataset(tmp_path / "data", shakespeare_text[:20_000])
    out = tmp_path / "run"
    assert forks.run("train.py", *cli(out, data, max_iters=2, lr_decay_iters=2)).returncode == 0
    holder = hold_lock(out, "training run")
    try:
        assert forks.run("train.py", *cli(out, data, init_from="resume", eval_only=True)).returncode == 0
        assert forks.run("sample.py", f"--out_dir={out}", "--max_new_tokens=5", "--num_samples=1",
                         "--device=cpu").returncode == 0
    finally:
        kill_9(holder)


@pytest.mark.parametrize("script", ["data/text/prepare.py", "data/shakespeare_char/prepare.py"])
def test_second_preparation_of_a_live_data_folder_is_refused(forks, tmp_path, script):
    text = tmp_path / "input.txt"
    text.write_text("to be or not to be\n" * 200)
    out = tmp_path / "data"
    args = [text, "--tokenizer", "char"] if script == "data/text/prepare.py" else ["--input", text]
    args += ["--out_dir", out, "--force"]
    holder = hold_lock(out)
    try:
        before = snapshot(out)
        assert_clean_error(forks.run(script, *args), str(out), "in use", "data preparation")
        assert snapshot(out) == before
    finally:
        kill_9(holder)
    assert (out / LOCK_NAME).exists()  # left by the killed holder, unlocked: it must not block the next writer
    done = forks.run(script, *args)
    assert done.returncode == 0, done.stderr
    assert (out / "meta.json").is_file() and not (out / LOCK_NAME).exists()


def test_lock_in_process(tmp_path):
    """The lock's own rules: exclusive within a process too, released on exit of the with-block, no trace left
    in a folder it created when nothing was written."""
    folder = tmp_path / "a" / "b"
    with FolderLock(folder, "training run"):
        assert (folder / LOCK_NAME).read_text().startswith("training run (pid ")
        with pytest.raises(UserError, match="in use by another training run"):
            FolderLock(folder, "training run").acquire()
    assert not (tmp_path / "a").exists()
    with FolderLock(folder, "training run"):
        (folder / "ckpt.pt").write_bytes(b"x")
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt.pt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        FolderLock(tmp_path / "file", "training run").acquire()
    with pytest.raises(UserError, match="empty path"):
        FolderLock("", "training run").acquire()


def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    """Lustre without flock, some NFS: the lock cannot be had; say so in one line, do not refuse to train."""
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(forge.io.fcntl, "flock", no_locks)
    with FolderLock(tmp_path / "run", "training run"):
        pass
    assert not (tmp_path / "run").exists(), "nothing left behind"
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("warning: cannot lock") and "No locks available" in warning
    assert len(warning.splitlines()) == 1
