"""Tokenizers (characters, GPT-2 BPE, or a byte-level BPE trained on the corpus) and the streaming pipeline
every data/*/prepare.py writes bins with.

The pipeline turns an iterable of documents into a token bin in bounded memory, whatever the corpus
size: documents are cut into chunks of about `chunk_chars` characters, tokenized in `num_proc`
worker processes, and each chunk's ids are appended to `<name>.bin.tmp` in input order as they
arrive (so the bytes are the same for any num_proc). A finished folder is committed atomically:
bins are fsynced and renamed into place, and meta.json is written last, so a folder with a
meta.json is complete and an interrupted run leaves only *.tmp files that the next run replaces.
"""
import hashlib
import json
import multiprocessing
import os
import signal
from collections import deque
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from forge.errors import UserError
from forge.io import FolderLock, download, first_line, fsync_dir, fsync_file, os_reason

GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256
UINT16_VOCAB_LIMIT = 1 << 16  # ids 0..65535 fit uint16
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # bins are little-endian on every machine
STARTS_DTYPE = np.dtype("<i8")  # <split>.starts.bin of a prompt/response dataset: each example's first token


class DataError(UserError):
    """Missing, incomplete or unusable data, or input that cannot be prepared (also forge.data.DataError).

    Defined here so the prepare scripts, which import only this module, never pay for importing torch.
    """


# ----------------------------------------------------------------------------- tokenizers

class CharTokenizer:
    """One id per character; ids are the positions in `itos` (nanoGPT: the sorted unique characters)."""

    eot_token = None

    def __init__(self, itos):
        self.itos = list(itos)
        self.vocab_size = len(self.itos)
        codepoints = np.array([ord(c) for c in self.itos], dtype=np.int64)
        # code point -> id lookup table (-1: not in the vocabulary); at most 1.1M entries
        self._ids = np.full(int(codepoints.max()) + 1, -1, dtype=np.int64)
        self._ids[codepoints] = np.arange(self.vocab_size)

    def encode_array(self, text: str) -> np.ndarray:
        codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
        ids = np.full(len(codepoints), -1, dtype=np.int64)
        known = codepoints < len(self._ids)
        ids[known] = self._ids[codepoints[known]]
        if (ids < 0).any():
            unknown = sorted({chr(c) for c in codepoints[ids < 0]})
            shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise DataError(f"{len(unknown)} character(s) not in the {self.vocab_size}-character vocabulary: {shown}; "
                            "remove them from the text (a character model knows only the characters it was trained on)")
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids)

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8", "surrogatepass")


class GPT2Tokenizer:
    """tiktoken's 'gpt2' BPE; ordinary text only (special tokens in the text are plain characters)."""

    vocab_size = GPT2_VOCAB_SIZE
    eot_token = GPT2_EOT

    def __init__(self):
        import tiktoken

        try:
            self.encoding = tiktoken.get_encoding("gpt2")
        except Exception as exc:
            raise DataError(f"cannot load the GPT-2 BPE ({type(exc).__name__}: {exc}); tiktoken downloads it once: "
                            "connect to the internet or set TIKTOKEN_CACHE_DIR to a folder holding its cache") from None

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # one thread: the pipeline parallelises with processes, num_proc is the whole budget
        return self.encoding.encode_ordinary_batch(texts, num_threads=1)

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))

    def decode_bytes(self, ids) -> bytes:
        return self.encoding.decode_bytes(list(ids))


