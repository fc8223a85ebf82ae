"""Hugging Face GPT-2 format in and out: the adapter between model.py's GPT and transformers'
GPT2LMHeadModel folders (config.json, model.safetensors, tokenizer files).

    model = GPT.from_pretrained("gpt2")           # model.py calls load_pretrained here
    save_pretrained(model, "gpt2-mine", vocab_size=50257, meta={"tokenizer": "gpt2"})

Everything that knows Hugging Face's side lives here: parameter names (ours are GPT-2's, under
`transformer.`), the Conv1D transposes, the config.json fields and which of their values our GPT
computes exactly, sharded and pytorch_model.bin reading, the Hub download, and the tokenizer files
of an export. OPTIONS_GPT2_LACKS is the one list of GPTConfig options a GPT-2 config cannot express.

The tokenizer files of a GPT-2 BPE export (vocab.json, merges.txt, tokenizer.json,
tokenizer_config.json, special_tokens_map.json) are derived from tiktoken's 'gpt2' encoding, so
that transformers' AutoTokenizer and pipeline encode and decode exactly as sample.py does. A
character-level vocabulary becomes a tokenizer.json of one token per character (needs the
`tokenizers` package, which transformers depends on).
"""
import json
from pathlib import Path

import torch

from forge.io import first_line, os_reason, replacing_folder
from forge.tokenize import GPT2_EOT, GPT2Tokenizer, bpe_tokenizer_files
from model import GPTConfig, ModelError

