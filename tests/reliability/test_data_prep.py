"""Data preparation interrupted: kill -9 at seeded random moments, and a crash at every point of the commit.

Invariant: a data folder either loads as complete with exactly the bytes of an uninterrupted run, or
refuses to load (DataError saying to re-run the prepare script); rerunning always finishes it.
"""
import errno
import json
import os
import random
import signal
import time

import numpy as np
import pytest

import forge.io
import forge.tokenize
from forge.data import load_meta, open_split
from forge.tokenize import DataError, PreparedFolder
from tests.util import assert_clean_error, snapshot

OUTPUTS = ("train.bin", "val.bin", "meta.json")
MIN_KILLS = 8  # per script, more until one has landed while the bins were being written
KILL_SEED = 3
CORPUS_CHARS = 1_115_394  # Tiny Shakespeare's size (generated text of that size without ../shared)


def outputs(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in OUTPUTS if (folder / name).exists()}


def assert_complete_or_refused(folder, expected: dict) -> bool:
    """A folder with a meta.json is complete and holds the expected bytes; any other refuses to load.
    Returns whether it was complete."""
    if (folder / "meta.json").exists():
        assert outputs(folder) == expected, "a folder that looks complete holds other bytes"
        return True
    for split in ("train", "val"):
        with pytest.raises(DataError):
            open_split(folder, split)
    return False


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_text):
    """Tiny Shakespeare (or generated text) in four files: about a second of GPT-2 tokenizing on two processes."""
    folder = tmp_path_factory.mktemp("corpus")
    text = (shakespeare_text * (1 + CORPUS_CHARS // len(shakespeare_text)))[:CORPUS_CHARS]  # same size everywhere
    quarter = len(text) // 4
    for i in range(4):
        (folder / f"part{i}.txt").write_text(text[i * quarter:(i + 1) * quarter], encoding="utf-8")
    (folder / "all.txt").write_text(text * 4, encoding="utf-8")  # one input for shakespeare_char
    return folder


SCRIPTS = {
    "text": lambda corpus, out: ["data/text/prepare.py", *sorted(corpus.glob("part*.txt")), "--out_dir", out, "--tokenizer", "gpt2",
                                 "--num_proc", "2", "--force"],
    "shakespeare_char": lambda corpus, out: ["data/shakespeare_char/prepare.py", "--input", corpus / "all.txt",
                                             "--out_dir", out, "--force"],
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_prepare_killed_at_random_moments_never_leaves_a_complete_looking_folder(forks, tmp_path, corpus, script,
                                                                                  request):
    if script == "text":
        request.getfixturevalue("gpt2_encoding")  # skips where the GPT-2 BPE is neither cached nor downloadable
    reference = tmp_path / "reference"
    started = time.monotonic()
    done = forks.run(*SCRIPTS[script](corpus, reference))
    duration = time.monotonic() - started  # kills land between 0 and 1.1 times this after the start
    assert done.returncode == 0, done.stderr
    expected = outputs(reference)
    assert set(expected) == set(OUTPUTS)

    rng = random.Random(KILL_SEED)
    out = tmp_path / "out"
    complete_seen = midway = 0
    attempt = 0
    while attempt < MIN_KILLS or (midway == 0 and attempt < 4 * MIN_KILLS):
        if attempt == MIN_KILLS // 2:  # from here on, re-prepare over a complete folder
            finished = forks.run(*SCRIPTS[script](corpus, out))
            assert finished.returncode == 0, finished.stderr
            assert outputs(out) == expected
        child = forks.start(*SCRIPTS[script](corpus, out))
        time.sleep(rng.uniform(0.0, 1.1) * duration)
        forks.kill(child)  # the whole process group: the tokenizer workers too
        code = forks.wait(child, 60)
        assert code in (0, -signal.SIGKILL), child.stderr()
        midway += bool(list(out.glob("*.tmp")))  # killed while writing
        complete_seen += assert_complete_or_refused(out, expected)
        attempt += 1
    finished = forks.run(*SCRIPTS[script](corpus, out))
    assert finished.returncode == 0, finished.stderr
    assert outputs(out) == expected
    assert not list(out.glob("*.tmp")), "temporary files left after a finished run"
    print(f"{script}: {attempt} kills, {midway} while writing, {complete_seen} left a complete folder")
    assert midway >= 1, "no kill landed while the bins were being written"


class Crash(BaseException):
    """Stands for kill -9: nothing after it runs (PreparedFolder.__exit__ is never called)."""


def _char_folder_contents(text: str):
    itos = sorted(set(text))
    ids = np.array([itos.index(c) for c in text], dtype="<u2")
    n = len(ids) * 9 // 10
    max_ids = {"train": int(ids[:n].max()), "val": int(ids[n:].max())}  # what commit records
    return ids[:n].tobytes(), ids[n:].tobytes(), {**forge.tokenize.char_meta(itos), "max_token_ids": max_ids}


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "over_complete_folder"])
def test_commit_crashing_at_every_point_never_looks_complete(tmp_path, monkeypatch, existing):
    """A crash before or after each rename of PreparedFolder.commit: the folder is old-and-complete,
    new-and-complete, or refuses to load; never a mix that loads."""
    new_train, new_val, new_meta = _char_folder_contents("to be or not to be, that is the question\n" * 40)
    old_train, old_val, old_meta = _char_folder_contents("all the world's a stage\n" * 40)
    new = {"train.bin": new_train, "val.bin": new_val}
    old = {"train.bin": old_train, "val.bin": old_val}
    real_replace = forge.tokenize.os.replace
    crash_points = 0
    for crash_after in range(10):
        out = tmp_path / f"crash{crash_after}"
        if existing:
            out.mkdir()
            for name, data in old.items():
                (out / name).write_bytes(data)
            (out / "meta.json").write_text(json.dumps(old_meta))
        calls = []

        def replace(src, dst):
            if len(calls) == crash_after:
                raise Crash
            calls.append(dst)
            real_replace(src, dst)

        monkeypatch.setattr(forge.tokenize.os, "replace", replace)
        folder = PreparedFolder(out, force=True).__enter__()
        for name, data in new.items():
            folder.temp(name).write_bytes(data)
        try:
            folder.commit(new_meta)
            crashed = False
        except Crash:
            crashed = True
        monkeypatch.setattr(forge.tokenize.os, "replace", real_replace)
        if (out / "meta.json").exists():
            meta = json.loads((out / "meta.json").read_text())
            contents = {name: (out / name).read_bytes() for name in new}
            assert (meta, contents) in ((new_meta, new), (old_meta, old)), f"crash after {crash_after} renames: a mix"
        else:
            for split in ("train", "val"):
                with pytest.raises(DataError, match="interrupted|not found|re-run|prepare"):
                    open_split(out, split)
        if not crashed:
            break
        crash_points += 1
    assert crash_points >= 3  # the bins' renames and meta.json's


class Faults:
    """Make the n-th file-system operation of a data folder's preparation fail with an OSError, in process:
    opening a file for writing, writing to it, fsync, rename, truncate."""

    def __init__(self, monkeypatch, fail_at: int, error: int):
        self.count, self.fail_at, self.error, self.failed = 0, fail_at, error, False
        real_open, real_replace, real_fsync = open, os.replace, os.fsync
        faults = self

        class File:
            def __init__(self, f):
                self._f = f

            def write(self, data):
                faults.step("write")
                return self._f.write(data)

            def truncate(self, size):
                faults.step("truncate")
                return self._f.truncate(size)

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

        def fake_open(path, mode="r", *args, **kwargs):
            if any(c in mode for c in "wa+"):
                faults.step(f"open {path}")
                return File(real_open(path, mode, *args, **kwargs))
            return real_open(path, mode, *args, **kwargs)

        def replace(src, dst):
            faults.step(f"rename {dst}")
            return real_replace(src, dst)

        def fsync(fd):
            faults.step("fsync")
            return real_fsync(fd)

        for module in (forge.tokenize, forge.io):
            monkeypatch.setattr(module, "open", fake_open, raising=False)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "fsync", fsync)

    def step(self, what: str) -> None:
        if self.count == self.fail_at:
            self.failed = True
            self.count += 1
            raise OSError(self.error, os.strerror(self.error), what)
        self.count += 1


