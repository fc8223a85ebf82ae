"""Export a training run to a Hugging Face GPT-2 folder: config.json, model.safetensors and the tokenizer.

    python -m forge.export out-owt gpt2-mine
    python -c "from transformers import pipeline; print(pipeline('text-generation', model='gpt2-mine')('Hello'))"

The rows that the vocabulary was padded with for speed (50304 -> 50257) are dropped, using the
run's tokenizer metadata (data/<dataset>/meta.json, or --meta), so a GPT-2 BPE run gives a plain
GPT-2 folder with GPT-2's tokenizer files: transformers' AutoTokenizer and pipeline encode and
decode as sample.py does. A character-level run gets a tokenizer.json of one token per character
(PreTrainedTokenizerFast). Any parallelism's checkpoint works: checkpoints are full state dicts.
The export is atomic and never overwrites a folder that is not an earlier export. Architecture
options that GPT-2 cannot express (rotary, RMSNorm, ...) are refused.
"""
import sys

from forge.errors import ArgumentParser, UserError, run_main
from forge.inference import load_for_inference


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="python -m forge.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="the training run (its ckpt.pt) to export")
    parser.add_argument("dest", help="folder to write: new, empty, or an earlier export")
    parser.add_argument("--meta", default="", help="the run's meta.json when data/<dataset> is not on this machine")
    args = parser.parse_args(argv)

    loaded = load_for_inference(args.out_dir, "resume", "cpu", args.meta)
    if not hasattr(loaded.model, "save_pretrained"):
        raise UserError(f"{loaded.source} is a {type(loaded.model).__name__}, which has no GPT-2 equivalent to export to")
    tokenizer_files = loaded.model.save_pretrained(args.dest, meta=loaded.meta, tokenizer_dir=loaded.meta_dir)
    tokenizer = (f"{loaded.meta['tokenizer']} tokenizer: {', '.join(tokenizer_files)}" if tokenizer_files else
                 f"no tokenizer files: transformers cannot load a {loaded.meta['tokenizer']!r} tokenizer from it")
    print(f"exported {loaded.source} to {args.dest} (GPT-2 format, vocabulary {loaded.meta['vocab_size']}, {tokenizer})")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