# The Hugging Face Hub repositories of OpenAI's GPT-2 checkpoints, and their sizes.
PRETRAINED = {
    "gpt2": "openai-community/gpt2",  # 124M params: 12 layers, 12 heads, 768 wide
    "gpt2-medium": "openai-community/gpt2-medium",  # 350M: 24 layers, 16 heads, 1024 wide
    "gpt2-large": "openai-community/gpt2-large",  # 774M: 36 layers, 20 heads, 1280 wide
    "gpt2-xl": "openai-community/gpt2-xl",  # 1558M: 48 layers, 25 heads, 1600 wide
}
# HF GPT-2 stores these as Conv1D, (in, out): our nn.Linear is (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPTConfig.mlp <-> config.json activation_function; gelu_new, gelu_pytorch_tanh and gelu_fast are
# all the tanh approximation, "gelu" is the exact erf form
MLP_TO_HF = {"gelu": "gelu_new", "gelu_exact": "gelu"}
HF_TO_MLP = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu", "gelu": "gelu_exact"}
# The GPTConfig options a GPT-2 config cannot express, each with the test of whether a config
# uses it. (bias=False exports zero biases, untied_head is tie_word_embeddings=false and
# zero_init_proj is only an initialisation: those export.)
OPTIONS_GPT2_LACKS = {
    "rotary": lambda c: c.rotary,
    "rmsnorm": lambda c: c.rmsnorm,
    "qk_norm": lambda c: c.qk_norm,
    "mlp": lambda c: c.mlp not in MLP_TO_HF,
    "logit_softcap": lambda c: c.logit_softcap > 0,
}
# What an export writes: a folder holding only these may be replaced by a new export
EXPORT_FILES = {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json"}
EOT_TEXT = "<|endoftext|>"


def options_gpt2_lacks(config: GPTConfig) -> list[str]:
    """The options of `config` that GPT-2 does not have, as 'rotary', "mlp='swiglu'", ..."""
    return [name if name != "mlp" else f"mlp={config.mlp!r}" for name, used in OPTIONS_GPT2_LACKS.items()
            if used(config)]


# ---------------------------------------------------------------------------------------------
# Import


def load_pretrained(cls, name_or_dir, override_args=None):
    """A `cls` (model.GPT) with GPT-2 weights: 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' from the
    Hugging Face Hub (needs `pip install -e '.[hf]'`), or a local directory in Hugging Face GPT-2
    format (config.json + model.safetensors or pytorch_model.bin, possibly sharded).

    override_args may set 'dropout' (e.g. for fine-tuning) and 'block_size' (<= the checkpoint's,
    cropped with crop_block_size). tie_word_embeddings=false loads as an untied_head model,
    activation_function='gelu' (the exact GELU) as mlp='gelu_exact'. transformers is not needed.
    A local directory wins over a model name when both exist.
    """
    override_args = dict(override_args or {})
    unknown = sorted(set(override_args) - {"dropout", "block_size"})
    if unknown:
        raise ModelError(
            f"cannot override {', '.join(unknown)} of pretrained GPT-2 weights: only dropout and block_size"
        )
    path = Path(name_or_dir)
    if path.is_dir():
        checkpoint_dir = path
    elif str(name_or_dir) in PRETRAINED:
        checkpoint_dir = download_gpt2(str(name_or_dir))
    else:
        raise ModelError(
            f"unknown pretrained model {str(name_or_dir)!r}: use one of {', '.join(PRETRAINED)} "
            "or a local directory in Hugging Face GPT-2 format"
        )
    config = gpt_config_from_hf(read_gpt2_config(checkpoint_dir), dropout=override_args.get("dropout", 0.0))
    model = cls(config)
    load_hf_state_dict(model, read_state_dict(checkpoint_dir), checkpoint_dir)
    if "block_size" in override_args:
        model.crop_block_size(override_args["block_size"])
    return model


def download_gpt2(name):
    """Fetch config.json and model.safetensors of an OpenAI GPT-2 (cached by huggingface_hub)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ModelError(f"loading {name!r} needs huggingface_hub and safetensors: pip install -e '.[hf]'") from None
    try:
        paths = [hf_hub_download(PRETRAINED[name], filename) for filename in ("config.json", "model.safetensors")]
    except Exception as exc:  # no network, hub down, ...: one line, not a stack of HTTP errors
        raise ModelError(
            f"could not download {name!r} from the Hugging Face Hub ({first_line(exc)}); "
            "check the connection or pass a local directory"
        ) from None
    return Path(paths[0]).parent


def read_gpt2_config(checkpoint_dir):
    """config.json of a Hugging Face GPT-2 checkpoint, checked to be one this GPT computes exactly."""
    config_path = Path(checkpoint_dir) / "config.json"
    try:
        hf_config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{checkpoint_dir} is not a GPT-2 checkpoint: it has no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{config_path} is not readable JSON ({exc})") from None
    if not isinstance(hf_config, dict) or hf_config.get("model_type") != "gpt2":
        kind = hf_config.get("model_type") if isinstance(hf_config, dict) else None
        raise ModelError(f"{checkpoint_dir} is not a GPT-2 checkpoint: config.json has model_type {kind!r}, not 'gpt2'")
    unsupported = {
        "activation_function": (hf_config.get("activation_function", "gelu_new"), tuple(HF_TO_MLP)),
        "layer_norm_epsilon": (hf_config.get("layer_norm_epsilon", 1e-5), (1e-5,)),
        "n_inner": (hf_config.get("n_inner"), (None, 4 * hf_config.get("n_embd", 0))),
        "scale_attn_weights": (hf_config.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf_config.get("scale_attn_by_inverse_layer_idx", False), (False,)),
    }
    for key, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise ModelError(f"{config_path}: {key}={value!r} is not supported (GPT-2 uses {allowed[0]!r})")
    for key in ("vocab_size", "n_layer", "n_head", "n_embd"):
        if key not in hf_config:
            raise ModelError(f"{config_path} is not a GPT-2 config: it has no {key}")
    if "n_positions" not in hf_config and "n_ctx" not in hf_config:
        raise ModelError(f"{config_path} is not a GPT-2 config: it has no n_positions")
    return hf_config


def gpt_config_from_hf(hf_config, dropout=0.0) -> GPTConfig:
    """Our GPTConfig for a checked GPT-2 config.json (read_gpt2_config)."""
    return GPTConfig(
        block_size=hf_config.get("n_positions", hf_config.get("n_ctx")),
        vocab_size=hf_config["vocab_size"],
        n_layer=hf_config["n_layer"],
        n_head=hf_config["n_head"],
        n_embd=hf_config["n_embd"],
        dropout=dropout,
        bias=True,
        mlp=HF_TO_MLP[hf_config.get("activation_function", "gelu_new")],
        untied_head=not hf_config.get("tie_word_embeddings", True),
    )


def read_state_dict(checkpoint_dir):
    """Tensors of model.safetensors or pytorch_model.bin in checkpoint_dir (or their sharded forms)."""
    checkpoint_dir = Path(checkpoint_dir)
    for weights_name in ("model.safetensors", "pytorch_model.bin"):
        index_path = checkpoint_dir / f"{weights_name}.index.json"
        if (checkpoint_dir / weights_name).is_file():
            files = [checkpoint_dir / weights_name]
        elif index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"{index_path} is not a valid shard index ({exc})") from None
            files = [checkpoint_dir / shard for shard in sorted(set(weight_map.values()))]
        else:
            continue
        state_dict = {}
        for file in files:
            state_dict.update(read_weights_file(file))
        return state_dict
    raise ModelError(
        f"{checkpoint_dir} is not a GPT-2 checkpoint: it has neither model.safetensors nor pytorch_model.bin"
    )


def read_weights_file(path):
    if not path.is_file():
        raise ModelError(f"{path} is missing: the checkpoint is incomplete")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ModelError(f"reading {path} needs safetensors: pip install -e '.[hf]'") from None
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
            raise ModelError(f"{path} is not a readable safetensors file ({exc}); download it again") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with code in it (refused by weights_only), ...
        raise ModelError(f"{path} is not a readable PyTorch weights file ({first_line(exc)})") from None


def _first_few(names, n=3):
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")


def load_hf_state_dict(model, hf_sd, checkpoint_dir):
    """Copy a Hugging Face GPT-2 state dict into `model`, checking every name and shape."""
    # keys are "transformer.h.0..." when saved from GPT2LMHeadModel, "h.0..." from GPT2Model
    hf_sd = {k.removeprefix("transformer."): v for k, v in hf_sd.items()}
    # attention-mask buffers of older checkpoints are not weights
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    sd = model.state_dict()
    expected = {k.removeprefix("transformer."): k for k in sd}
    if not model.config.untied_head:  # the LM head is wte itself (some files store it again)
        hf_sd.pop("lm_head.weight", None)
        del expected["lm_head.weight"]
    missing = sorted(set(expected) - set(hf_sd))
    extra = sorted(set(hf_sd) - set(expected))
    if missing or extra:
        problems = [f"missing {_first_few(missing)}"] if missing else []
        problems += [f"unexpected {_first_few(extra)}"] if extra else []
        raise ModelError(f"{checkpoint_dir} is not a GPT-2 checkpoint: {'; '.join(problems)}")
    with torch.no_grad():
        for hf_name, tensor in hf_sd.items():
            name = expected[hf_name]
            if hf_name.endswith(CONV1D_WEIGHTS):
                tensor = tensor.t()
            if tensor.shape != sd[name].shape:
                raise ModelError(
                    f"{checkpoint_dir}: {hf_name} has shape {tuple(tensor.shape)}, config.json implies "
                    f"{tuple(sd[name].shape)}; the checkpoint is inconsistent"
                )
            sd[name].copy_(tensor)


# ---------------------------------------------------------------------------------------------
# Export


def hf_state_dict(model, vocab_size):
    """model's weights under GPT-2's names and layouts, float32 on the CPU, vocabulary cut to vocab_size."""
    cfg = model.config
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and not cfg.untied_head:  # tied to wte; HF re-ties it on load
            continue
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:vocab_size]
        tensors[name] = tensor.detach().to("cpu", torch.float32).contiguous()
        # HF GPT-2 always has biases in its blocks and ln_f: zeros compute what we compute
        if not cfg.bias and name.startswith(("transformer.h.", "transformer.ln_f.")):
            out_dim = tensor.shape[-1] if name.endswith(CONV1D_WEIGHTS) else tensor.shape[0]
            tensors[name.removesuffix(".weight") + ".bias"] = torch.zeros(out_dim)
    return tensors


def hf_config_for(cfg: GPTConfig, vocab_size: int, eot_id) -> dict:
    """GPT-2's config.json for a model of config cfg (one without options_gpt2_lacks)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": MLP_TO_HF[cfg.mlp],
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": not cfg.untied_head,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": "float32",
    }


