"""FineWeb-Edu (or FineWeb) streamed from the Hugging Face Hub, in GPT-2 BPE: train.bin / val.bin / meta.json.

    pip install -e '.[data]'                                   # the Hugging Face `datasets` library
    python data/fineweb/prepare.py                             # FineWeb-Edu sample-10BT -> data/fineweb-edu-sample-10BT
    python data/fineweb/prepare.py --dataset fineweb           # FineWeb sample-10BT (the speed records' data)
    python data/fineweb/prepare.py --max_tokens 500000000      # only the first 500M train tokens
    python data/fineweb/prepare.py --input shards/             # local .parquet or .jsonl files (offline)

Parquet shards (the Hub's, as `datasets` lists them, or local ones) are read with pyarrow one batch at a
time, fetched as they are consumed; nothing is cached on disk. The documents are tokenized in --num_proc
processes (encode_ordinary, one end-of-text token 50256 after each document) and appended to the bins in
stream order, so the bytes are the same for any --num_proc. The val split is fixed: the first --val_documents
documents of the stream (default 20,000: about 14M tokens of FineWeb, 20M of FineWeb-Edu) form
val.bin, every later one goes to train.bin (llm.c, whose val shard the speed records use, also
keeps the start of the stream for validation). --max_tokens stops after that many train tokens.

An interrupted run (Ctrl-C, kill, lost network) leaves only *.tmp files, which the loader refuses;
the same command run again starts over and finishes. Memory stays bounded whatever the size.
"""
import re
import sys
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from a plain checkout

from forge.errors import ArgumentParser, run_main  # noqa: E402
from forge.io import first_line  # noqa: E402
from forge.tokenize import (DataError, PreparedFolder, already_prepared, default_num_proc, gpt2_meta,  # noqa: E402
                            num_proc, tokenize_to_bin)

DATA = Path(__file__).resolve().parents[1]
HUB_DATASETS = {"fineweb-edu": "HuggingFaceFW/fineweb-edu", "fineweb": "HuggingFaceFW/fineweb"}
# the subsets (Hub configs) both datasets have: random samples of ~10B/100B/350B GPT-2 tokens, everything,
# or one Common Crawl dump
SAMPLES = ("sample-10BT", "sample-100BT", "sample-350BT", "default")
DUMP = re.compile(r"CC-MAIN-\d{4}-\d{2}")
LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def check_subset(subset: str) -> None:
    if subset not in SAMPLES and not DUMP.fullmatch(subset):
        raise DataError(f"unknown subset {subset!r}: choose one of {', '.join(SAMPLES)} or a Common Crawl dump "
                        "such as CC-MAIN-2024-10")


def _first_line(exc: Exception) -> str:
    """The exception's class and the first line of its message (forge.io.first_line)."""
    text = first_line(exc)
    return text if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"


def local_files(path: Path) -> tuple[str, list[str]]:
    """(datasets builder, sorted files) of --input: a .parquet/.jsonl file or a folder of one kind of them."""
    if not path.exists():
        raise DataError(f"--input {path} not found")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [p for p in files if p.suffix in LOCAL_BUILDERS]
    kinds = {LOCAL_BUILDERS[p.suffix] for p in files}
    if len(kinds) != 1:
        raise DataError(f"--input {path} must be .parquet files or .jsonl files (one kind), found "
                        f"{'both' if kinds else 'neither'}")
    return kinds.pop(), [str(p) for p in files]


def open_stream(dataset: str, subset: str, input_path: Path | None):
    """The documents' records: the Hub subset's parquet files, or the local files of --input.
    Parquet files, on the Hub or local, are read by parquet_records; jsonl files by `datasets` streaming.
    Local parquet needs only pyarrow and fsspec (`datasets`' own dependencies), not `datasets` itself,
    whose import costs ~2.7 s and ~70 MB."""
    if input_path is not None:
        (builder, files), source = local_files(input_path), str(input_path)
    else:
        builder, files, source = "parquet", None, f"{HUB_DATASETS[dataset]} ({subset})"
    try:
        import fsspec  # noqa: F401 (parquet_records' readers, checked before any reading starts)
        import pyarrow.parquet  # noqa: F401

        if builder == "json" or files is None:
            import datasets
    except ImportError:
        raise DataError("FineWeb needs the Hugging Face `datasets` library: pip install -e '.[data]'") from None
    try:
        if builder == "json":
            return source, datasets.load_dataset("json", data_files=files, split="train", streaming=True)
        if files is None:  # the subset's files (hf:// paths at one revision) as `datasets` resolves them
            files = datasets.load_dataset_builder(HUB_DATASETS[dataset], subset).config.data_files["train"]
    except Exception as exc:  # network, Hub or file format trouble: one line saying which source
        raise DataError(f"cannot open {source} ({_first_line(exc)}); check the network (and HF_ENDPOINT, "
                        "HF_HUB_OFFLINE), or pass --input with local .parquet/.jsonl files") from None
    return source, parquet_records(files)