BPE_EOT = "<|endoftext|>"  # the end-of-text token of a trained BPE, as GPT-2 spells it
BPE_MIN_VOCAB = 256 + 1  # the 256 byte tokens and the end-of-text token
BPE_FILE = "tokenizer.json"


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError("a trained BPE tokenizer needs the Hugging Face `tokenizers` library: "
                        "pip install -e '.[data]'") from None
    return tokenizers


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE spells byte b as a printable character: b itself when printable, else chr(256 + k)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)}
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class BPETokenizer:
    """A byte-level BPE trained on the dataset's own corpus (Hugging Face `tokenizers`), read from the
    tokenizer.json stored with the dataset. Like GPT2Tokenizer it encodes ordinary text: an
    "<|endoftext|>" written in the text is plain characters; the end-of-text id comes only from the pipeline."""

    def __init__(self, path):
        tokenizers = _import_tokenizers()
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:
            raise DataError(f"{path} is not a tokenizers tokenizer.json ({type(exc).__name__}: {first_line(exc)}); "
                            "re-run the dataset's prepare.py") from None
        self.tokenizer.encode_special_tokens = True
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.eot_token = self.tokenizer.token_to_id(BPE_EOT)
        if self.eot_token is None:
            raise DataError(f"{path} has no {BPE_EOT} token; re-run the dataset's prepare.py")
        byte_of = _byte_level_chars()
        special = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
        self._bytes = [b""] * self.vocab_size  # id -> the bytes it stands for
        for token, i in self.tokenizer.get_vocab().items():
            self._bytes[i] = token.encode("utf-8") if token in special else bytes(byte_of[c] for c in token)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self._bytes[i] for i in ids)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _bpe_path(meta: dict, data_dir) -> Path:
    """The tokenizer.json of a 'bpe' meta: its tokenizer_file, relative to data_dir unless absolute."""
    path = Path(meta["tokenizer_file"])
    if data_dir is None and not path.is_absolute():
        raise DataError("a dataset with its own BPE tokenizer needs its data folder (where tokenizer.json lives) "
                        "to be known: pass --meta=PATH/TO/DATA_FOLDER")
    return path if data_dir is None else Path(data_dir) / path


def get_tokenizer(meta: dict, data_dir=None):
    """The tokenizer a data folder's metadata (forge.data.load_meta) describes; a trained BPE ('bpe') is
    read from the tokenizer.json in data_dir and must match the SHA-256 that meta.json records."""
    if meta.get("tokenizer") == "char":
        return CharTokenizer(meta["itos"])
    if meta.get("tokenizer", "gpt2") == "gpt2":
        return GPT2Tokenizer()
    if meta.get("tokenizer") == "bpe":
        path = _bpe_path(meta, data_dir)
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise DataError(f"cannot read the dataset's tokenizer {path} ({exc.strerror}): keep it next to meta.json, "
                            "or re-run the dataset's prepare.py") from None
        if digest != meta["tokenizer_sha256"]:
            raise DataError(f"{path} is not the tokenizer this dataset was tokenized with (its SHA-256 differs from "
                            "meta.json's tokenizer_sha256): restore it or re-run the dataset's prepare.py")
        return BPETokenizer(path)
    raise DataError(f"unknown tokenizer {meta.get('tokenizer')!r} in the data metadata (expected 'char', 'gpt2' or 'bpe')")


def check_bpe_vocab_size(vocab_size: int) -> None:
    if vocab_size < BPE_MIN_VOCAB:
        raise DataError(f"--vocab_size {vocab_size} is too small: a byte-level BPE needs the 256 byte tokens and "
                        f"the end-of-text token, so at least {BPE_MIN_VOCAB}")


