"""Your own corpus -> train.bin / val.bin / meta.json, ready for `train.py --dataset=NAME`.

    python data/text/prepare.py notes.txt                        # -> data/notes (GPT-2 BPE)
    python data/text/prepare.py books/ --out_dir data/books      # every .txt and .jsonl under books/
    python data/text/prepare.py chats.jsonl --text_field body    # one document per JSON line
    python data/text/prepare.py poems.txt --tokenizer char       # a character vocabulary
    python data/text/prepare.py qa.jsonl --format prompt_response # fine-tuning pairs: loss on responses only
    python data/text/prepare.py src/ --tokenizer bpe --vocab_size 8192   # a BPE trained on this corpus

Inputs are .txt files (each one document), .jsonl files (one JSON object per line, each one
document, its text in --text_field) or directories of them (searched recursively, in sorted
order); other files named explicitly are read as text. With --tokenizer gpt2 (for fine-tuning
GPT-2) every document ends with the end-of-text token 50256; with --tokenizer char the vocabulary
is the sorted unique characters of the corpus; with --tokenizer bpe a byte-level BPE of
--vocab_size ids is trained on the corpus first (stored as tokenizer.json, referenced from
meta.json) and every document ends with its end-of-text token. The last --val_fraction of the
token stream is val.
Files are streamed, so memory stays bounded whatever the corpus size.

--format prompt_response reads .jsonl rows {"prompt": ..., "response": ...} (names set by
--prompt_field / --response_field; the prompt holds whatever template or separator you want the model
to see, nothing is added but the end-of-text token after the response). Each example is the prompt's
tokens then the response's (then 50256 with GPT-2 BPE); train.bin/val.bin keep their format, and
beside them `<split>.mask.bin` (uint8, one per token: 1 where the token is a target the loss counts,
i.e. the response and its end-of-text) and `<split>.starts.bin` (little-endian int64: where each
example starts). meta.json says "loss_mask": true. The last --val_fraction of the examples is val.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from a plain checkout

from tqdm import tqdm  # noqa: E402

from forge.errors import ArgumentParser, run_main  # noqa: E402
from forge.io import fsync_file  # noqa: E402
import numpy as np  # noqa: E402

from forge.tokenize import (BPE_FILE, DTYPES, STARTS_DTYPE, DataError, PreparedFolder, char_meta,  # noqa: E402
                            check_bpe_vocab_size, default_num_proc, get_tokenizer, gpt2_meta, move_tail, num_proc,
                            split_tail, tokenize_to_bin, train_bpe)

DATA = Path(__file__).resolve().parents[1]
CORPUS_SUFFIXES = (".txt", ".jsonl")
BLOCK_CHARS = 1 << 20  # a .txt file is read in blocks of this many characters
EXAMPLES_PER_BATCH = 1024  # prompt/response pairs tokenized per call


def input_files(paths) -> list[Path]:
    """The files to read, in a fixed order: named files as given, directories' .txt/.jsonl files sorted."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES)
            if not found:
                raise DataError(f"no .txt or .jsonl files under {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path} not found")
    return files


def _text_blocks(path: Path):
    """A .txt file's text in blocks (universal newlines, as nanoGPT reads text)."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            while block := f.read(BLOCK_CHARS):
                yield block
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason}); convert it to UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None


def _jsonl_records(path: Path, fields: list, option: str):
    """(the values of `fields`) of each non-empty line of a .jsonl file, or a DataError naming file:line."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{path}:{line_number}: not valid JSON ({exc})") from None
                bad = [name for name in fields if not isinstance(record, dict) or not isinstance(record.get(name), str)]
                if bad:
                    raise DataError(f"{path}:{line_number}: expected a JSON object with a text field {bad[0]!r} "
                                    f"(choose the field with {option})")
                yield tuple(record[name] for name in fields)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason}); convert it to UTF-8") from None


def _jsonl_documents(path: Path, text_field: str):
    for (text,) in _jsonl_records(path, [text_field], "--text_field"):
        yield text


