"""HellaSwag, completion style: which of 4 endings does the model find most likely after the context?

The protocol is Karpathy's build-nanogpt `hellaswag.py` (the numbers are comparable with it):
each example is rendered as 4 rows `context tokens + ending tokens`, the ending encoded with a
leading space (`" " + ending`, as GPT-2's BPE expects). The model scores every row with the
cross-entropy of each ending token given everything before it; then

- `acc`      counts the example right when the ending with the lowest *summed* loss is the label;
- `acc_norm` counts it right when the ending with the lowest *mean* loss (sum / number of ending
  tokens) is the label. Length normalisation removes the bias towards short endings.

References on the 10,042-example validation set: GPT-2 124M acc 0.2859, acc_norm 0.2955;
GPT-2 XL acc 0.3842, acc_norm 0.4893 (build-nanogpt); the Eleuther harness (multiple-choice style)
reports 0.2892 / 0.3114 for 124M. A row longer than the model's context keeps its last
`block_size` tokens (never the case for GPT-2's 1024).

Only GPT-2 BPE models can take it (the text is English with arbitrary characters).
"""
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from forge.distributed import all_reduce_mean, broadcast_object
from forge.errors import UserError
from forge.io import download as io_download
from forge.tokenize import get_tokenizer

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_VAL_EXAMPLES = 10_042
DEFAULT_CACHE_DIR = Path("data") / "hellaswag"  # next to the prepared datasets; git-ignored


class HellaSwagError(UserError):
    """A HellaSwag file that cannot be read, downloaded or used with this model."""


def check_tokenizer(tokenizer_name: str) -> None:
    """HellaSwag needs the GPT-2 BPE; a char model cannot encode its text."""
    if tokenizer_name != "gpt2":
        raise HellaSwagError(
            f"HellaSwag needs a model with the GPT-2 BPE tokenizer, but this one uses '{tokenizer_name}'; "
            "train on a GPT-2 tokenized dataset (e.g. data/shakespeare, data/openwebtext) or turn HellaSwag off"
        )


def download(url: str, path: Path) -> Path:
    """Fetch url to path: length-checked, retried, atomic (forge.io.download)."""
    return io_download(url, path, error=HellaSwagError,
                       hint="download it yourself and pass its path with --input (evaluate.py) or --hellaswag_path "
                            "(train.py)")


def _check_example(example, where: str) -> dict:
    """The fields the scorer uses, with types; anything else is an error naming file:line."""
    if not isinstance(example, dict):
        raise HellaSwagError(f"{where}: expected a JSON object, got {type(example).__name__}")
    ctx, endings, label = example.get("ctx"), example.get("endings"), example.get("label")
    if not isinstance(ctx, str) or not ctx.strip():
        raise HellaSwagError(f"{where}: 'ctx' must be a non-empty string")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise HellaSwagError(f"{where}: 'endings' must be a list of at least 2 strings")
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise HellaSwagError(f"{where}: 'label' must be an index into 'endings' (0..{len(endings) - 1}), got {label!r}")
    return {"ctx": ctx, "endings": endings, "label": label}


def read_examples(path: str | Path, limit: int | None = None) -> list[dict]:
    """The examples of a HellaSwag jsonl file (the first `limit` if given), validated line by line."""
    path = Path(path)
    if not path.is_file():
        raise HellaSwagError(f"HellaSwag file {path} not found; pass an existing jsonl with --input, or omit it to download")
    examples = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if limit is not None and len(examples) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    example = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise HellaSwagError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                examples.append(_check_example(example, f"{path}:{lineno}"))
        except UnicodeDecodeError:
            raise HellaSwagError(f"{path}: not UTF-8 text; is it the HellaSwag jsonl?") from None
    if not examples:
        raise HellaSwagError(f"{path} has no examples")
    return examples


def load_hellaswag(input_path: str | Path | None = None, cache_dir: str | Path = DEFAULT_CACHE_DIR,
                   limit: int | None = None, rank: int = 0) -> list[dict]:
    """The validation examples: from input_path, else from cache_dir, downloading the official file once.

    In a process group (every rank calls this with its rank), rank 0 reads, and if needed
    downloads, first while the others wait, so the file is fetched once; a problem is then raised
    on every rank (rank 0 reports it).
    """
    error = None
    if rank == 0:
        try:
            examples = _load_hellaswag(input_path, cache_dir, limit)
        except HellaSwagError as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error is not None:
        raise HellaSwagError(error)
    return examples if rank == 0 else _load_hellaswag(input_path, cache_dir, limit)


def _load_hellaswag(input_path, cache_dir, limit) -> list[dict]:
    if limit is not None and limit < 1:
        raise HellaSwagError(f"HellaSwag limit must be a positive number of examples, got {limit}")
    if input_path:
        return read_examples(input_path, limit)
    path = Path(cache_dir) / "hellaswag_val.jsonl"
    if not path.is_file():
        print(f"HellaSwag: downloading {HELLASWAG_VAL_URL} to {path}")
        download(HELLASWAG_VAL_URL, path)
    examples = read_examples(path, limit)
    if limit is None and len(examples) != HELLASWAG_VAL_EXAMPLES:
        raise HellaSwagError(
            f"{path} has {len(examples)} examples, the official validation set has {HELLASWAG_VAL_EXAMPLES}; "
            "delete it to download it again"
        )
    return examples