def parquet_records(files):
    """The text column of parquet files (local paths or fsspec URLs such as the Hub's hf://), as records in order.

    pyarrow's ParquetFile reads a file's footer once and iter_batches decodes one batch when it is asked for.
    `datasets` streaming instead scans a file with a pyarrow dataset scanner, which decodes row groups ahead of a
    reader slower than it (the tokenizer) up to about 1 GB of Arrow memory, and splitting a file into one shard
    per row group (datasets' reshard()) re-opens the file and fetches its footer and a 5 MiB read-ahead block
    again for each. Measured on a FineWeb-sized 2.1 GB shard (616 row groups of 1000 documents, a 2.9 MB footer)
    served over HTTP with range requests like the Hub, reading its first 150 row groups (508 MB) at 20 MB/s:
    the scan held 1.1 GB of Arrow memory (1.8 GB anonymous RSS) and had fetched 1081 MB; one shard per row group
    held 4 MB (311 MB RSS) but fetched 1719 MB in 608 requests (942 MB with 64 KiB read blocks); this reader
    holds 9 MB (170 MB RSS) and fetched 511 MB in 78 requests."""
    import fsspec
    import pyarrow.parquet as pq

    for file in files:
        with fsspec.open(file, "rb") as f:
            parquet = pq.ParquetFile(f)
            # a reader per row group: one iter_batches over a whole FineWeb-shaped file kept what it had read
            # (+3.1 MB of RSS per row group, 1.9 GB after 600)
            for group in range(parquet.num_row_groups):
                for batch in parquet.iter_batches(batch_size=100, row_groups=[group], columns=["text"]):
                    yield from ({"text": text} for text in batch.column(0).to_pylist())


def texts(stream, source: str, local: bool):
    """The text of every record, in stream order; a failed read (a bad file, the network) is one DataError."""
    records = iter(stream)
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as exc:
            advice = "fix or remove the bad file" if local else "run the same command again to start over"
            raise DataError(f"reading {source} failed ({_first_line(exc)}); {advice}") from None
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError(f"{source}: a record has no 'text' string (its fields: {', '.join(record)})")
        yield text


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(HUB_DATASETS), default="fineweb-edu", help="which FineWeb")
    parser.add_argument("--subset", default="sample-10BT", help=f"Hub subset: {', '.join(SAMPLES)} or a CC-MAIN dump")
    parser.add_argument("--input", type=Path, help="local .parquet or .jsonl files (a file or folder) instead of the Hub")
    parser.add_argument("--out_dir", type=Path, help="output folder (default: data/<dataset>-<subset>)")
    parser.add_argument("--max_tokens", type=int, help="stop after this many train tokens (default: the whole subset)")
    parser.add_argument("--val_documents", type=int, default=20_000, help="the first documents, kept for val")
    parser.add_argument("--num_proc", type=num_proc, default=default_num_proc(), help="tokenizer processes (default: all cores)")
    parser.add_argument("--force", action="store_true", help="prepare again even if the folder is already complete")
    args = parser.parse_args(argv)
    check_subset(args.subset)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise DataError(f"--max_tokens {args.max_tokens} must be at least 1")
    if args.val_documents < 1:
        raise DataError(f"--val_documents {args.val_documents} must be at least 1")
    out_dir = args.out_dir or DATA / f"{args.dataset}-{args.subset}"
    if already_prepared(out_dir, args.force):
        return

    source, stream = open_stream(args.dataset, args.subset, args.input)
    documents = texts(stream, source, local=args.input is not None)
    meta = gpt2_meta()
    with PreparedFolder(out_dir, force=args.force) as folder:
        val = tokenize_to_bin(islice(documents, args.val_documents), folder.temp("val.bin"), meta,
                              num_proc=args.num_proc, append_eot=True, desc="val")
        train = tokenize_to_bin(documents, folder.temp("train.bin"), meta, num_proc=args.num_proc, append_eot=True,
                                desc="train", max_tokens=args.max_tokens)
        if train.tokens == 0:
            raise DataError(f"{source} has only {val.documents:,} documents, all taken by val: "
                            "lower --val_documents")
        folder.commit(meta)
    print(f"{source}: val {val.tokens:,} tokens ({val.documents:,} documents), train {train.tokens:,} tokens "
          f"-> {out_dir}")


if __name__ == "__main__":
    run_main(main)