def prompt_response_pairs(files, prompt_field: str, response_field: str):
    """(prompt, response) of every row of the .jsonl files, in order."""
    for path in files:
        if path.suffix != ".jsonl":
            raise DataError(f"{path}: --format prompt_response reads .jsonl files (one JSON object per line)")
        yield from _jsonl_records(path, [prompt_field, response_field], "--prompt_field / --response_field")


def documents(files, text_field: str):
    """Every document of the corpus: a .txt file as a stream of blocks, each .jsonl record as a str."""
    for path in files:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        else:
            yield _text_blocks(path)


def corpus_characters(docs) -> list[str]:
    """The sorted unique characters of the documents (a first streaming pass, for --tokenizer char)."""
    chars = set()
    for doc in tqdm(docs, desc="vocabulary", unit="doc", delay=1.0):
        for part in (doc,) if isinstance(doc, str) else doc:
            chars.update(part)
    return sorted(chars)


def write_examples(pairs, folder: PreparedFolder, meta: dict, val_fraction: float) -> dict:
    """Tokenize (prompt, response) pairs into the folder's train/val bins, loss masks and example starts,
    then commit it with meta (plus "loss_mask": true). Returns {split: number of examples}."""
    tokenizer = get_tokenizer(meta)
    eot = [] if tokenizer.eot_token is None else [tokenizer.eot_token]
    dtype = DTYPES[meta["dtype"]]
    starts, num_tokens = [], 0
    with open(folder.temp("train.bin"), "wb") as tokens_file, open(folder.temp("train.mask.bin"), "wb") as mask_file:
        for batch in _batched(tqdm(pairs, desc="examples", unit="ex", delay=1.0), EXAMPLES_PER_BATCH):
            prompts = tokenizer.encode_batch([prompt for prompt, _ in batch])
            responses = tokenizer.encode_batch([response for _, response in batch])
            for prompt, response in zip(prompts, responses):
                ids = np.asarray([*prompt, *response, *eot], dtype=np.int64)
                mask = np.zeros(len(ids), dtype=np.uint8)
                mask[len(prompt):] = 1  # the response and its end-of-text are the targets
                starts.append(num_tokens)
                num_tokens += len(ids)
                tokens_file.write(ids.astype(dtype).tobytes())
                mask_file.write(mask.tobytes())
        for f in (tokens_file, mask_file):
            fsync_file(f)
    num_val = int(len(starts) * val_fraction)
    num_train = len(starts) - num_val
    if num_train == 0 or num_val == 0:
        raise DataError(f"{len(starts)} prompt/response example(s) are too few to split with --val_fraction "
                        f"{val_fraction}: add examples or change --val_fraction")
    cut = starts[num_train]
    move_tail(folder.temp("train.bin"), folder.temp("val.bin"), cut * dtype.itemsize)
    move_tail(folder.temp("train.mask.bin"), folder.temp("val.mask.bin"), cut)
    starts = np.asarray(starts, dtype=STARTS_DTYPE)
    for split, split_starts in (("train", starts[:num_train]), ("val", starts[num_train:] - cut)):
        with open(folder.temp(f"{split}.starts.bin"), "wb") as f:
            f.write(split_starts.tobytes())
            fsync_file(f)
    folder.commit({**meta, "loss_mask": True})
    return {"train": num_train, "val": num_val}