def render_example(example: dict, tokenizer) -> tuple[list[int], list[list[int]]]:
    """Context tokens and each ending's tokens; the ending gets a leading space as GPT-2's BPE expects."""
    ctx = tokenizer.encode(example["ctx"])
    return ctx, [tokenizer.encode(" " + ending) for ending in example["endings"]]


@torch.no_grad()
def ending_losses(model, rows: list[tuple[list[int], list[int]]], block_size: int, device,
                  autocast=nullcontext()) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of each row's ending tokens given its context, and their counts: two (R,) tensors.

    rows are (context tokens, ending tokens). The input is context + ending without its last token,
    the targets are -1 over the context and the ending tokens after it; a row longer than the
    context window keeps its last block_size positions. Rows are right-padded (the model is causal,
    so padding never changes the positions that are scored).
    """
    inputs, targets = [], []
    for ctx, end in rows:
        seq = ctx + end
        x, y = seq[:-1], [-1] * (len(ctx) - 1) + end
        inputs.append(x[-block_size:])
        targets.append(y[-block_size:])
    width = max(len(x) for x in inputs)
    X = torch.zeros((len(rows), width), dtype=torch.long)
    Y = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (x, y) in enumerate(zip(inputs, targets)):
        X[i, : len(x)] = torch.tensor(x)
        Y[i, : len(y)] = torch.tensor(y)
    X, Y = X.to(device), Y.to(device)
    with autocast:
        logits, _ = model(X, Y)  # (R, T, V): with targets the model returns every position's logits
    losses = F.cross_entropy(logits.float().flatten(0, 1), Y.flatten(), ignore_index=-1, reduction="none")
    return losses.view(Y.shape).sum(dim=1), (Y != -1).sum(dim=1)


@torch.no_grad()
def hellaswag_accuracy(model, examples: list[dict], tokenizer, device, rank: int = 0, world_size: int = 1, *,
                       batch_size: int = 8, autocast=nullcontext()) -> tuple[float, float]:
    """(acc, acc_norm) of the model on the examples, the work split across ranks by example index.

    Rank r scores examples r, r + world_size, ...; the counts are summed over ranks, so every rank
    returns the same numbers. Every rank runs the same number of forward passes (a rank with fewer
    examples scores a dummy batch and discards it), which FSDP's collectives in forward need.
    `batch_size` counts examples per forward (each is len(endings) rows). The model is put in eval
    mode and restored afterwards, so the training loop can call this between steps.
    """
    block_size = _block_size(model)
    mine = list(range(rank, len(examples), world_size))
    steps = math.ceil(math.ceil(len(examples) / world_size) / batch_size)
    counts = torch.zeros(3, dtype=torch.long)  # correct by sum, correct by mean, total
    was_training = model.training
    model.eval()
    try:
        for step in range(steps):
            chunk = [examples[i] for i in mine[step * batch_size : (step + 1) * batch_size]]
            real = bool(chunk)
            rendered = [render_example(ex, tokenizer) for ex in (chunk or examples[:1])]
            rows = [(ctx, end) for ctx, ends in rendered for end in ends]
            sums, ns = ending_losses(model, rows, block_size, device, autocast)
            if not real:
                continue
            sums, ns, start = sums.cpu(), ns.cpu(), 0
            for ex, (_, ends) in zip(chunk, rendered):
                s, n = sums[start : start + len(ends)], ns[start : start + len(ends)]
                start += len(ends)
                counts[0] += int(s.argmin()) == ex["label"]
                counts[1] += int((s / n).argmin()) == ex["label"]
                counts[2] += 1
    finally:
        model.train(was_training)
    if world_size > 1:
        counts = (all_reduce_mean(counts.to(device, torch.float64)) * world_size).round().long().cpu()
    correct, correct_norm, total = counts.tolist()
    return correct / total, correct_norm / total


def _block_size(model) -> int:
    """The context length of a GPT (or a DDP-wrapped one); unbounded for models without a config.block_size."""
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "block_size", None) or 1 << 30


@dataclass
class HellaSwagTask:
    """What the training loop keeps for eval_hellaswag_interval: the examples and the tokenizer, loaded once."""

    examples: list[dict]
    tokenizer: object

    @classmethod
    def load(cls, tokenizer_meta: dict, path: str = "", limit: int = 0, rank: int = 0) -> "HellaSwagTask":
        """For a dataset's metadata (GPT-2 BPE only); path '' = the official file (downloaded once), limit 0 = all."""
        check_tokenizer(tokenizer_meta["tokenizer"])
        return cls(load_hellaswag(path or None, limit=limit or None, rank=rank), get_tokenizer(tokenizer_meta))

    def scores(self, model, device, rank: int = 0, world_size: int = 1, autocast=nullcontext()) -> dict:
        """{'hellaswag_acc': ..., 'hellaswag_acc_norm': ...}, the same on every rank (pass the raw model:
        FSDP2 shards it in place). A model compiled in place sees a new width per batch: after the second,
        torch.compile makes one dynamic-width graph for them, and training's own graph is kept (model.py
        branches on the sequence length in Python, so nothing falls back to eager; tests/test_compile.py)."""
        acc, acc_norm = hellaswag_accuracy(model, self.examples, self.tokenizer, device, rank, world_size,
                                           autocast=autocast)
        return {"hellaswag_acc": acc, "hellaswag_acc_norm": acc_norm}
