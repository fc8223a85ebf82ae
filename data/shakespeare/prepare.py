"""Tiny Shakespeare in GPT-2 BPE: train.bin / val.bin (uint16) and meta.json in this folder.

    python data/shakespeare/prepare.py                 # input.txt here, else downloads it
    python data/shakespeare/prepare.py --input PATH    # a local copy of the text

The first 90% of the characters are train, the last 10% val (the same split as shakespeare_char),
each encoded with tiktoken's "gpt2" encode_ordinary: 301,966 and 36,059 tokens, as nanoGPT makes them.
This is the dataset of config/finetune_shakespeare.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from a plain checkout

from forge.errors import ArgumentParser, run_main  # noqa: E402
from forge.tokenize import (TINY_SHAKESPEARE_URL, already_prepared, default_num_proc, gpt2_meta,  # noqa: E402
                            local_or_downloaded_text, num_proc, write_text_split)

HERE = Path(__file__).resolve().parent


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, help="Tiny Shakespeare text (default: input.txt here, else download)")
    parser.add_argument("--out_dir", type=Path, default=HERE, help="where the bins and meta.json go (default: here)")
    parser.add_argument("--num_proc", type=num_proc, default=default_num_proc(), help="tokenizer processes (default: all cores)")
    parser.add_argument("--force", action="store_true", help="prepare again even if the folder is already complete")
    args = parser.parse_args(argv)
    if already_prepared(args.out_dir, args.force):
        return

    text = local_or_downloaded_text(args.input, HERE / "input.txt", TINY_SHAKESPEARE_URL)
    counts = write_text_split(text, args.out_dir, gpt2_meta(), num_proc=args.num_proc, force=args.force)
    print(f"{len(text):,} characters: train {counts['train']:,} tokens, val {counts['val']:,} tokens -> {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
