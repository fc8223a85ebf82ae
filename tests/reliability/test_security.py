"""No code path unpickles untrusted data or executes anything but config files; downloads are verified and atomic.

The scan reads the source (not the tests) with `ast`, so a new `torch.load(...)` without
weights_only=True, a `pickle.load`, an `eval`/`exec` or an `np.load(allow_pickle=True)` fails CI.
"""
import ast
import hashlib
import http.client
import pickle
import urllib.error
from pathlib import Path

import pytest

import forge.hellaswag
import forge.io
import forge.tokenize
from forge.data import load_meta
from forge.hellaswag import HellaSwagError
from forge.tokenize import TINY_SHAKESPEARE_URL, DataError, local_or_downloaded_text
from tests.reliability.test_bad_inputs import MakesMarker
from tests.util import REPO, SHARED

# calls that unpickle (or otherwise run code from data) whatever their arguments
FORBIDDEN_CALLS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "dill.load",
                   "dill.loads", "joblib.load", "shelve.open", "marshal.load", "marshal.loads", "torch.jit.load",
                   "pandas.read_pickle", "cloudpickle.load", "cloudpickle.loads"}
# exec/eval are allowed in exactly one place: the configurator running a config file (documented as code)
CODE_EXECUTION_ALLOWED = {("configurator.py", "read_config_file", "exec")}


def source_files() -> list:
    skip = {".venv", ".git", "tests", "build", "__pycache__", "wandb"}
    return sorted(p for p in REPO.rglob("*.py")
                  if not any(part in skip or part.startswith(".") for part in p.relative_to(REPO).parts[:-1]))