def _write_folder(folder, contents: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        (folder / name).write_bytes(data)


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EIO],
                         ids=["ENOSPC", "EROFS", "EACCES", "EIO"])
def test_a_failing_disk_at_every_write_and_rename_leaves_the_old_dataset_or_one_that_refuses(tmp_path, monkeypatch,
                                                                                           error):
    """Re-preparing (--force) over a complete folder while the disk fails at the n-th operation, for every n:
    one DataError naming the reason, and the folder loads as the old dataset or refuses to load; it never
    loads as anything else (new bins with the old meta.json, one new bin and one old). Then a rerun works."""
    old_text, new_text = "all the world's a stage\n" * 60, "to be or not to be, that is the question\n" * 50
    old_train, old_val, old_meta = _char_folder_contents(old_text)
    new_meta = forge.tokenize.char_meta(sorted(set(new_text)))
    old = {"train.bin": old_train, "val.bin": old_val, "meta.json": json.dumps(old_meta).encode()}
    reference = tmp_path / "reference"
    forge.tokenize.write_text_split(new_text, reference, new_meta)
    new = outputs(reference)
    outcomes = set()
    for fail_at in range(100):
        out = tmp_path / f"fail{fail_at}"
        _write_folder(out, old)
        with monkeypatch.context() as patch:
            faults = Faults(patch, fail_at, error)
            try:
                forge.tokenize.write_text_split(new_text, out, new_meta, force=True)
            except DataError as exc:
                assert os.strerror(error) in str(exc) and str(out) in str(exc) and "\n" not in str(exc)
        if not faults.failed:
            assert outputs(out) == new
            break
        if (out / "meta.json").exists():
            loaded = outputs(out)
            assert loaded in (old, new), f"failure at operation {fail_at}: the folder loads as a mix"
            assert load_meta(out) in (old_meta, load_meta(reference))  # the reference records max_token_ids
            outcomes.add("old" if loaded == old else "new")
        else:
            with pytest.raises(DataError, match="interrupted"):
                load_meta(out)
            for split in ("train", "val"):
                with pytest.raises(DataError, match="interrupted"):
                    open_split(out, split)
            outcomes.add("refused")
        forge.tokenize.write_text_split(new_text, out, new_meta, force=True)  # the disk is back: a rerun finishes
        assert outputs(out) == new
    assert faults.count > 10 and not faults.failed, "every operation was failed once"
    assert {"old", "refused"} <= outcomes


def test_a_complete_dataset_is_replaced_only_with_force(forks, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("some notes to train on\n" * 100)
    out = tmp_path / "data"
    assert forks.run("data/text/prepare.py", text, "--tokenizer", "char", "--out_dir", out).returncode == 0
    before = snapshot(out)
    text.write_text("other words entirely\n" * 100)
    refused = forks.run("data/text/prepare.py", text, "--tokenizer", "char", "--out_dir", out)
    assert_clean_error(refused, str(out), "--force")
    assert snapshot(out) == before
    # a fixed dataset's script says it is prepared and exits 0 (so `make run` can run it every time)
    char = forks.run("data/shakespeare_char/prepare.py", "--input", text, "--out_dir", out)
    assert char.returncode == 0 and "already prepared" in char.stdout and snapshot(out) == before
    assert forks.run("data/text/prepare.py", text, "--tokenizer", "char", "--out_dir", out, "--force").returncode == 0
    assert snapshot(out) != before
