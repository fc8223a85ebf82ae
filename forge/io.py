"""Files written whole or not at all, folders with one writer, checked downloads, one-line reasons.

Every file the project writes for a user goes through here: checkpoints, metrics, configs, data
folders' metadata and downloads. Imports only the standard library (the prepare scripts use it
without torch).

- atomic_write(path, write) / write_bytes_atomic(path, data): a temporary file in the same folder,
  fsynced, renamed over `path`, then the folder fsynced: a crash at any moment leaves the old file
  or the new one, never a torn one.
- fsync_dir(path): make a rename durable.
- replacing_folder(dest): fill a new folder that replaces dest whole, or not at all (exports).
- FolderLock / lock_folder(folder, role): one writer per run or data folder. fcntl.flock on a lock
  file held open for the writer's lifetime: the kernel releases it when the process dies, even by
  kill -9, so it can never be left stuck.
- download(url, path, ...): length and SHA-256 checked, retried with backoff, written atomically.
- first_line(exc): the first line of an exception's message, for one-line errors.
"""
import errno
import hashlib
import http.client
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from forge.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here
    fcntl = None

LOCK_NAME = ".gptforge.lock"
# fsync of a folder is not supported everywhere (some network and FUSE filesystems): the rename is still atomic
_FSYNC_DIR_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM)
# flock is refused by filesystems without lock support (Lustre mounted without flock, some NFS setups, FUSE)
_NO_LOCKS = (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of str(exc) (its class name if there is none), at most `limit` characters."""
    line = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return line[:limit]


def os_reason(exc: OSError) -> str:
    """'No space left on device' rather than '[Errno 28] No space left on device: /x/y'."""
    return exc.strerror or first_line(exc)


# ----------------------------------------------------------------------------- atomic files

def fsync_dir(path) -> None:
    """Flush a folder's entries (renames, new files) to disk. Where a folder cannot be opened (Windows)
    or fsynced (some filesystems) this does nothing; an I/O error propagates."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FSYNC_DIR_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def fsync_file(f) -> None:
    """Flush a file object written in binary mode all the way to disk."""
    f.flush()
    os.fsync(f.fileno())


def temp_path(path) -> Path:
    """Where atomic_write writes `path` before renaming it: a hidden name with this process's id."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def atomic_write(path, write) -> None:
    """Create or replace `path` with what write(binary_file) writes: all of it or nothing.

    OSError (disk full, read-only or unwritable folder) propagates after the temporary file is
    removed, and the previous `path` is untouched. Temporary files of writers that were killed are
    removed first (they can be as large as a checkpoint).
    """
    path = Path(path)
    tmp = temp_path(path)
    for stale in path.parent.glob(f".{path.name}.tmp.*"):
        try:
            stale.unlink()
        except OSError:
            pass
    try:
        with open(tmp, "wb") as f:
            write(f)
            fsync_file(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


@contextmanager
def replacing_folder(dest):
    """Write a whole folder or nothing: yields a new empty folder next to `dest` to fill; when the block
    ends without error, its files are made durable and it takes dest's place (an existing dest is
    moved aside, then removed); on an error it is removed and dest is untouched. The folder gets the
    permissions of a plain mkdir (not mkdtemp's 0700)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rename(dest, old / dest.name)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- one writer per folder

class FolderLock:
    """An exclusive lock on `folder` held by this process until release() or its death.

    The lock file (LOCK_NAME in the folder, holding the owner's pid, host and role) is removed on
    release, and the folder too if this lock created it and it is still empty, so a run that failed
    before writing anything leaves nothing behind. A process killed by -9 leaves the file, unlocked:
    the next writer takes it over.
    """

    def __init__(self, folder, role: str):
        self.empty = str(folder).strip() == ""  # Path("") would be the current folder
        self.folder, self.role = Path(folder), role
        self.path = self.folder / LOCK_NAME
        self._fd = None
        self._created = []  # the folders acquire() created, deepest first

    def acquire(self) -> "FolderLock":
        if self.empty:
            raise UserError(f"the {self.role} folder is an empty path; name a folder")
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"{self.folder} is a file, not a folder: choose another path for the {self.role}")
        try:
            self._created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the {self.role} folder {self.folder}: {os_reason(exc)}; "
                            "choose a writable path") from None
        if fcntl is None:
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                self._undo_mkdir()
                raise UserError(f"cannot write in the {self.role} folder {self.folder}: {os_reason(exc)}; "
                                "choose a writable path") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                self._undo_mkdir()
                raise UserError(f"{self.folder} is in use by another {owner or 'process'}: only one process "
                                f"may write a folder at a time; wait for it to finish, or choose another "
                                f"folder for this {self.role}") from None
            except OSError as exc:
                os.close(fd)
                try:
                    self.path.unlink(missing_ok=True)
                except OSError:
                    pass
                if exc.errno not in _NO_LOCKS:
                    self._undo_mkdir()
                    raise UserError(f"cannot lock the {self.role} folder {self.folder}: {os_reason(exc)}") from None
                print(f"warning: cannot lock {self.folder} ({os_reason(exc)}): this filesystem has no file locks, "
                      f"so nothing stops a second process from writing it at the same time", file=sys.stderr,
                      flush=True)
                return self
            try:  # the file may have been removed by the previous owner between our open and flock: retry
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd = fd
        try:  # who holds it, for the refusal message of a second writer: a courtesy (a full disk may refuse it)
            os.ftruncate(fd, 0)
            os.write(fd, f"{self.role} (pid {os.getpid()} on {socket.gethostname()})\n".encode())
        except OSError:
            pass
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                self.path.unlink(missing_ok=True)  # while still locked: nobody else holds this file
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        self._undo_mkdir()

    def _undo_mkdir(self) -> None:
        created, self._created = self._created, []
        for folder in created:
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                return

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()
        return False


