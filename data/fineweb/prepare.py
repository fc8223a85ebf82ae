"""FineWeb-Edu (or FineWeb) streamed from the Hugging Face Hub, in GPT-2 BPE: train.bin / val.bin / meta.json.

    pip install -e '.[data]'                                   # the Hugging Face `datasets` library
    python data/fineweb/prepare.py                             # FineWeb-Edu sample-10BT -> data/fineweb-edu-sample-10BT
    python data/fineweb/prepare.py --dataset fineweb           # FineWeb sample-10BT (the speed records' data)
    python data/fineweb/prepare.py --max_tokens 500000000      # only the first 500M train tokens
    python data/fineweb/prepare.py --input shards/             # local .parquet or .jsonl files (offline)

Documents are read with `datasets` streaming: the parquet shards are fetched as they are consumed and
nothing is cached on disk. They are tokenized in --num_proc processes (encode_ordinary, one
end-of-text token 50256 after each document) and appended to the bins in stream order, so the
bytes are the same for any --num_proc. The val split is fixed: the first --val_documents
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
    """The documents' records, streamed by `datasets`: the Hub subset, or the local files of --input.
    Both are the same streaming reader; only where the files are differs (and local parquet files are read
    one row group per shard: by_row_group)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError("FineWeb needs the Hugging Face `datasets` library: pip install -e '.[data]'") from None
    if input_path is not None:
        builder, files = local_files(input_path)
        source, args = str(input_path), dict(path=builder, data_files=files)
    else:
        builder = "parquet"  # the Hub's FineWeb shards
        source, args = f"{HUB_DATASETS[dataset]} ({subset})", dict(path=HUB_DATASETS[dataset], name=subset)
    if builder == "parquet":
        # only the text column, one row group at a time: with pyarrow's default pre-buffering a shard's
        # buffers pile up until it is finished (+0.7 GB per GB of shard, and FineWeb's are ~2 GB)
        from pyarrow.dataset import ParquetFragmentScanOptions

        args.update(columns=["text"], fragment_scan_options=ParquetFragmentScanOptions(pre_buffer=False))
    try:
        stream = load_dataset(**args, split="train", streaming=True)
    except Exception as exc:  # network, Hub or file format trouble: one line saying which source
        raise DataError(f"cannot open {source} ({_first_line(exc)}); check the network (and HF_ENDPOINT, "
                        "HF_HUB_OFFLINE), or pass --input with local .parquet/.jsonl files") from None
    if builder == "parquet" and input_path is not None:
        stream = by_row_group(stream)
    return source, stream


def by_row_group(stream):
    """The records of a parquet IterableDataset in the same order, read as one shard per row group.

    Scanning a whole file, pyarrow decodes its row groups ahead of a reader slower than it (the tokenizer),
    whatever batch_readahead says, until the file's text column sits decoded in Arrow's memory pool: the
    peak grew with the size of one file (a 120 MB file, 200 MB of text: 218 MB of Arrow memory at once,
    564 MB of anonymous RSS against 375 MB for a 30 MB file). A shard of one row group (datasets'
    reshard()) can only decode that row group: 51 MB of Arrow memory, 337 MB (316 MB for the 30 MB file).
    Each file is split when the stream reaches it (reshard() reads the footer of every file it is given).
    Local files only: on the Hub every row group would open the file and read its footer over the network
    again, which is not measured here."""
    for index in range(stream.num_shards):
        yield from stream.shard(num_shards=stream.num_shards, index=index).reshard()


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
