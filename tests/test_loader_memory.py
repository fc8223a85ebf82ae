"""The training loader's resident memory stays flat on a large bin (nanoGPT issue 287).

A memory map held for a run keeps every page it touched counted in the process's RSS, which grows
toward the bin's size; TokenBatches reads each batch's windows with file reads instead. The control (one
map held while reading the same windows) shows that this machine's RSS does count such pages, so the
test can fail.
"""
import json

import numpy as np

from forge.data import TokenBatches

TOKENS = 128 * 2**20  # 256 MB of uint16
BATCH, BLOCK, STEPS = 64, 1024, 120  # ~7,700 windows: most of the file's pages touched at least once


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def write_bin(folder):
    folder.mkdir()
    with open(folder / "train.bin", "wb") as f:
        chunk = (np.arange(2**22, dtype=np.int64) % 65_000).astype(np.uint16)
        for _ in range(TOKENS // chunk.size):
            f.write(chunk.tobytes())
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 65_000, "tokenizer": "gpt2", "dtype": "uint16"}))


def test_reading_windows_does_not_grow_rss_toward_the_bin_size(tmp_path):
    data = tmp_path / "big"
    write_bin(data)
    batches = TokenBatches(data, "train", BATCH, BLOCK, seed=7)
    offsets = [batches.window_offsets(step, 0) for step in range(STEPS)]

    before = rss_bytes()
    for step in range(STEPS):
        x, y = batches.get_batch(step, 0)
        assert x.shape == (BATCH, BLOCK) and int(x[0, 0]) == offsets[step][0] % 2**22 % 65_000  # the windows it drew
    loader_growth = rss_bytes() - before

    held = np.memmap(data / "train.bin", dtype=np.uint16, mode="r")  # what a loader holding one map does
    before = rss_bytes()
    for step_offsets in offsets:
        np.stack([held[i:i + BLOCK + 1] for i in step_offsets])
    held_growth = rss_bytes() - before
    del held

    assert held_growth > 100 * 2**20, f"control: a held map grew RSS by only {held_growth / 2**20:.0f} MB"
    assert loader_growth < 24 * 2**20, f"TokenBatches grew RSS by {loader_growth / 2**20:.0f} MB on a 256 MB bin"