def _read_owner(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def lock_folder(folder, role: str) -> FolderLock:
    """FolderLock(folder, role), acquired: a UserError if another live process holds it."""
    return FolderLock(folder, role).acquire()


# ----------------------------------------------------------------------------- downloads

def download(url: str, path, *, sha256: str | None = None, size: int | None = None, hint: str = "",
             error: type = UserError, retries: int = 3, backoff_s: float = 2.0, timeout_s: float = 60.0,
             progress: bool = True) -> Path:
    """Fetch url to `path` atomically. The length is checked against `size` or the Content-Length, the
    SHA-256 against `sha256` when given; a network failure or a short read is retried `retries` times
    with exponential backoff. `error` (the caller's UserError class; the message
    ends with `hint`, what to do instead) if it never succeeds; a damaged download is not retried.
    Nothing is written unless the whole file is good."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise error(f"cannot create {path.parent} for the download of {url}: {os_reason(exc)}") from None
    for attempt in range(retries + 1):
        try:
            data = _fetch(url, path.name, timeout_s, progress)
            break
        except (OSError, http.client.HTTPException) as exc:
            reason = first_line(exc)
            permanent = (isinstance(exc, urllib.error.HTTPError) and 400 <= exc.code < 500 and exc.code != 429) or \
                isinstance(getattr(exc, "reason", None), FileNotFoundError)  # a file:// URL that does not exist
            if attempt == retries or permanent:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise error(f"could not download {url}{tries} ({reason}); {hint or 'check the network'}") from None
            wait = backoff_s * 2 ** attempt
            print(f"download of {url} failed ({reason}); retrying in {wait:.0f} s", file=sys.stderr, flush=True)
            time.sleep(wait)
    digest = hashlib.sha256(data).hexdigest()
    if (size is not None and len(data) != size) or (sha256 and digest != sha256):
        expected = f"{size:,} bytes" if size is not None else ""
        expected += f"{', ' if expected else ''}SHA-256 {sha256[:12]}..." if sha256 else ""
        raise error(f"the download of {url} is damaged ({len(data):,} bytes, SHA-256 {digest[:12]}..., "
                            f"expected {expected}); nothing was written: try again"
                            f"{', or ' + hint if hint else ''}")
    try:
        write_bytes_atomic(path, data)
    except OSError as exc:
        raise error(f"cannot save the download of {url} to {path}: {os_reason(exc)}") from None
    return path


def _fetch(url: str, name: str, timeout_s: float, progress: bool) -> bytes:
    """The body of url; OSError when fewer bytes than its Content-Length arrive (urllib does not check)."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        parts = []
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}", disable=not progress,
                  delay=1.0) as bar:
            while chunk := response.read(1 << 20):
                parts.append(chunk)
                bar.update(len(chunk))
    data = b"".join(parts)
    if total is not None and len(data) != total:
        raise OSError(f"the connection closed after {len(data):,} of {total:,} bytes")
    return data
