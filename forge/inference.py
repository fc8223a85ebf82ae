"""The model and tokenizer that sample.py and evaluate.py run: a training run's checkpoint or GPT-2.

    loaded = load_for_inference(out_dir="out-shakespeare-char", init_from="resume", device="cpu")
    loaded.model, loaded.meta, loaded.tokenizer, loaded.source

A run's tokenizer comes from its dataset's metadata (`data/<dataset>/meta.json`, or the run's
`data_dir`, as recorded in the checkpoint's config), or from `meta_path` when the data folder is
not on this machine. GPT-2 (a name or a local Hugging Face folder) always uses the GPT-2 BPE.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from forge.checkpoint import load_model
from forge.data import GPT2_VOCAB_SIZE, load_meta
from forge.errors import UserError
from forge.tokenize import check_same_tokenizer, get_tokenizer, gpt2_meta, tokenizer_identity

META_NAMES = ("meta.json", "meta.pkl")


@dataclass
class Loaded:
    model: torch.nn.Module  # in eval mode, on the device
    meta: dict  # tokenizer metadata (forge.data.load_meta's shape)
    tokenizer: object  # forge.tokenize tokenizer: encode, decode, vocab_size, eot_token
    source: str  # what was loaded, for messages: 'out/ckpt.pt (iter 5000)' or 'gpt2'
    data_dir: Path | None  # the run's data folder (None for GPT-2)
    meta_dir: Path | None = None  # the folder meta came from (--meta's or data_dir), where a trained BPE's file is


def run_data_dir(train_config: dict) -> Path | None:
    """The data folder a training config names: data_dir, else data/<dataset>; None when it names neither."""
    if train_config.get("data_dir"):
        return Path(train_config["data_dir"])
    if train_config.get("dataset"):
        return Path("data") / train_config["dataset"]
    return None


def meta_folder(meta_path) -> Path:
    """The folder of --meta: the path itself if it is a folder, else the folder holding the file."""
    path = Path(meta_path)
    return path if path.is_dir() else path.parent


def meta_from_path(meta_path) -> dict:
    """Metadata from a meta.json / meta.pkl file, or a folder holding one."""
    path = Path(meta_path)
    folder = meta_folder(path)
    if path.is_dir() and not any((path / name).is_file() for name in META_NAMES):
        raise UserError(f"--meta={meta_path}: folder has no meta.json or meta.pkl")
    if not path.is_dir() and (path.name not in META_NAMES or not path.is_file()):
        raise UserError(f"--meta={meta_path} is not an existing meta.json or meta.pkl file (or a folder holding one)")
    return load_meta(folder)


def run_meta(data_dir: Path | None, vocab_size: int, source: str) -> dict:
    """The tokenizer metadata of a run whose data folder is data_dir.

    Without meta.json / meta.pkl there, a model with GPT-2's vocabulary gets GPT-2 BPE (nanoGPT's
    OpenWebText folder has no metadata); any other model needs the file, so we say how to make it.
    """
    if data_dir is not None and any((data_dir / name).is_file() for name in META_NAMES):
        return load_meta(data_dir)
    if vocab_size >= GPT2_VOCAB_SIZE:
        return gpt2_meta()
    where = f"{data_dir}/meta.json" if data_dir is not None else "the run's dataset metadata"
    script = f"python data/{data_dir.name}/prepare.py" if data_dir is not None else "the dataset's prepare.py"
    raise UserError(
        f"{where} not found, and {source} (vocabulary of {vocab_size}) needs it to encode and decode text: "
        f"run `{script}` on this machine or pass --meta=PATH/TO/meta.json"
    )


def check_meta_fits(meta: dict, vocab_size: int, source: str) -> None:
    """A tokenizer with more ids than the model's vocabulary belongs to another model."""
    if meta["vocab_size"] > vocab_size:
        raise UserError(
            f"the tokenizer ({meta['tokenizer']}, {meta['vocab_size']} ids) does not fit {source} "
            f"(vocabulary of {vocab_size}): the metadata belongs to another dataset; pass the run's own with --meta"
        )


def _vocab_size(model) -> int:
    return model.config.vocab_size


def load_for_inference(out_dir: str, init_from: str, device: str, meta_path: str = "") -> Loaded:
    """The model (eval mode, on device) and its tokenizer, from out_dir's checkpoint or from GPT-2.

    init_from: 'resume' reads out_dir/ckpt.pt (written by any parallelism: checkpoints are full
    state dicts); 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local Hugging Face GPT-2
    folder loads those weights with the GPT-2 BPE.
    """
    if init_from == "resume":
        if not Path(out_dir).is_dir():
            raise UserError(f"out_dir {out_dir} does not exist; pass the out_dir of a training run "
                                 "(or --init_from=gpt2 for OpenAI's weights)")
        model, ckpt = load_model(out_dir, device)
        source = f"{Path(out_dir) / 'ckpt.pt'} (iter {ckpt.get('iter_num', '?')})"
        train_config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        data_dir = run_data_dir(train_config)
        meta = meta_from_path(meta_path) if meta_path else run_meta(data_dir, _vocab_size(model), source)
        recorded = ckpt.get("tokenizer")  # None in checkpoints older than this record: the vocabulary check below
    else:
        from model import GPT

        model = GPT.from_pretrained(init_from)
        model.to(device)
        model.eval()
        source, data_dir = init_from, None
        meta = meta_from_path(meta_path) if meta_path else gpt2_meta()
        recorded = tokenizer_identity(gpt2_meta()) if _vocab_size(model) == GPT2_VOCAB_SIZE else None
    check_meta_fits(meta, _vocab_size(model), source)
    where = meta_path or (f"{data_dir}'s metadata" if data_dir is not None else "the GPT-2 BPE")
    check_same_tokenizer(recorded, meta, where, source, "pass the metadata of the data it was trained on with --meta")
    meta_dir = meta_folder(meta_path) if meta_path else data_dir
    return Loaded(model=model, meta=meta, tokenizer=get_tokenizer(meta, meta_dir), source=source, data_dir=data_dir,
                  meta_dir=meta_dir)