def save_pretrained(model, save_dir, vocab_size=None, meta=None, tokenizer_dir=None):
    """Export `model` (a GPT) to a Hugging Face GPT-2 folder: config.json + model.safetensors, and
    with `meta` (the run's tokenizer metadata, forge.data.load_meta's shape) the tokenizer files.

    transformers' GPT2LMHeadModel / AutoModelForCausalLM and GPT.from_pretrained load the folder;
    with the tokenizer files, AutoTokenizer and pipeline("text-generation") do too.
    vocab_size: the tokenizer's true vocabulary (e.g. 50257) to drop the rows this model was padded
    with (50304); default: meta's vocab_size, else all rows. A GPT-2 BPE tokenizer is written as
    GPT-2's files; a character vocabulary as a tokenizer.json of one token per character; without
    meta (or for a tokenizer kind not known here) no tokenizer files are written; a trained BPE
    (kind 'bpe') writes its tokenizer.json, read from `tokenizer_dir` (the dataset folder), and
    otherwise, and the returned
    list of written tokenizer files is empty. bos/eos are GPT-2's <|endoftext|> for a GPT-2
    vocabulary, none otherwise.
    bias=False models export zero biases, untied_head models tie_word_embeddings=false with their
    lm_head, mlp='gelu_exact' activation_function='gelu'; the options in OPTIONS_GPT2_LACKS are
    refused. Call it on an unsharded model (e.g. one rebuilt from ckpt.pt), not an FSDP-sharded one.
    The write is atomic (a new folder, then a rename); the folder and its files get the permissions
    transformers' save_pretrained gives (the umask's). save_dir must be new, empty, or an earlier
    export (holding only files an export writes, which are replaced); anything else is refused so
    that nothing of the user's is overwritten.
    """
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ModelError("exporting GPT-2 weights needs safetensors: pip install -e '.[hf]'") from None
    cfg = model.config
    lacks = options_gpt2_lacks(cfg)
    if lacks:
        raise ModelError(
            f"cannot export to GPT-2 format: this model uses {', '.join(lacks)}, which GPT-2 does not "
            "have; save_pretrained exports GPT-2-architecture models only (untied_head and zero_init_proj are fine)"
        )
    kind = (meta or {}).get("tokenizer")
    if vocab_size is None:
        vocab_size = meta["vocab_size"] if meta else cfg.vocab_size
    if not 1 <= vocab_size <= cfg.vocab_size:
        raise ModelError(f"vocab_size={vocab_size} must be between 1 and the model's {cfg.vocab_size}")
    if meta and vocab_size != meta["vocab_size"]:
        raise ModelError(f"vocab_size={vocab_size}, but the tokenizer has {meta['vocab_size']} tokens: export those")
    save_dir = Path(save_dir)
    if save_dir.exists() and not (save_dir.is_dir() and {p.name for p in save_dir.iterdir()} <= EXPORT_FILES):
        raise ModelError(
            f"refusing to write into {save_dir}: it exists and is not an earlier GPT-2 export "
            "(config.json, model.safetensors and tokenizer files only); choose a new or empty directory"
        )
    if kind == "gpt2":
        tokenizer_files = gpt2_tokenizer_files(cfg.block_size)
    elif kind == "char":
        tokenizer_files = char_tokenizer_files(meta["itos"], cfg.block_size)
    elif kind == "bpe":
        tokenizer_files = bpe_tokenizer_files(meta, tokenizer_dir)
    else:
        tokenizer_files = {}
    if kind == "bpe":
        eot_id = meta["eot_token"]
    else:
        eot_id = GPT2_EOT if (kind == "gpt2" or kind is None and vocab_size > GPT2_EOT) else None
    tensors = hf_state_dict(model, vocab_size)
    files = {"config.json": json_text(hf_config_for(cfg, vocab_size, eot_id)), **tokenizer_files}
    try:
        with replacing_folder(save_dir) as tmp_dir:
            save_file(tensors, str(tmp_dir / "model.safetensors"), metadata={"format": "pt"})
            for name, text in files.items():
                (tmp_dir / name).write_text(text, encoding="utf-8")
    except OSError as exc:  # read-only or full disk, permission denied: nothing was replaced
        raise ModelError(f"cannot write the export to {save_dir} ({os_reason(exc)}); "
                         "choose a writable folder with free space") from None
    return sorted(tokenizer_files)


