"""Sample text from a trained model or from GPT-2.

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=3
    python sample.py --out_dir=out --start=FILE:prompt.txt --temperature=0 --max_new_tokens=200

Generation uses the model's KV cache (the prompt is prefilled once, then one token per step).
With one sample, tokens are printed as they are produced (--stream); multi-byte characters are
never split, since text is printed only once its bytes decode completely.
"""
import codecs
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from configurator import MAX_SEED, ConfigError, check_types, load_config
from forge.distributed import resolve_device
from forge.errors import UserError, run_main
from forge.inference import load_for_inference
from forge.precision import autocast, resolve_dtype

SEPARATOR = "---------------"


@dataclass
class SampleConfig:
    out_dir: str = "out"  # training run to sample from (its ckpt.pt), when init_from='resume'
    init_from: str = "resume"  # 'resume' (out_dir), 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local HF GPT-2 folder
    meta: str = ""  # the run's meta.json (or its folder) when data/<dataset>/ is not on this machine
    start: str = ""  # prompt text, or FILE:path to read it from a file; '' starts a document (EOT for BPE, newline for char)
    num_samples: int = 10  # samples to draw, one after the other
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # 1.0 = the model's distribution, lower = more conservative, 0 = greedy
    top_k: int = 200  # keep only the k most likely tokens (0 = no limit)
    top_p: float = 1.0  # keep the most likely tokens covering this probability mass (1.0 = no limit)
    seed: int = 1337  # random seed: the same seed and settings give the same samples
    device: str = "auto"  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N', 'mps'
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # 'auto': bfloat16 if supported, else float16 on cuda, float32 elsewhere
    stream: bool | None = None  # print tokens as they are produced; None: on for one sample, off for several
    stop_at_eot: bool = False  # end a sample at the end-of-text token (GPT-2 BPE models)
    compile: bool = False  # torch.compile the model (nanoGPT's key; pays off only for long samples)

    def __post_init__(self):
        check_types(self)
        if self.num_samples < 1:
            raise ConfigError(f"num_samples={self.num_samples} must be at least 1")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must not be negative")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 = no limit)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1] (1.0 = no limit)")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed={self.seed} must be in 0..{MAX_SEED}")


def read_prompt(start: str) -> str:
    """--start's text: the value itself, or the contents of FILE:path."""
    if not start.startswith("FILE:"):
        return start
    path = Path(start[len("FILE:"):])
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file {path} not found (from --start=FILE:{path})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prompt file {path}: {exc}") from None


def encode_prompt(text: str, tokenizer, block_size: int) -> tuple[list[int], str]:
    """(token ids, the text they show) for a prompt; an empty prompt starts a new document.

    BPE: an empty prompt is the end-of-text token, which is how GPT-2 saw every document start.
    Characters: a newline, when the vocabulary has one (the classic start). A prompt longer than
    the context keeps its last block_size tokens, with a warning.
    """
    if not text:
        if tokenizer.eot_token is not None:
            return [tokenizer.eot_token], ""
        text = "\n"
        if "\n" not in getattr(tokenizer, "itos", []):
            raise UserError("empty prompt, and this character vocabulary has no newline to start from; "
                              "give some text with --start=TEXT")
    try:
        ids = tokenizer.encode(text)
    except UserError as exc:
        raise UserError(f"prompt: {exc}") from None
    if not ids:
        raise UserError("the prompt encodes to no tokens; give some text with --start=TEXT")
    if len(ids) > block_size:
        print(f"warning: the prompt is {len(ids)} tokens, longer than the model's context of {block_size}; "
              f"keeping its last {block_size} tokens", file=sys.stderr, flush=True)
        ids = ids[-block_size:]
        text = tokenizer.decode(ids)
    return ids, text


class IncrementalDecoder:
    """Tokens in, printable text out, never splitting a multi-byte character across two pieces.

    A BPE token can end in the middle of a character's UTF-8 bytes (emoji, CJK). Each token's bytes go
    through an incremental UTF-8 decoder, which holds an incomplete sequence back until the bytes that
    finish it arrive (bytes that can never form a character print as U+FFFD, as decode does).
    Ids the tokenizer does not know (the padded rows of a 50304-entry vocabulary) are skipped.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        if token >= self.tokenizer.vocab_size:
            return ""
        return self.utf8.decode(self.tokenizer.decode_bytes([token]))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


def generate_tokens(model, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                    generator: torch.Generator, device, stop_token: int | None = None, ctx=nullcontext(),
                    vocab_size: int | None = None):
    """Yield the new token ids of one sample as the model produces them (KV-cache generation).

    temperature 0 is greedy; top_k 0 and top_p 1.0 mean no limit. Stops after stop_token (not
    yielded) when it is given. Only ids below vocab_size (the tokenizer's) are drawn: never a padded row.
    """
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    tokens = model.stream(idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                          top_p=top_p if top_p < 1.0 else None, generator=generator, vocab_size=vocab_size)
    with ctx:  # autocast around every forward the stream runs
        for token in tokens:
            token = token.item()
            if token == stop_token:
                return
            yield token


def main(argv: list[str]) -> None:
    cfg = load_config(argv, SampleConfig, prog="sample.py")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    prompt = read_prompt(cfg.start)
    loaded = load_for_inference(cfg.out_dir, cfg.init_from, device, cfg.meta)
    if cfg.compile:
        loaded.model.compile()
    tokenizer, block_size = loaded.tokenizer, loaded.model.config.block_size
    prompt_ids, prompt_text = encode_prompt(prompt, tokenizer, block_size)
    stop_token = None
    if cfg.stop_at_eot:
        if tokenizer.eot_token is None:
            print("warning: --stop_at_eot ignored: a character vocabulary has no end-of-text token",
                  file=sys.stderr, flush=True)
        stop_token = tokenizer.eot_token
    stream = cfg.num_samples == 1 if cfg.stream is None else cfg.stream
    print(f"sampling from {loaded.source} on {device}", file=sys.stderr, flush=True)

    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out = sys.stdout
    for i in range(cfg.num_samples):
        new_tokens = generate_tokens(loaded.model, prompt_ids, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                     cfg.top_p, generator, device, stop_token, autocast(device, dtype),
                                     tokenizer.vocab_size)
        if stream:
            out.write(prompt_text)
            out.flush()
            decoder = IncrementalDecoder(tokenizer)
            for token in new_tokens:
                piece = decoder.push(token)
                if piece:
                    out.write(piece)
                    out.flush()
            out.write(decoder.flush())
        else:  # printed whole at the end: a progress bar on stderr meanwhile (after 2 s, so short runs stay quiet)
            decoder = IncrementalDecoder(tokenizer)
            progress = tqdm(new_tokens, total=cfg.max_new_tokens, desc=f"sample {i + 1}/{cfg.num_samples}",
                            unit="tok", file=sys.stderr, delay=2.0, leave=False, dynamic_ncols=True)
            out.write(prompt_text + "".join(decoder.push(t) for t in progress) + decoder.flush())
        out.write(f"\n{SEPARATOR}\n")
        out.flush()


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
