"""forge/io.py: the one helper for atomic files and folders, and quoting exceptions."""
import errno
import os

import pytest

from forge.io import atomic_write, first_line, replacing_folder


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")

    def half_then_full_disk(f):
        f.write(b"ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, half_then_full_disk)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["ckpt.pt"]
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_replacing_folder_is_all_or_nothing(tmp_path):
    dest = tmp_path / "export"
    with replacing_folder(dest) as folder:
        (folder / "config.json").write_text("{}")
    assert sorted(os.listdir(dest)) == ["config.json"]
    assert oct(dest.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    with pytest.raises(RuntimeError):
        with replacing_folder(dest) as folder:
            (folder / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(dest)) == ["config.json"] and os.listdir(tmp_path) == ["export"]
    with replacing_folder(dest) as folder:
        (folder / "model.safetensors").write_bytes(b"whole")
    assert sorted(os.listdir(dest)) == ["model.safetensors"] and os.listdir(tmp_path) == ["export"]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_first_line():
    assert first_line(ValueError("\n  bad value\nsecond line")) == "bad value"
    assert first_line(KeyError()) == "KeyError"
    assert len(first_line(OSError("x" * 500))) == 200