def json_text(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------
# Tokenizer files


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable bytes stand for themselves, the other 68 (control
    characters, space, ...) for the characters from U+0100 up, so every token is a visible string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def gpt2_vocab_and_merges():
    """GPT-2's vocab.json (token string -> id) and merges (pairs of token strings, in merge order),
    derived from tiktoken's 'gpt2' encoding; equal to OpenAI's encoder.json and vocab.bpe.

    A token's id is its BPE rank. The merge that made token t is the pair BPE reaches when it
    encodes t's bytes with the merges before t only (that is how tiktoken would encode t without
    t itself): that run must end in exactly two pieces.
    """
    encoding = GPT2Tokenizer().encoding
    ranks = {encoding.decode_single_token_bytes(i): i for i in range(encoding.n_vocab) if i != GPT2_EOT}
    byte_char = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        pieces = _bpe_before(token, rank, ranks)
        if len(pieces) != 2:  # cannot happen for a BPE encoding; guards the derivation itself
            raise ModelError(f"tiktoken's gpt2 token {rank} is not the merge of two earlier tokens")
        merges.append((text(pieces[0]), text(pieces[1])))
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[EOT_TEXT] = GPT2_EOT
    return vocab, merges


def _bpe_before(token: bytes, max_rank: int, ranks: dict) -> list[bytes]:
    """token's bytes after BPE with the merges of rank < max_rank: the lowest-ranked pair first."""
    pieces = [bytes([b]) for b in token]
    while len(pieces) > 1:
        pairs = [(ranks.get(pieces[i] + pieces[i + 1], max_rank), i) for i in range(len(pieces) - 1)]
        rank, i = min(pairs)
        if rank >= max_rank:
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def gpt2_tokenizer_files(model_max_length: int) -> dict[str, str]:
    """GPT-2's tokenizer files as the Hub's openai-community/gpt2 has them: name -> text.

    clean_up_tokenization_spaces is false so that decoding gives back the text exactly (as tiktoken
    and sample.py do; true would join " ." into "."). tokenizer.json needs the `tokenizers`
    package: without it the other files are enough for transformers, which builds it.
    """
    vocab, merges = gpt2_vocab_and_merges()
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json_text(special),
        "tokenizer_config.json": json_text({
            "tokenizer_class": "GPT2Tokenizer",
            **special,
            "add_prefix_space": False,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "model_max_length": model_max_length,
            "added_tokens_decoder": {str(GPT2_EOT): _added_token(EOT_TEXT)},
        }),
    }
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    except ImportError:
        return files
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOT_TEXT, special=True)])
    files["tokenizer.json"] = tokenizer.to_str()
    return files


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def char_tokenizer_files(itos: list[str], model_max_length: int) -> dict[str, str]:
    """A character vocabulary (id = position in itos) as a tokenizer.json for transformers'
    PreTrainedTokenizerFast: a BPE model without merges splits text into characters, the Fuse
    decoder joins them back. Characters not in itos are dropped when encoding (sample.py refuses
    them). Needs the `tokenizers` package (transformers depends on it)."""
    try:
        from tokenizers import Tokenizer, decoders, models
    except ImportError:
        raise ModelError("exporting a character tokenizer needs the tokenizers package: pip install tokenizers") from None
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(itos)}, merges=[]))
    tokenizer.decoder = decoders.Fuse()
    return {
        "tokenizer.json": tokenizer.to_str(),
        "tokenizer_config.json": json_text({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
        }),
    }
