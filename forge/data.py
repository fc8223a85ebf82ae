"""Token bins on disk and the batches the model trains on.

A prepared data folder holds `train.bin` and `val.bin` (raw little-endian token ids, dtype from
meta.json: uint16, or uint32 for vocabularies above 65,536 ids) and `meta.json`
({vocab_size, tokenizer, dtype} plus `itos` for character vocabularies). Folders made by nanoGPT
(uint16 bins, a `meta.pkl` or no metadata at all for GPT-2 BPE) load unchanged.

The training batches are deterministic and world-size invariant: the window offset of global
sample i of optimizer step s is a pure function of (seed, split, s, i), so 1 process with gradient
accumulation 8 sees exactly the batches of 8 processes with accumulation 1, and a resumed run
continues the identical stream from `state_dict()`.

A prompt/response folder (meta.json "loss_mask": true, from data/text/prepare.py --format
prompt_response) also holds `<split>.mask.bin` (uint8 per token: 1 where the token is a target the loss
counts) and `<split>.starts.bin` (int64: each example's first token). Its windows are PADDED, one
example each: a window starts at an example's start (the model sees it from position 0, as at
inference), holds only that example (its first block_size + 1 tokens if longer), and every target that
is prompt, padding or past the example is -1, the model's ignore_index, so the loss is the mean over
the response tokens only. Which example a sample takes is drawn as above (deterministic, world-size
invariant, resumable); examples with no response token within block_size are never drawn.
"""
import json
import pickle
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from forge.io import os_reason
from forge.tokenize import DTYPES, GPT2_VOCAB_SIZE, STARTS_DTYPE, DataError

# nanoGPT's OpenWebText folder has no metadata: GPT-2 BPE in uint16 is what it means.
DEFAULT_META = {"vocab_size": GPT2_VOCAB_SIZE, "tokenizer": "gpt2", "dtype": "uint16"}


def prepare_hint(data_dir) -> str:
    """The command that makes data_dir's bins: its own prepare script, or the own-corpus one."""
    data_dir = Path(data_dir)
    if (data_dir / "prepare.py").is_file():
        return f"`python {data_dir / 'prepare.py'}`"
    return (f"`python data/{data_dir.name}/prepare.py` if that dataset exists, or "
            f"`python data/text/prepare.py YOUR_FILES --out_dir {data_dir}` for your own text")


# ----------------------------------------------------------------------------- metadata

