"""Tiny Shakespeare as characters: train.bin / val.bin (uint16) and meta.json in this folder.

    python data/shakespeare_char/prepare.py                 # input.txt here, else downloads it
    python data/shakespeare_char/prepare.py --input PATH    # a local copy of the text

Vocabulary = the sorted unique characters (65), ids in that order; the first 90% of the characters
are train, the last 10% val. The bins are byte-identical to nanoGPT's, so old folders keep working.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from a plain checkout

from forge.errors import ArgumentParser, run_main  # noqa: E402
from forge.tokenize import (TINY_SHAKESPEARE_URL, already_prepared, char_meta,  # noqa: E402
                            local_or_downloaded_text, write_text_split)

HERE = Path(__file__).resolve().parent


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, help="Tiny Shakespeare text (default: input.txt here, else download)")
    parser.add_argument("--out_dir", type=Path, default=HERE, help="where the bins and meta.json go (default: here)")
    parser.add_argument("--force", action="store_true", help="prepare again even if the folder is already complete")
    args = parser.parse_args(argv)
    if already_prepared(args.out_dir, args.force):
        return

    text = local_or_downloaded_text(args.input, HERE / "input.txt", TINY_SHAKESPEARE_URL)
    meta = char_meta(sorted(set(text)))  # nanoGPT's vocabulary: the sorted unique characters
    counts = write_text_split(text, args.out_dir, meta, force=args.force)
    print(f"{len(text):,} characters, vocab {meta['vocab_size']}: train {counts['train']:,} tokens, "
          f"val {counts['val']:,} tokens -> {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
