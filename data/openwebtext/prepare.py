"""OpenWebText in GPT-2 BPE: train.bin (~9B tokens, ~17 GB) and val.bin (~4M tokens) plus meta.json here.

    pip install -e '.[data]'          # the Hugging Face `datasets` library
    python data/openwebtext/prepare.py --num_proc 16

The 8,013,769 documents come from the Hugging Face hub through `datasets` (about 55 GB of download
and cache), are split like nanoGPT's (train_test_split(test_size=0.0005, seed=2357, shuffle=True),
'test' renamed 'val'), and are tokenized with encode_ordinary and one end-of-text token (50256)
after each document, in dataset order: the bins equal nanoGPT's. Tokenizing streams through the
shared pipeline, so memory stays bounded (well under 2 GB) whatever --num_proc.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from a plain checkout

from forge.errors import ArgumentParser, run_main  # noqa: E402
from forge.io import first_line  # noqa: E402
from forge.tokenize import (DataError, PreparedFolder, already_prepared, default_num_proc,  # noqa: E402
                            gpt2_meta, num_proc, tokenize_to_bin)

HERE = Path(__file__).resolve().parent
HUB_DATASET = "Skylion007/openwebtext"  # the hub id that the old short name "openwebtext" redirects to
VAL_SIZE, SPLIT_SEED = 0.0005, 2357      # nanoGPT's split
READ_BATCH = 1024                        # documents read from the Arrow cache at a time


def load_splits(name: str, num_proc: int):
    """{'train': Dataset, 'val': Dataset}: the hub dataset (or a local folder of data files) split as nanoGPT does."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError("OpenWebText needs the `datasets` library: pip install -e '.[data]'") from None
    try:
        dataset = load_dataset(name, num_proc=num_proc)
    except Exception as exc:  # network, hub or format trouble: say which dataset and how to point elsewhere
        raise DataError(f"could not load dataset {name!r} ({type(exc).__name__}: {first_line(exc)}); check the network, "
                        "or pass --dataset with another hub id or a local folder of .parquet/.jsonl files") from None
    if "train" not in dataset or "text" not in dataset["train"].column_names:
        raise DataError(f"dataset {name!r} needs a 'train' split with a 'text' column")
    splits = dataset["train"].train_test_split(test_size=VAL_SIZE, seed=SPLIT_SEED, shuffle=True)
    return {"train": splits["train"], "val": splits["test"]}


def texts(split):
    for batch in split.iter(batch_size=READ_BATCH):
        yield from batch["text"]


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", type=Path, default=HERE, help="where the bins and meta.json go (default: here)")
    parser.add_argument("--num_proc", type=num_proc, default=default_num_proc(),
                        help="processes for downloading and tokenizing (default: all cores)")
    parser.add_argument("--dataset", default=HUB_DATASET, help=f"hub id or local data folder (default: {HUB_DATASET})")
    parser.add_argument("--force", action="store_true", help="prepare again even if the folder is already complete")
    args = parser.parse_args(argv)
    if already_prepared(args.out_dir, args.force):
        return

    meta = gpt2_meta()
    with PreparedFolder(args.out_dir, force=args.force) as folder:  # locked first: a second run stops here
        splits = load_splits(args.dataset, args.num_proc)
        counts = {name: tokenize_to_bin(texts(split), folder.temp(f"{name}.bin"), meta, num_proc=args.num_proc,
                                        append_eot=True, total_documents=len(split), desc=name).tokens
                  for name, split in splits.items()}
        folder.commit(meta)
    print(f"train {counts['train']:,} tokens, val {counts['val']:,} tokens -> {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