def train_bpe(texts, vocab_size: int, path) -> dict:
    """Train a byte-level BPE of at most vocab_size ids (the 256 bytes, GPT-2's pre-tokenizer, the end-of-text
    token as id 0) on the str texts, save it as path (a tokenizers tokenizer.json) and return its meta.

    Deterministic: the same texts give the same file. The corpus may be too small for vocab_size merges;
    the meta's vocab_size is the size reached.
    """
    check_bpe_vocab_size(vocab_size)
    tokenizers = _import_tokenizers()
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOT], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    # the pipeline's worker processes encode one text at a time each: without this, forking after the
    # (multi-threaded) training makes tokenizers warn and turn its threads off anyway
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bpe.save(str(path))
    vocab_size = bpe.get_vocab_size()
    return {"vocab_size": vocab_size, "tokenizer": "bpe", "dtype": dtype_for(vocab_size), "tokenizer_file": BPE_FILE,
            "tokenizer_sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "eot_token": bpe.token_to_id(BPE_EOT)}


def bpe_tokenizer_files(meta: dict, data_dir) -> dict[str, str]:
    """For a dataset with its own BPE: the Hugging Face tokenizer files of an export ({name: text}): its
    tokenizer.json and a tokenizer_config.json (transformers' PreTrainedTokenizerFast, end-of-text as
    bos/eos/unk), so AutoTokenizer.from_pretrained(export) encodes to the same ids."""
    get_tokenizer(meta, data_dir)  # the file must be the one meta.json names (its SHA-256)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BPE_EOT, "eos_token": BPE_EOT,
              "unk_token": BPE_EOT, "add_prefix_space": False, "clean_up_tokenization_spaces": False}
    return {BPE_FILE: _bpe_path(meta, data_dir).read_text(encoding="utf-8"),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


def dtype_for(vocab_size: int) -> str:
    """uint16 for vocabularies of up to 65,536 ids (nanoGPT's format), uint32 above."""
    return "uint16" if vocab_size <= UINT16_VOCAB_LIMIT else "uint32"


def char_meta(itos) -> dict:
    return {"vocab_size": len(itos), "tokenizer": "char", "dtype": dtype_for(len(itos)), "itos": list(itos)}


def gpt2_meta() -> dict:
    return {"vocab_size": GPT2_VOCAB_SIZE, "tokenizer": "gpt2", "dtype": "uint16"}


# The metadata keys that decide what a token id means; not dtype, nor statistics such as max_token_ids.
# A new tokenizer kind adds the keys that define its vocabulary here.
TOKENIZER_KEYS = ("tokenizer", "vocab_size", "itos", "tokenizer_sha256")


def tokenizer_identity(meta: dict) -> dict:
    """What a checkpoint records about the tokenizer it was trained with: kind, vocabulary size and a
    SHA-256 of the defining metadata (TOKENIZER_KEYS), so that data of another tokenizer is recognised."""
    defining = {key: meta[key] for key in TOKENIZER_KEYS if key in meta}
    digest = hashlib.sha256(json.dumps(defining, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"kind": meta["tokenizer"], "vocab_size": meta["vocab_size"], "sha256": digest[:16]}


def check_same_tokenizer(recorded, meta: dict, data: str, model: str, advice: str) -> None:
    """DataError unless `meta` (the tokenizer of `data`) is the one `model` recorded (a checkpoint's
    "tokenizer" entry; None for checkpoints older than that record, which only a vocabulary check can judge)."""
    if recorded is None or recorded == tokenizer_identity(meta):
        return
    same_kind = recorded.get("kind") == meta["tokenizer"] and recorded.get("vocab_size") == meta["vocab_size"]
    what = f"'{meta['tokenizer']}' ({meta['vocab_size']} ids{', another vocabulary of the same size' * same_kind})"
    raise DataError(f"{data} is tokenized with {what}, not the vocabulary {model} was trained with "
                    f"('{recorded.get('kind')}', {recorded.get('vocab_size')} ids, sha256 {recorded.get('sha256')}): "
                    f"{advice}")


# ----------------------------------------------------------------------------- the streaming pipeline

_WORD = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def _is_word(c: str) -> bool:
    return c in _WORD or c.isalnum()


def _bpe_safe_cut(text: str, lo: int, hi: int) -> int:
    """The last position p in (lo, hi) where GPT-2's pre-tokenizer always starts a new piece, so
    encoding text[:p] and text[p:] separately gives the ids of encoding text whole; -1 if none.

    Safe: before ' w' after a word character or punctuation (' ?\\p{L}+' only ever takes one leading
    space), and before a word character that follows a single newline after a word character (the
    lone newline is its own piece whether or not the text ends there).
    """
    p = hi
    while True:
        p = max(text.rfind(" ", lo + 1, p), text.rfind("\n", lo + 1, p))
        if p <= lo + 1 or p + 1 >= len(text):
            return -1
        before, after = text[p - 1], text[p + 1]
        if text[p] == " " and (_is_word(before) or before in ".,;:!?") and _is_word(after):
            return p
        if text[p] == "\n" and _is_word(before) and _is_word(after):
            return p + 1


def _pieces(documents, chunk_chars: int):
    """(piece, ends_document) for every document, long documents cut at BPE-safe points near chunk_chars.

    A document is a str, or an iterable of str parts (a big file read block by block) that are
    joined: either way no more than about 2 * chunk_chars of it is held at once.
    """
    for doc in documents:
        rest = ""
        for part in (doc,) if isinstance(doc, str) else doc:
            if not isinstance(part, str):
                raise DataError(f"a document is a {type(part).__name__}, not text")
            text = rest + part if rest else part
            start = 0
            while len(text) - start > chunk_chars:
                cut = _bpe_safe_cut(text, start + chunk_chars // 2, start + chunk_chars)
                cut = start + chunk_chars if cut < 0 else cut  # no safe point: exact except at this one cut
                yield text[start:cut], False
                start = cut
            rest = text[start:]
        yield rest, True


def _chunks(documents, chunk_chars: int):
    """Lists of (piece, ends_document) of about chunk_chars characters each: the unit of work of a worker."""
    chunk, size = [], 0
    for piece, ends_document in _pieces(documents, chunk_chars):
        chunk.append((piece, ends_document))
        size += len(piece)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


_worker = {}  # per process: the (meta, append_eot) it works for and the tokenizer built from them


def _init_pool_worker(meta: dict, append_eot: bool) -> None:
    # nothing here may raise: a failing Pool initializer makes the pool respawn workers forever
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the pool
    _worker.clear()  # a forked worker inherits the tokenizer of an earlier num_proc=1 run in its parent
    _worker.update(meta=meta, append_eot=append_eot)


def _encode_chunk(chunk) -> tuple[np.ndarray, int, int]:
    """One chunk -> (its ids in the output dtype, documents it completes, characters). Ids that do not fit
    the dtype are an error, never a silent wrap."""
    if "tokenizer" not in _worker:  # built on first use, so an error reaches the main process through get()
        _worker["tokenizer"] = get_tokenizer(_worker["meta"])
    tokenizer, append_eot, dtype = _worker["tokenizer"], _worker["append_eot"], _worker["meta"]["dtype"]
    parts = []
    for ids, (_, ends_document) in zip(tokenizer.encode_batch([text for text, _ in chunk]), chunk):
        parts.append(np.asarray(ids, dtype=np.int64))
        if append_eot and ends_document:
            parts.append(np.array([tokenizer.eot_token], dtype=np.int64))
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    limit = np.iinfo(DTYPES[dtype]).max
    if len(ids) and ids.max() > limit:
        raise DataError(f"token id {int(ids.max())} does not fit {dtype} (max {limit}); "
                        "use dtype uint32 for vocabularies above 65,536 ids")
    return ids.astype(DTYPES[dtype]), sum(ends for _, ends in chunk), sum(len(text) for text, _ in chunk)


def _ordered_map(chunks, num_proc: int, meta: dict, append_eot: bool):
    """_encode_chunk over chunks in input order, at most 2 * num_proc chunks in flight (bounded memory)."""
    if num_proc <= 1:
        _worker.clear()
        _worker.update(meta=meta, append_eot=append_eot)
        yield from map(_encode_chunk, chunks)
        return
    with multiprocessing.Pool(num_proc, initializer=_init_pool_worker, initargs=(meta, append_eot)) as pool:
        pending = deque()
        for chunk in chunks:  # read in this process, so errors in the documents surface here
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class Written(NamedTuple):
    tokens: int
    documents: int
    characters: int


def tokenize_to_bin(documents, path, meta: dict, *, num_proc: int = 1, append_eot: bool = False,
                    chunk_chars: int = 1 << 18, total_documents: int | None = None,
                    desc: str | None = None, max_tokens: int | None = None) -> Written:
    """Tokenize documents (str, or iterables of str parts) into the raw bin `path`, with the tokenizer and
    dtype of `meta`; an EOT token after each document if append_eot. Returns what it wrote: tokens, documents
    and characters read. With max_tokens, stops reading documents once that many tokens are written (the
    bin holds exactly the first max_tokens of the token stream, whatever num_proc).

    Writes `path` directly: call it on a PreparedFolder.temp() path so the bin appears only on commit.
    """
    tokenizer = get_tokenizer(meta)  # fails here, once, if it cannot be loaded (e.g. GPT-2 BPE offline)
    if append_eot and tokenizer.eot_token is None:
        raise DataError("a character vocabulary has no end-of-text token to put between documents")
    num_tokens = num_documents = num_chars = 0
    path = Path(path)
    bar = tqdm(total=total_documents, desc=desc or path.name.removesuffix(".tmp"), unit="doc", delay=1.0,
               dynamic_ncols=True)
    with open(path, "wb") as f, bar:
        for ids, finished, chars in _ordered_map(_chunks(documents, chunk_chars), num_proc, meta, append_eot):
            if max_tokens is not None and num_tokens + len(ids) >= max_tokens:
                ids = ids[:max_tokens - num_tokens]
            f.write(ids.tobytes())
            num_tokens, num_documents, num_chars = num_tokens + len(ids), num_documents + finished, num_chars + chars
            bar.update(finished)
            bar.set_postfix(tokens=f"{num_tokens:,}", refresh=False)
            if num_tokens == max_tokens:
                break
        fsync_file(f)
    return Written(num_tokens, num_documents, num_chars)


def split_tail(path, tail_path, dtype: str, tail_fraction: float) -> tuple[int, int]:
    """Move the last tail_fraction of the tokens of bin `path` to a new bin `tail_path` (streamed, bounded
    memory) and truncate `path` to the rest. Returns (tokens left in path, tokens moved)."""
    itemsize = DTYPES[dtype].itemsize
    total = os.path.getsize(path) // itemsize
    num_head = int(total * (1 - tail_fraction))
    move_tail(path, tail_path, num_head * itemsize)
    return num_head, total - num_head


def move_tail(path, tail_path, head_bytes: int) -> None:
    """Move the bytes of file `path` after its first head_bytes to a new file `tail_path` (streamed) and
    truncate `path` to head_bytes."""
    with open(path, "r+b") as src, open(tail_path, "wb") as dst:
        src.seek(head_bytes)
        while block := src.read(1 << 24):
            dst.write(block)
        fsync_file(dst)
        src.truncate(head_bytes)
        fsync_file(src)


def write_text_split(text: str, out_dir, meta: dict, *, train_fraction: float = 0.9, num_proc: int = 1,
                     force: bool = False) -> dict:
    """nanoGPT's split of one text: the first train_fraction of the characters -> train.bin, the rest ->
    val.bin, each tokenized as one document (no EOT); committed with meta (replacing a complete folder
    only with force). Returns {split: tokens}."""
    n = int(len(text) * train_fraction)
    with PreparedFolder(out_dir, force=force) as folder:
        counts = {split: tokenize_to_bin([part], folder.temp(f"{split}.bin"), meta, num_proc=num_proc).tokens
                  for split, part in (("train", text[:n]), ("val", text[n:]))}
        folder.commit(meta)
    return counts


# ----------------------------------------------------------------------------- committing a data folder

META_BACKUP = ".meta.json.old"  # the previous meta.json while a commit replaces the bins


def is_prepared(out_dir) -> bool:
    """The folder holds a complete dataset: a meta.json, or (nanoGPT's folders) both bins and no *.tmp."""
    out_dir = Path(out_dir)
    if (out_dir / "meta.json").is_file():
        return True
    return all((out_dir / f"{split}.bin").is_file() for split in ("train", "val")) and not any(out_dir.glob("*.tmp"))


def already_prepared(out_dir, force: bool) -> bool:
    """For the prepare scripts of fixed datasets: True (and says so) when out_dir is complete and not --force."""
    if force or not is_prepared(out_dir):
        return False
    print(f"{out_dir} is already prepared; pass --force to prepare it again")
    return True


class PreparedFolder:
    """A data folder being (re)written: outputs go to `<name>.tmp` files that commit() renames into place.

    Used as a context manager, which holds the folder's writer lock (a second preparation of the same
    folder is refused while this one lives) and refuses to replace a complete dataset unless `force`.
    If the body raises (or is interrupted) before commit(), the temporary files are removed and the
    folder is as it was. An OSError (full disk, read-only, permission denied) becomes a DataError.
    """

    def __init__(self, out_dir, force: bool = False):
        self.out_dir = Path(out_dir)
        self.force = force
        self._temps = {}  # final path -> temporary path
        self._lock = FolderLock(self.out_dir, "data preparation")
        self._committing = False

    def __enter__(self):
        try:
            self._lock.acquire()
        except UserError as exc:
            raise DataError(str(exc)) from None
        if not self.force and is_prepared(self.out_dir):
            self._lock.release()
            raise DataError(f"{self.out_dir} already holds a complete dataset: pass --force to replace it, "
                            "or choose another --out_dir")
        return self

    def temp(self, name: str) -> Path:
        final = self.out_dir / name
        self._temps[final] = final.with_name(final.name + ".tmp")
        return self._temps[final]

    def commit(self, meta: dict) -> None:
        """Make the new bins and meta.json the folder's content, so that at every moment it either loads
        as the old dataset, loads as the new one, or refuses to load (never a mix that loads):

        1. meta.json.tmp is written and every temporary file made durable; the old dataset is untouched.
        2. the old meta.json is renamed aside (not deleted): from here the folder has no meta.json and
           has *.tmp files, which the loader refuses as an interrupted preparation;
        3. the bins are renamed into place, meta.json.tmp last; the folder is fsynced, the old
           meta.json removed.

        meta.json also records each bin's largest token id (`max_token_ids`, {split: id}), so that a
        loader can check the ids against a model's vocabulary without reading the bins.
        """
        meta = {**meta, "max_token_ids": {final.stem: bin_max_id(temp, meta["dtype"]) for final, temp in
                                          self._temps.items() if final.name in ("train.bin", "val.bin")}}
        meta_path, backup = self.out_dir / "meta.json", self.out_dir / META_BACKUP
        with open(self.temp("meta.json"), "wb") as f:
            f.write(json.dumps(meta, ensure_ascii=False, indent=1).encode("utf-8"))
            fsync_file(f)
        fsync_dir(self.out_dir)
        self._committing = True
        if meta_path.exists():
            os.replace(meta_path, backup)
        try:
            renamed = 0
            for final, temp in self._temps.items():
                if final != meta_path:
                    os.replace(temp, final)
                    renamed += 1
        except BaseException:
            if renamed == 0 and backup.exists():  # nothing replaced yet: the old dataset is whole again
                os.replace(backup, meta_path)
                self._committing = False
            raise
        os.replace(self._temps[meta_path], meta_path)
        self._temps, self._committing = {}, False  # the new dataset is in place
        fsync_dir(self.out_dir)
        try:
            backup.unlink(missing_ok=True)
        except OSError:  # a leftover hidden file; the next preparation replaces it
            pass

    def __exit__(self, exc_type, exc, tb):
        try:
            if not self._committing:  # a failed commit keeps its *.tmp files: they mark the folder unfinished
                for temp in self._temps.values():
                    try:
                        temp.unlink(missing_ok=True)
                    except OSError:
                        pass
            self._temps = {}
        finally:
            self._lock.release()
        if isinstance(exc, OSError):
            where = f" ({exc.filename})" if exc.filename else ""
            state = ("the folder is left unfinished and refuses to load: run the preparation again"
                     if self._committing else "the folder is as it was")
            raise DataError(f"cannot write the dataset in {self.out_dir}: {os_reason(exc)}{where}; {state}. "
                            "Free disk space or choose a writable --out_dir") from None
        return False


def bin_max_id(path, dtype: str) -> int:
    """The largest token id in a bin (-1 for an empty one), read in blocks of 4M tokens with plain reads:
    bounded memory (a map of the bin would count every page read in the process's RSS, ~the bin's size)."""
    largest = -1
    with open(path, "rb") as f:
        while (block := np.fromfile(f, dtype=DTYPES[dtype], count=1 << 22)).size:
            largest = max(largest, int(block.max()))
    return largest


# ----------------------------------------------------------------------------- prepare scripts' command line

def default_num_proc() -> int:
    return os.cpu_count() or 1


def num_proc(value: str) -> int:
    """argparse type of --num_proc: 1 .. 4x the cores (more processes than that only cost memory)."""
    import argparse

    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    limit = 4 * default_num_proc()
    if not 1 <= n <= limit:
        raise argparse.ArgumentTypeError(f"{n} must be between 1 and {limit} (this machine has "
                                         f"{default_num_proc()} cores; more processes only add memory)")
    return n


TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
KNOWN_SHA256 = {TINY_SHAKESPEARE_URL: "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"}  # 1,115,394 bytes


def local_or_downloaded_text(input_path, local_path, url: str) -> str:
    """The text of --input if given, else of local_path, downloading url there first if it is missing."""
    if input_path is None:
        input_path = Path(local_path)
        if not input_path.is_file():
            print(f"downloading {url} -> {input_path}")
            download(url, input_path, sha256=KNOWN_SHA256.get(url), error=DataError,
                     hint="download it by hand and pass --input PATH")
    return read_text(input_path)


def read_text(path) -> str:
    """A UTF-8 text file (universal newlines, as nanoGPT reads it), or a DataError naming it."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"input file {path} not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
