"""Export a training run to Hugging Face GPT-2 format (config.json + model.safetensors).

    python -m forge.export out-owt gpt2-mine
    python -c "import transformers; transformers.GPT2LMHeadModel.from_pretrained('gpt2-mine')"

The rows that the vocabulary was padded with for speed (50304 -> 50257) are dropped, using the
run's tokenizer metadata (data/<dataset>/meta.json, or --meta). Any parallelism's checkpoint works:
checkpoints are full state dicts. The export is atomic and never overwrites a folder that is not an
earlier export. Architecture options that GPT-2 cannot express (rotary, RMSNorm, ...) are refused.
"""
import sys

from forge.errors import ArgumentParser, UserError, run_main
from forge.inference import load_for_inference
from forge.tokenize import write_hf_tokenizer


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="python -m forge.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="the training run (its ckpt.pt) to export")
    parser.add_argument("dest", help="folder to write: new, empty, or an earlier export")
    parser.add_argument("--meta", default="", help="the run's meta.json when data/<dataset> is not on this machine")
    args = parser.parse_args(argv)

    loaded = load_for_inference(args.out_dir, "resume", "cpu", args.meta)
    if not hasattr(loaded.model, "save_pretrained"):
        raise UserError(f"{loaded.source} is a {type(loaded.model).__name__}, which has no GPT-2 equivalent to export to")
    loaded.model.save_pretrained(args.dest, vocab_size=loaded.meta["vocab_size"])
    if loaded.meta["tokenizer"] == "bpe":  # the dataset's own tokenizer goes with the model
        write_hf_tokenizer(loaded.meta, loaded.meta_dir, args.dest)
    print(f"exported {loaded.source} to {args.dest} (GPT-2 format, vocabulary {loaded.meta['vocab_size']}, "
          f"{loaded.meta['tokenizer']} tokenizer)")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