class _NoCodeUnpickler(pickle.Unpickler):
    """Reads only pickles of plain containers and scalars: any class or function reference is refused,
    so a meta.pkl cannot run code when it is opened."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_legacy_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            meta = _NoCodeUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path} is not a plain nanoGPT meta.pkl ({exc}); it was not loaded because a pickle "
                        "can run code: re-run the dataset's prepare.py, whose meta.json is read instead of it") from None
    except Exception as exc:  # truncated or not a pickle at all
        raise DataError(f"{path} is unreadable ({type(exc).__name__}: {exc}); re-run the dataset's prepare.py") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} holds a {type(meta).__name__}, not a dict; re-run the dataset's prepare.py")
    itos = meta.get("itos")
    if isinstance(itos, dict):  # nanoGPT stores {id: char}
        try:
            itos = [itos[i] for i in range(len(itos))]
        except KeyError:
            raise DataError(f"{path}: 'itos' ids are not 0..{len(itos) - 1}; re-run the dataset's prepare.py") from None
    legacy = {"vocab_size": meta.get("vocab_size"), "dtype": "uint16",
              "tokenizer": "char" if itos is not None else "gpt2"}
    if itos is not None:
        legacy["itos"] = itos
    return legacy


def _validated(meta: dict, path: Path) -> dict:
    """meta with defaults filled in (uint16; char if it has itos, else gpt2), or a DataError naming the bad field."""
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object; re-run the dataset's prepare.py")
    meta = {"dtype": "uint16", "tokenizer": "char" if "itos" in meta else "gpt2", **meta}
    if meta.get("dtype") not in DTYPES:
        raise DataError(f"{path}: dtype {meta.get('dtype')!r} is not one of {sorted(DTYPES)}")
    if meta.get("tokenizer") not in ("char", "gpt2", "bpe"):
        raise DataError(f"{path}: tokenizer {meta.get('tokenizer')!r} is not 'char', 'gpt2' or 'bpe'")
    vocab_size = meta.get("vocab_size")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise DataError(f"{path}: vocab_size {vocab_size!r} is not a positive integer")
    if vocab_size > np.iinfo(DTYPES[meta["dtype"]]).max + 1:
        raise DataError(f"{path}: vocab_size {vocab_size} does not fit dtype {meta['dtype']}")
    if meta["tokenizer"] == "char":
        itos = meta.get("itos")
        if (not isinstance(itos, list) or len(itos) != vocab_size
                or not all(isinstance(c, str) and len(c) == 1 for c in itos)):
            raise DataError(f"{path}: a char vocabulary needs 'itos', a list of {vocab_size} single characters")
    max_ids = meta.get("max_token_ids", {})  # recorded at prepare time; older folders are checked batch by batch
    if not isinstance(max_ids, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in max_ids.values()):
        raise DataError(f"{path}: max_token_ids {max_ids!r} is not a {{split: largest id}} object; re-run the dataset's "
                        "prepare.py")
    for split, max_id in max_ids.items():
        if max_id >= vocab_size:
            raise DataError(f"{path}: {split}.bin holds token id {max_id} but vocab_size is {vocab_size}: the bins "
                            "belong to another tokenizer; re-run the dataset's prepare.py")
    if meta["tokenizer"] == "bpe":
        _check_bpe_fields(meta, path)
    return meta


def _check_bpe_fields(meta: dict, path: Path) -> None:
    """A trained BPE's tokenizer file is a plain name inside the data folder (never a path elsewhere),
    identified by its SHA-256, with an end-of-text id inside the vocabulary."""
    name, digest, eot = meta.get("tokenizer_file"), meta.get("tokenizer_sha256"), meta.get("eot_token")
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise DataError(f"{path}: tokenizer_file {name!r} must be the name of a file in the data folder")
    if not isinstance(digest, str) or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise DataError(f"{path}: tokenizer_sha256 {digest!r} is not a SHA-256 hex digest")
    if isinstance(eot, bool) or not isinstance(eot, int) or not 0 <= eot < meta["vocab_size"]:
        raise DataError(f"{path}: eot_token {eot!r} is not an id below vocab_size {meta['vocab_size']}")


def load_meta(data_dir) -> dict:
    """The folder's metadata: meta.json, else a legacy nanoGPT meta.pkl (plain data only), else GPT-2 BPE
    in uint16. Always has vocab_size, tokenizer ('char' or 'gpt2') and dtype; char vocabularies have itos."""
    data_dir = Path(data_dir)
    check_data_dir(data_dir)
    json_path, pkl_path = data_dir / "meta.json", data_dir / "meta.pkl"
    if json_path.is_file():
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"{json_path} is not valid JSON ({exc}); re-run the dataset's prepare.py") from None
        except OSError as exc:
            raise DataError(f"cannot read {json_path}: {os_reason(exc)}") from None
        return _validated(meta, json_path)
    if pkl_path.is_file():
        return _validated(_read_legacy_pickle(pkl_path), pkl_path)
    return dict(DEFAULT_META)


# ----------------------------------------------------------------------------- bins

def check_data_dir(data_dir: Path) -> None:
    """DataError unless data_dir is a folder that does not hold an interrupted preparation."""
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} is a file, not a folder: point data_dir (or dataset) at the folder "
                        "holding train.bin, val.bin and meta.json")
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist: create it with {prepare_hint(data_dir)}")
    if not (data_dir / "meta.json").exists() and any(data_dir.glob("*.tmp")):
        raise DataError(f"{data_dir} holds an interrupted preparation (*.tmp files, no meta.json): "
                        f"run its prepare script again to finish it")


def open_split(data_dir, split: str, meta: dict | None = None) -> np.memmap:
    """Memory-map `<data_dir>/<split>.bin` read-only, with the dtype from its metadata.

    Missing folder or file, a half-written preparation and a size that is not a whole number of
    tokens are DataErrors saying what to run.
    """
    data_dir = Path(data_dir)
    path = data_dir / f"{split}.bin"
    check_data_dir(data_dir)
    if not path.is_file():
        raise DataError(f"{path} not found: create it with {prepare_hint(data_dir)}")
    meta = load_meta(data_dir) if meta is None else meta
    dtype = DTYPES[meta["dtype"]]
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"{path} is {size} bytes, not a whole number of {meta['dtype']} tokens: it is truncated "
                        f"or meta.json has the wrong dtype; re-run the prepare script")
    if size == 0:
        raise DataError(f"{path} is empty; re-run the prepare script on a non-empty corpus")
    try:
        return np.memmap(path, dtype=dtype, mode="r")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {os_reason(exc)}") from None


class TokenFile:
    """A split's token file read with plain file reads into fresh arrays: nothing stays memory-mapped.

    A memory map held for a run keeps every page it touched counted in the process's resident memory,
    which grows toward the file's size (2 GB on a 2 GB bin; nanoGPT issue 287). Reads leave the pages to
    the OS page cache (shared, reclaimable) and cost no more per batch than the held map did; re-mapping
    per batch (nanoGPT's fix) is flat too but slower (munmap and page faults each time). docs/BENCHMARKS.md.
    """

    def __init__(self, tokens: np.memmap):
        self.path, self.dtype = tokens.filename, tokens.dtype

    def windows(self, starts, length: int) -> np.ndarray:
        """tokens[s : s + length] for each start s, as the rows of a (len(starts), length) array."""
        out = np.empty((len(starts), length), dtype=self.dtype)
        with open(self.path, "rb", buffering=0) as f:  # one open per call: safe from the prefetch thread
            for row, start in zip(out, starts):
                f.seek(int(start) * self.dtype.itemsize)
                if f.readinto(row) != row.nbytes:
                    raise DataError(f"{self.path} became shorter while reading it: was it prepared again?")
        return out


def _check_length(tokens: np.ndarray, path, block_size: int) -> None:
    if len(tokens) < block_size + 1:
        raise DataError(f"{path} has {len(tokens):,} tokens but block_size={block_size} needs at least "
                        f"{block_size + 1:,}: lower block_size or prepare more text")


def check_token_ids(windows: np.ndarray, offsets, vocab_size: int, path) -> None:
    """Every id in windows (N, L), read from `path` at token offsets (N,), must be below the tokenizer's
    vocab_size: an id beyond it would index no row (or a padded row) of the model. One compare per batch."""
    outside = windows >= vocab_size
    if outside.any():
        row, col = np.argwhere(outside)[0]
        raise DataError(f"{path} holds token id {int(windows[row, col])} at token {int(offsets[row]) + int(col):,}, "
                        f"outside the {vocab_size}-id vocabulary of its metadata: the bin was written with another "
                        "tokenizer or dtype (uint16 vs uint32); re-run the dataset's prepare.py")


class Examples:
    """The examples of a prompt/response split (module docstring): their starts, ends and loss mask."""

    def __init__(self, data_dir, split: str, num_tokens: int, block_size: int):
        data_dir = Path(data_dir)
        mask_path, starts_path = data_dir / f"{split}.mask.bin", data_dir / f"{split}.starts.bin"
        for path in (mask_path, starts_path):
            if not path.is_file():
                raise DataError(f"{path} not found, but {data_dir / 'meta.json'} says the data has a loss mask: "
                                f"re-run data/text/prepare.py --format prompt_response for {data_dir}")
        if mask_path.stat().st_size != num_tokens or starts_path.stat().st_size % STARTS_DTYPE.itemsize:
            raise DataError(f"{mask_path} or {starts_path} does not fit {split}.bin's {num_tokens:,} tokens: the folder "
                            "is damaged or mixed from two preparations; re-run the prepare script")
        self.mask = TokenFile(np.memmap(mask_path, dtype=np.uint8, mode="r"))  # read per batch, like the tokens
        starts = np.fromfile(starts_path, dtype=STARTS_DTYPE)
        if len(starts) == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= num_tokens:
            raise DataError(f"{starts_path} is not an increasing list of example starts within {split}.bin; "
                            "re-run the prepare script")
        ends = np.append(starts[1:], num_tokens)
        # the first counted target of each example: one with none in its first block_size targets adds nothing
        counted = np.append(np.flatnonzero(np.fromfile(mask_path, dtype=np.uint8)), num_tokens)
        first_target = counted[np.searchsorted(counted, starts + 1)]
        usable = first_target < np.minimum(starts + block_size + 1, ends)
        if not usable.any():
            raise DataError(f"no example of {data_dir / split}.bin has a response token within block_size={block_size} "
                            "tokens of its start: raise block_size or shorten the prompts")
        self.starts, self.ends = starts[usable], ends[usable]
        self.skipped = int((~usable).sum())
        self.cut = int((self.ends - self.starts > block_size + 1).sum())

    def describe(self) -> str:
        """What a run should know about the examples: how many, and how many block_size cuts or leaves out."""
        text = f"{len(self):,} prompt/response examples, loss on the responses only"
        if self.cut:
            text += f"; {self.cut:,} longer than block_size + 1 tokens are cut"
        if self.skipped:
            text += f"; {self.skipped:,} without a response token within block_size are left out"
        return text

    def __len__(self) -> int:
        return len(self.starts)

    def windows(self, tokens: "TokenFile", offsets: np.ndarray, block_size: int, vocab_size: int,
                path) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) int64 (len(offsets), block_size): the examples starting at offsets, padded, y -1 where not
        counted; ids are checked against vocab_size (check_token_ids, naming `path`)."""
        ends = self.ends[np.searchsorted(self.starts, offsets)]
        x = np.zeros((len(offsets), block_size), dtype=np.int64)
        y = np.full((len(offsets), block_size), -1, dtype=np.int64)
        for row, (start, end) in enumerate(zip(offsets, ends)):
            n = min(block_size, int(end - start) - 1)  # the targets this example has in the window
            window = tokens.windows([start], n + 1)
            check_token_ids(window, [start], vocab_size, path)
            mask = self.mask.windows([start + 1], n)[0]
            x[row, :n] = window[0, :-1]
            y[row, :n] = np.where(mask == 1, window[0, 1:].astype(np.int64), -1)
        return x, y


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        # from pinned host memory the copy overlaps with compute (non_blocking)
        return (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)
    return x.to(device)


def _stable_split_id(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


class TokenBatches:
    """Random windows of block_size + 1 tokens from one split, deterministic and world-size invariant.

    grad_accum_steps is the *global* number of micro-steps per optimizer step; rank r does global
    micro-steps r*(G/W) .. (r+1)*(G/W)-1, so the union over ranks is the same for every world size.
    """

    def __init__(self, data_dir, split, batch_size, block_size, *, grad_accum_steps=1, rank=0,
                 world_size=1, seed=1337, device="cpu"):
        if batch_size < 1 or block_size < 1 or grad_accum_steps < 1:
            raise DataError(f"batch_size ({batch_size}), block_size ({block_size}) and gradient_accumulation_steps "
                            f"({grad_accum_steps}) must all be at least 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        if grad_accum_steps % world_size:
            raise DataError(f"gradient_accumulation_steps={grad_accum_steps} is not divisible by the world size "
                            f"{world_size}: set it to a multiple of {world_size} (it counts micro-steps of all ranks)")
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.grad_accum_steps, self.rank, self.world_size = grad_accum_steps, rank, world_size
        self.device = torch.device(device)
        self.meta = load_meta(self.data_dir)
        self.vocab_size = self.meta["vocab_size"]
        tokens = open_split(self.data_dir, split, self.meta)  # checked here, then read per batch (TokenFile)
        self.num_tokens = len(tokens)
        self.examples = Examples(self.data_dir, split, self.num_tokens, block_size) if self.meta.get("loss_mask") else None
        if self.examples is None:
            _check_length(tokens, self.data_dir / f"{split}.bin", block_size)
        self._tokens = TokenFile(tokens)
        self.micro_steps_per_rank = grad_accum_steps // world_size
        self._split_id = _stable_split_id(split)
        self._step, self._micro = 0, 0  # position of the next next(): optimizer step, this rank's micro-step
        self._prefetch_pool = None
        self._prefetched = None  # (position, future of the CPU batch)

    # --- the pure part
    def window_offsets(self, step: int, micro_step: int) -> np.ndarray:
        """Start offsets of the batch_size windows of global micro-step `micro_step` of optimizer step `step`.

        Sample i of a step is the i-th draw of a Philox stream keyed by (seed, split, step), so its
        offset depends on nothing else (not on world size, accumulation or what was drawn before).
        """
        if step < 0 or micro_step < 0:
            raise ValueError(f"step ({step}) and micro_step ({micro_step}) must be non-negative")
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.seed, self._split_id, step])))
        first = micro_step * self.batch_size
        if self.examples is not None:  # a whole example per window: draw which one
            draws = rng.integers(0, len(self.examples), size=first + self.batch_size, dtype=np.int64)
            return self.examples.starts[draws[first:]]
        draws = rng.integers(0, self.num_tokens - self.block_size, size=first + self.batch_size, dtype=np.int64)
        return draws[first:]

    def _cpu_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = self.window_offsets(step, micro_step)
        path = self.data_dir / f"{self.split}.bin"
        if self.examples is not None:
            x, y = self.examples.windows(self._tokens, offsets, self.block_size, self.vocab_size, path)
            return torch.from_numpy(x), torch.from_numpy(y)
        windows = self._tokens.windows(offsets, self.block_size + 1)
        check_token_ids(windows, offsets, self.vocab_size, path)
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # model.py views them flat

    def get_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 (batch_size, block_size) on the device: global micro-step `micro_step` of `step`."""
        x, y = self._cpu_batch(step, micro_step)
        return _to_device(x, self.device), _to_device(y, self.device)

    # --- this rank's stream
    def _global_micro(self, local_micro: int) -> int:
        return self.rank * self.micro_steps_per_rank + local_micro

    def _following(self, step: int, micro: int) -> tuple[int, int]:
        micro += 1
        return (step + 1, 0) if micro == self.micro_steps_per_rank else (step, micro)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch; the one after it is read in a background thread meanwhile."""
        position = (self._step, self._micro)
        if self._prefetched is not None and self._prefetched[0] == position:
            x, y = self._prefetched[1].result()
        else:
            x, y = self._cpu_batch(position[0], self._global_micro(position[1]))
        self._step, self._micro = following = self._following(*position)
        if self._prefetch_pool is None:
            self._prefetch_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"prefetch-{self.split}")
        self._prefetched = (following, self._prefetch_pool.submit(
            self._cpu_batch, following[0], self._global_micro(following[1])))
        return _to_device(x, self.device), _to_device(y, self.device)

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        """The position of the next next(): the same on every rank, so rank 0's copy resumes them all."""
        return {"step": self._step, "micro_step": self._micro, "split": self.split, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        step, micro = int(state["step"]), int(state.get("micro_step", 0))
        if step < 0 or not 0 <= micro < self.micro_steps_per_rank:
            raise DataError(f"loader state step={step}, micro_step={micro} does not fit "
                            f"{self.micro_steps_per_rank} micro-steps per rank; resume at an optimizer step boundary")
        self._step, self._micro = step, micro
        self._prefetched = None

    def close(self) -> None:
        if self._prefetch_pool is not None:
            self._prefetch_pool.shutdown(wait=True)
            self._prefetch_pool, self._prefetched = None, None


# ----------------------------------------------------------------------------- whole-split evaluation

class SequentialWindows:
    """Every token of a split predicted exactly once: consecutive windows of block_size targets.

    Window k has x = tokens[k*T : k*T+T] and y = tokens[k*T+1 : k*T+T+1]; the last window is padded
    (x with 0, y with -1, the model's ignore_index). Windows are grouped in batches of batch_size and
    batch j goes to rank j % world_size. Every rank yields the same number of full-shape batches
    (padding batches have y all -1), so collective forwards (FSDP) stay in step: sum the per-token
    losses where y != -1 and all-reduce the sums and counts.

    A prompt/response split (loss mask) is scored as in training: window k is example k, padded,
    with only its response tokens as targets; max_targets then limits the number of examples to
    max_targets // block_size (at least one).
    """

    def __init__(self, data_dir, split, block_size, batch_size, *, rank=0, world_size=1, device="cpu", max_targets=0):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        meta = load_meta(data_dir)
        self.path, self.vocab_size = Path(data_dir) / f"{split}.bin", meta["vocab_size"]
        tokens = open_split(data_dir, split, meta)  # checked here, then read per batch (TokenFile)
        if len(tokens) < 2:
            raise DataError(f"{self.path} has {len(tokens)} token: nothing to predict")
        self.num_targets = len(tokens) - 1  # every token but the first
        self._tokens = TokenFile(tokens)
        if max_targets > 0:  # a quick run: only the first max_targets targets (evaluate.py --limit_tokens)
            self.num_targets = min(self.num_targets, max_targets)
        self.num_windows = -(-self.num_targets // block_size)
        self.examples = Examples(data_dir, split, len(tokens), block_size) if meta.get("loss_mask") else None
        if self.examples is not None:
            self.num_windows = len(self.examples) if not max_targets else min(len(self.examples), self.num_windows)
        num_batches = -(-self.num_windows // batch_size)
        self.batches_per_rank = -(-num_batches // world_size)

    def __len__(self) -> int:
        return self.batches_per_rank

    def _batch(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        x = torch.zeros(self.batch_size, T, dtype=torch.int64)
        y = torch.full((self.batch_size, T), -1, dtype=torch.int64)
        if self.examples is not None:
            starts = self.examples.starts[j * self.batch_size:min((j + 1) * self.batch_size, self.num_windows)]
            rows = len(starts)
            x[:rows], y[:rows] = map(torch.from_numpy, self.examples.windows(self._tokens, starts, T, self.vocab_size,
                                                                             self.path))
            return _to_device(x, self.device), _to_device(y, self.device)
        for row, k in enumerate(range(j * self.batch_size, min((j + 1) * self.batch_size, self.num_windows))):
            n = min(T, self.num_targets - k * T)
            window = self._tokens.windows([k * T], n + 1)
            check_token_ids(window, [k * T], self.vocab_size, self.path)
            window = torch.from_numpy(window[0].astype(np.int64))
            x[row, :n], y[row, :n] = window[:-1], window[1:]
        return _to_device(x, self.device), _to_device(y, self.device)

    def __iter__(self):
        for i in range(self.batches_per_rank):
            yield self._batch(i * self.world_size + self.rank)