def _batched(items, n: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def corpus_texts(files, text_field: str):
    """The corpus as str pieces (a .txt file's blocks, each .jsonl record), for training a tokenizer."""
    for doc in documents(files, text_field):
        yield from (doc,) if isinstance(doc, str) else doc


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help=".txt / .jsonl files or directories of them")
    parser.add_argument("--out_dir", type=Path, help="output folder (default: data/<name of the first input>)")
    parser.add_argument("--tokenizer", choices=("gpt2", "char", "bpe"), default="gpt2",
                        help="GPT-2 BPE, characters, or a BPE trained on this corpus")
    parser.add_argument("--vocab_size", type=int, help="ids of the trained BPE (--tokenizer bpe; default 8192)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="last fraction of the tokens kept for val")
    parser.add_argument("--text_field", default="text", help="the text field of .jsonl records")
    parser.add_argument("--format", choices=("text", "prompt_response"), default="text",
                        help="documents, or .jsonl prompt/response pairs trained on the response only")
    parser.add_argument("--prompt_field", default="prompt", help="--format prompt_response: the prompt's field")
    parser.add_argument("--response_field", default="response", help="--format prompt_response: the response's field")
    parser.add_argument("--num_proc", type=num_proc, default=default_num_proc(), help="tokenizer processes (default: all cores)")
    parser.add_argument("--force", action="store_true", help="replace the dataset already in --out_dir")
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        raise DataError(f"--val_fraction {args.val_fraction} must be between 0 and 1 (exclusive)")
    if args.vocab_size is not None and args.tokenizer != "bpe":
        raise DataError("--vocab_size is for --tokenizer bpe only (GPT-2's and a char vocabulary's size are fixed)")
    vocab_size = 8192 if args.vocab_size is None else args.vocab_size
    if args.tokenizer == "bpe":
        check_bpe_vocab_size(vocab_size)
    if args.format == "prompt_response" and args.tokenizer == "bpe":
        raise DataError("--format prompt_response takes --tokenizer gpt2 or char: train a BPE on the corpus in a text "
                        "preparation first, or fine-tune with GPT-2's tokenizer")
    files = input_files(args.inputs)
    out_dir = args.out_dir or DATA / Path(args.inputs[0]).resolve().stem

    pairs = args.format == "prompt_response"
    if args.tokenizer == "char":
        texts = (prompt + response for prompt, response in prompt_response_pairs(
            files, args.prompt_field, args.response_field)) if pairs else documents(files, args.text_field)
        chars = corpus_characters(texts)
        if not chars:
            raise DataError(f"the inputs hold no text: {', '.join(map(str, args.inputs))}")
        meta = char_meta(chars)
    else:
        meta = gpt2_meta()
    if pairs:
        with PreparedFolder(out_dir, force=args.force) as folder:
            examples = write_examples(prompt_response_pairs(files, args.prompt_field, args.response_field),
                                      folder, meta, args.val_fraction)
        print(f"{len(files)} file(s), {meta['tokenizer']} vocab {meta['vocab_size']:,}: train {examples['train']:,} "
              f"examples, val {examples['val']:,} examples (loss on responses only) -> {out_dir}")
        return
    with PreparedFolder(out_dir, force=args.force) as folder:
        encode_meta = meta
        if args.tokenizer == "bpe":  # trained first; the workers read it from where it waits to be committed
            meta = train_bpe(corpus_texts(files, args.text_field), vocab_size, folder.temp(BPE_FILE))
            encode_meta = {**meta, "tokenizer_file": str(folder.temp(BPE_FILE).resolve())}
        train = folder.temp("train.bin")
        written = tokenize_to_bin(documents(files, args.text_field), train, encode_meta, num_proc=args.num_proc,
                                  append_eot=meta["tokenizer"] != "char", desc="tokens")
        if written.characters == 0:
            raise DataError(f"the inputs hold no text: {', '.join(map(str, args.inputs))}")
        total = written.tokens
        num_train, num_val = split_tail(train, folder.temp("val.bin"), meta["dtype"], args.val_fraction)
        if num_train == 0 or num_val == 0:
            raise DataError(f"{total} tokens are too few to split with --val_fraction {args.val_fraction}: "
                            "add text or change --val_fraction")
        folder.commit(meta)
    print(f"{len(files)} file(s), {meta['tokenizer']} vocab {meta['vocab_size']:,} ({meta['dtype']}): "
          f"train {num_train:,} tokens, val {num_val:,} tokens -> {out_dir}")
    if out_dir.resolve().parent == DATA:
        print(f"train with: python train.py ... --dataset={out_dir.name}")


if __name__ == "__main__":
    run_main(main)