def unsafe_calls(source: str, filename: str) -> list:
    """'file:line: what' for every unsafe load or code execution in `source`."""
    tree = ast.parse(source, filename)
    aliases = {}  # local name -> dotted name it was imported as
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(node):
        if isinstance(node, ast.Name):
            return aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def keyword(call, name):
        return next((k.value for k in call.keywords if k.arg == name), None)

    found = []

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.ClassDef):
            bases = {dotted(b) for b in node.bases}
            methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
            if bases & {"pickle.Unpickler", "_pickle.Unpickler"} and "find_class" not in methods:
                found.append(f"{filename}:{node.lineno}: Unpickler subclass without a restrictive find_class")
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            where = f"{filename}:{node.lineno}"
            if name in FORBIDDEN_CALLS:
                found.append(f"{where}: {name}() unpickles untrusted data")
            elif name == "torch.load":
                flag = keyword(node, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
            elif name in ("numpy.load", "np.load"):
                flag = keyword(node, "allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    found.append(f"{where}: numpy.load with allow_pickle")
            elif name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                kind = name.rsplit(".", 1)[-1]
                if (Path(filename).name, function, kind) not in CODE_EXECUTION_ALLOWED:
                    found.append(f"{where}: {kind}() outside the configurator's config-file execution")
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


def test_no_code_path_loads_untrusted_data_unsafely():
    files = source_files()
    names = {str(p.relative_to(REPO)) for p in files}
    assert {"train.py", "configurator.py", "forge/checkpoint.py", "forge/data.py", "model.py"} <= names
    problems = [problem for path in files
                for problem in unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert problems == [], "unsafe loading or code execution:\n" + "\n".join(problems)


def test_the_scan_catches_each_unsafe_pattern():
    bad = '''
import pickle, torch
import numpy as np
from pickle import loads as fast_loads
import torch as T
class Loose(pickle.Unpickler):
    pass
def f(path, blob):
    torch.load(path)
    T.load(path, weights_only=False)
    pickle.load(open(path, "rb"))
    fast_loads(blob)
    np.load(path, allow_pickle=True)
    eval("1 + 1")
    exec("x = 1")
    torch.load(path, map_location="cpu", weights_only=True)  # the one safe call
'''
    problems = unsafe_calls(bad, "configurator.py")
    assert len(problems) == 8, problems
    assert unsafe_calls("def read_config_file(p):\n    exec(compile('', p, 'exec'), {})\n", "configurator.py") == []


def test_legacy_meta_pkl_goes_through_the_restricted_reader(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    itos = sorted(set("hello world"))
    with open(plain / "meta.pkl", "wb") as f:  # what nanoGPT's shakespeare_char/prepare.py writes
        pickle.dump({"vocab_size": len(itos), "itos": dict(enumerate(itos)), "stoi": {c: i for i, c in enumerate(itos)}}, f)
    meta = load_meta(plain)
    assert meta["tokenizer"] == "char" and meta["itos"] == itos and meta["vocab_size"] == len(itos)

    evil, marker = tmp_path / "evil", tmp_path / "CODE_RAN"
    evil.mkdir()
    with open(evil / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "c"}, "payload": MakesMarker(marker)}, f)
    with pytest.raises(DataError, match="meta.pkl"):
        load_meta(evil)
    assert not marker.exists()


# ----------------------------------------------------------------------------- downloads


class FakeResponse:
    """What urllib.request.urlopen returns, serving `body`, optionally cut off after `deliver` bytes."""

    def __init__(self, body: bytes, deliver: int | None = None, incomplete_read: bool = False):
        self.body, self.deliver, self.incomplete_read = body, len(body) if deliver is None else deliver, incomplete_read
        self.headers = {"Content-Length": str(len(body))}
        self.pos = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, n: int = -1) -> bytes:
        if n < 0:  # http.client reads the whole body and raises IncompleteRead when it is short
            if self.incomplete_read:
                raise http.client.IncompleteRead(self.body[: self.deliver], len(self.body) - self.deliver)
            n = self.deliver
        chunk = self.body[self.pos: min(self.pos + n, self.deliver)]
        self.pos += len(chunk)
        return chunk


@pytest.fixture
def shakespeare_bytes(monkeypatch) -> bytes:
    path = SHARED / "data" / "tinyshakespeare" / "input.txt"
    if path.is_file():
        return path.read_bytes()
    body = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 100
    monkeypatch.setitem(forge.tokenize.KNOWN_SHA256, TINY_SHAKESPEARE_URL, hashlib.sha256(body).hexdigest())
    return body


@pytest.mark.parametrize("fault", ["none", "damaged", "incomplete", "network"])
def test_tiny_shakespeare_download_is_verified_and_atomic(tmp_path, monkeypatch, shakespeare_bytes, fault):
    """The prepare scripts' download: the published size and SHA-256 are checked; a damaged, short or failed
    download is an error that leaves no file (so the next run downloads again)."""
    body = shakespeare_bytes
    if fault == "damaged":
        body = body[:1000] + b"X" + body[1001:]

    attempts, waits = [], []

    def urlopen(url, timeout=None):
        assert url == TINY_SHAKESPEARE_URL
        attempts.append(url)
        if fault == "network":
            raise urllib.error.URLError("no route to host")
        return FakeResponse(body, deliver=len(body) // 3 if fault == "incomplete" else None,
                            incomplete_read=fault == "incomplete")

    monkeypatch.setattr(forge.io.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(forge.io.time, "sleep", waits.append)
    target = tmp_path / "input.txt"
    if fault == "none":
        assert local_or_downloaded_text(None, target, TINY_SHAKESPEARE_URL) == body.decode("utf-8")
        assert target.read_bytes() == body
    else:
        with pytest.raises(DataError, match="download"):
            local_or_downloaded_text(None, target, TINY_SHAKESPEARE_URL)
        assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["input.txt"] if fault == "none" else [])
    # a network failure or a short read is retried with growing waits; a damaged file is not
    assert len(attempts) == (4 if fault in ("network", "incomplete") else 1)
    assert waits == sorted(waits) and len(waits) == len(attempts) - 1


def test_a_download_that_fails_once_is_retried_and_succeeds(tmp_path, monkeypatch):
    body = b"line\n" * 1000
    responses = [urllib.error.URLError("connection reset"), FakeResponse(body, deliver=10), FakeResponse(body)]

    def urlopen(url, timeout=None):
        response = responses.pop(0)
        if isinstance(response, Exception):
            raise response
        return response

    monkeypatch.setattr(forge.io.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(forge.io.time, "sleep", lambda s: None)
    forge.io.download("https://example.com/f.txt", tmp_path / "f.txt", sha256=hashlib.sha256(body).hexdigest())
    assert (tmp_path / "f.txt").read_bytes() == body and responses == []
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("short", [False, True], ids=["complete", "connection_dropped"])
def test_hellaswag_download_checks_its_length_and_is_atomic(tmp_path, monkeypatch, short):
    body = b'{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}\n' * 50
    response = FakeResponse(body, deliver=len(body) // 2 if short else None)
    monkeypatch.setattr(forge.io.urllib.request, "urlopen", lambda url, timeout=None: response)
    monkeypatch.setattr(forge.io.time, "sleep", lambda s: None)
    target = tmp_path / "cache" / "hellaswag_val.jsonl"
    if short:
        with pytest.raises(HellaSwagError, match="could not download"):
            forge.hellaswag.download(forge.hellaswag.HELLASWAG_VAL_URL, target)
        assert list(target.parent.iterdir()) == []
    else:
        forge.hellaswag.download(forge.hellaswag.HELLASWAG_VAL_URL, target)
        assert target.read_bytes() == body and [p.name for p in target.parent.iterdir()] == [target.name]


def test_command_line_overrides_are_parsed_never_executed(tmp_path):
    """--key=value goes through ast.literal_eval: an expression stays a string, whatever it would do."""
    from configurator import TrainConfig, load_config

    marker = tmp_path / "CODE_RAN"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    cfg = load_config([f"--wandb_run_name={payload}", f"--out_dir={payload}"], TrainConfig, prog="train.py")
    assert cfg.wandb_run_name == payload and cfg.out_dir == payload
    assert not marker.exists()
