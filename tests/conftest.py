"""Shared test fixtures: a clean torch state per test, offline assets from ../shared with generated fallbacks."""
import os
import random
import string

import pytest
import torch
import torch.distributed as dist

from tests.util import REPO, SHARED

_TIKTOKEN_CACHE = SHARED / "tiktoken_cache"
if _TIKTOKEN_CACHE.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_TIKTOKEN_CACHE))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _clean_torch_state():
    """Each test starts from the default dtype and matmul precision and no process group, whatever the previous one did."""
    default_dtype, matmul_precision = torch.get_default_dtype(), torch.get_float32_matmul_precision()
    yield
    torch.set_default_dtype(default_dtype)
    torch.set_float32_matmul_precision(matmul_precision)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _generated_text(n_chars: int = 200_000, seed: int = 0) -> str:
    """Shakespeare-shaped filler for machines without ../shared: words, lines, speakers."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 8))) for _ in range(500)]
    lines = []
    while sum(len(line) for line in lines) < n_chars:
        speaker = rng.choice(["ROMEO", "JULIET", "KING", "CLOWN"])
        body = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        lines.append(f"{speaker}:\n{body.capitalize()}.\n\n")
    return "".join(lines)[:n_chars]


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """Tiny Shakespeare from ../shared when present, generated text of the same shape otherwise."""
    path = SHARED / "data" / "tinyshakespeare" / "input.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return _generated_text()


@pytest.fixture(scope="session")
def gpt2_encoding():
    """The real GPT-2 BPE (tiktoken 'gpt2'); skipped where neither the cache nor the internet has it."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # no cache and no network
        pytest.skip(f"GPT-2 BPE unavailable offline: {exc}")


@pytest.fixture
def repo_root():
    return REPO


def make_char_dataset(folder, text: str, val_fraction: float = 0.1):
    """A character-level data folder as prepare.py writes it: uint16 train.bin / val.bin and meta.json."""
    import json

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    itos = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(itos)}
    ids = np.array([stoi[ch] for ch in text], dtype="<u2")
    n = int(len(ids) * (1 - val_fraction))
    ids[:n].tofile(folder / "train.bin")
    ids[n:].tofile(folder / "val.bin")
    meta = {"vocab_size": len(itos), "tokenizer": "char", "dtype": "uint16", "itos": itos}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def tiny_char_data(tmp_path_factory, shakespeare_text):
    """A small character-level data folder (the first 20,000 characters of Tiny Shakespeare); read-only."""
    return make_char_dataset(tmp_path_factory.mktemp("tiny_char"), shakespeare_text[:20_000])


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: on a busy 2-core machine OpenMP's spinning
    threads make every step hundreds of times slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
