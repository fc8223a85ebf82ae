"""Configuration: one typed dataclass of defaults, config files, then --key=value overrides.

    python train.py config/a.py [config/b.py ...] --key=value ...

Config files are plain Python assignments (trusted code, like any training script), each run in a
fresh private namespace and applied in order; then each `--key=value` is parsed with
ast.literal_eval (never exec), falling back to the raw string. Every key must exist in the
dataclass (a typo is an error naming the closest key) and have the field's type (an int is fine
where a float is expected). `--help` lists every key with its default and comment.

load_config() is generic over the dataclass: sample.py, evaluate.py and bench.py use it with their
own. Each field's comment on its line is its help text, so the dataclass stays the one place.
"""
import ast
import dataclasses
import difflib
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from forge.errors import UserError
from model import GPTConfig, ModelError


MAX_SEED = 2**31 - 1  # seed + rank and seed + the evaluation offset stay within numpy's 32-bit seeds


class ConfigError(UserError):
    """A config file or override the user can fix: unknown key, wrong type, bad value, missing file."""


# TrainConfig's model keys: GPTConfig's fields but vocab_size (the data decides it). Training's default
# differs for bias only: nanoGPT trains without biases (a bit better and faster); GPTConfig defaults to GPT-2.
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size")
TRAIN_MODEL_DEFAULTS = {"bias": False}


def with_model_keys(cls):
    """Insert GPTConfig's fields (MODEL_KEYS, defaults from TRAIN_MODEL_DEFAULTS) into cls's annotations just after
    `model_type`, before @dataclass reads them; their --help comments are read from GPTConfig (`keys_from`)."""
    annotations = {}
    for name, tp in inspect.get_annotations(cls).items():  # this class's own, in order
        annotations[name] = tp
        if name == "model_type":
            for f in dataclasses.fields(GPTConfig):
                if f.name in MODEL_KEYS:
                    annotations[f.name] = f.type
                    setattr(cls, f.name, TRAIN_MODEL_DEFAULTS.get(f.name, f.default))
    cls.__annotations__ = annotations
    cls.keys_from = GPTConfig
    return cls


@dataclass
@with_model_keys
class TrainConfig:
    # I/O
    out_dir: str = "out"  # where ckpt.pt, train_config.json and metrics.jsonl are written (one run at a time)
    eval_interval: int = 2000  # evaluate (and maybe checkpoint) every this many iterations
    log_interval: int = 10  # print and record a training line every this many iterations (each line is a host sync)
    eval_iters: int = 200  # batches per split for each evaluation
    eval_only: bool = False  # evaluate once at the start, then exit
    eval_at_start: bool = True  # evaluate before the first step, as nanoGPT does (False: first at eval_interval)
    eval_train: bool = True  # evaluations measure the train split too (False: val only, in half the time)
    always_save_checkpoint: bool = True  # save at every evaluation, not only when val loss improves
    init_from: str = "scratch"  # 'scratch', 'resume', 'auto' (resume if out_dir has a checkpoint), 'gpt2*', a local HF dir, or another run's out_dir (its ckpt.pt weights)
    keep_last: int = 0  # also keep the last N checkpoints as ckpt-<iter>.pt (0: only ckpt.pt)
    eval_hellaswag_interval: int = 0  # also score HellaSwag at evaluations every this many iterations (0: never; GPT-2 BPE data only)
    hellaswag_path: str = ""  # a local HellaSwag jsonl; '' = the official validation set, downloaded once into data/hellaswag
    hellaswag_limit: int = 0  # score only the first this many HellaSwag examples (0: all 10,042)
    # logging
    wandb_log: bool = False  # log to Weights & Biases (WANDB_MODE=offline works)
    wandb_project: str = "owt"  # W&B project
    wandb_run_name: str = "gpt2"  # W&B run name
    # data
    dataset: str = "openwebtext"  # folder under data/ holding train.bin, val.bin and meta.json
    data_dir: str = ""  # explicit data folder; '' means data/<dataset>
    gradient_accumulation_steps: int = 40  # micro-steps per optimizer step, over all ranks together
    batch_size: int = 12  # sequences per micro-step (per rank)
    # model: model_type, then GPTConfig's keys (model.py, where they are declared and checked), but
    # vocab_size, which the data decides; training's own defaults in TRAIN_MODEL_DEFAULTS
    model_type: Literal["gpt", "bigram"] = "gpt"  # 'gpt' (the transformer) or 'bigram' (a lookup-table baseline)
    # fine-tuning
    finetune: Literal["full", "lora"] = "full"  # 'full' trains every weight; 'lora' freezes them and trains low-rank adapters (forge/lora.py)
    lora_rank: int = 8  # finetune=lora: rank r of each adapter (A is r x in, B is out x r)
    lora_alpha: float = 16.0  # finetune=lora: the adapters' update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.05  # finetune=lora: dropout on the adapters' input
    lora_targets: str = "c_attn,c_proj,c_fc"  # finetune=lora: layers given adapters, of c_attn, attn.c_proj, c_fc, mlp.c_proj, c_proj (both), lm_head (untied only)
    # optimizer
    optimizer: str = "adamw"  # 'adamw' or 'muon' (forge/optim.py)
    muon_lr: float = 0.02  # Muon's lr for the hidden matrices at peak; follows the schedule as lr * muon_lr / learning_rate
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    muon_weight_decay: float = 0.0  # Muon's decoupled weight decay on the hidden matrices
    muon_ns_steps: int = 5  # Newton-Schulz iterations per Muon update
    embedding_lr: float = 0.0  # optimizer=muon: AdamW peak lr of the embeddings (and a tied head); 0 means learning_rate
    head_lr: float = 0.0  # optimizer=muon: AdamW peak lr of an untied lm_head; 0 means learning_rate
    learning_rate: float = 6e-4  # peak learning rate
    max_iters: int = 600000  # total optimizer steps
    weight_decay: float = 0.1  # AdamW weight decay on 2-D weights
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 disables clipping
    # learning-rate schedule
    decay_lr: bool = True  # linear warmup then cosine decay; False keeps learning_rate constant
    warmup_iters: int = 2000  # linear warmup steps
    lr_decay_iters: int = 600000  # the cosine reaches min_lr here (~max_iters per Chinchilla)
    min_lr: float = 6e-5  # floor of the schedule (~learning_rate/10 per Chinchilla)
    # system
    device: str = "auto"  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N', 'mps'
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # 'auto': bfloat16 if supported, else float16 on cuda, float32 elsewhere
    compile: bool = True  # torch.compile the model (PyTorch 2)
    backend: str = "auto"  # process-group backend under torchrun: 'auto' (nccl on cuda, gloo otherwise), 'nccl', 'gloo'
    parallelism: Literal["ddp", "fsdp"] = "ddp"  # data parallelism under torchrun: 'ddp' (replicate) or 'fsdp' (shard)
    activation_checkpointing: bool = False  # recompute block activations in backward to save memory
    cpu_procs: int | Literal["auto"] = "auto"  # CPU: training processes (gloo DDP); 'auto': one per physical core, or one when OMP_NUM_THREADS is set (forge/cpulaunch.py)
    dist_timeout_s: float = 900.0  # seconds a rank waits in a collective before failing with a clear error (a hung peer)
    seed: int = 1337  # base random seed: initial weights use it on every rank, dropout seed + rank
    peak_flops: float = 0.0  # device peak FLOP/s for MFU; 0 looks it up in forge/flops.py's table
    matmul_precision: Literal["highest", "high", "medium"] = "high"  # float32 matmuls: 'high' TF32 on GPUs; 'medium' also bf16 products on CPUs with AMX/AVX512-BF16

    def __post_init__(self):
        check_types(self)
        for name in ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        try:  # the model keys are checked where they are declared
            GPTConfig(**{name: getattr(self, name) for name in MODEL_KEYS}, vocab_size=1)
        except ModelError as exc:
            raise ConfigError(str(exc)) from None
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "keep_last", "seed", "eval_hellaswag_interval",
                     "hellaswag_limit"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must not be negative")
        if not self.out_dir.strip():
            raise ConfigError("out_dir is empty: name the run's folder, e.g. --out_dir=out")
        if self.seed > MAX_SEED:
            raise ConfigError(f"seed={self.seed} is too large: use 0..{MAX_SEED} (numpy takes 32-bit seeds, and "
                              "each rank and the evaluation batches add an offset to it)")
        if self.decay_lr and self.min_lr > self.learning_rate:
            raise ConfigError(f"min_lr={self.min_lr} is above learning_rate={self.learning_rate}: the schedule would "
                              "rise during its decay; set min_lr <= learning_rate (nanoGPT: learning_rate / 10)")
        if self.decay_lr and self.warmup_iters > self.lr_decay_iters:
            raise ConfigError(f"warmup_iters={self.warmup_iters} is past lr_decay_iters={self.lr_decay_iters}: the "
                              "warmup must end before the decay does; lower warmup_iters or raise lr_decay_iters")
        if self.cpu_procs != "auto" and self.cpu_procs < 1:
            raise ConfigError(f"cpu_procs={self.cpu_procs} must be at least 1, or 'auto'")
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"dist_timeout_s={self.dist_timeout_s} must be a positive number of seconds")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "peak_flops"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must not be negative")
        if self.finetune == "lora":
            from forge.lora import LoRASpec, check_spec  # imports torch: only for LoRA configs

            check_spec(LoRASpec.from_config(self))
            if self.optimizer != "adamw":
                raise ConfigError(f"finetune=lora trains its adapters with optimizer='adamw', not {self.optimizer!r}")
        if self.eval_hellaswag_interval % self.eval_interval:
            raise ConfigError(f"eval_hellaswag_interval={self.eval_hellaswag_interval} must be a multiple of "
                              f"eval_interval={self.eval_interval}: HellaSwag is scored at evaluation steps")


def accumulation_per_rank(gradient_accumulation_steps: int, world_size: int) -> int:
    """Micro-steps each rank runs per optimizer step (the global count is split across ranks)."""
    if gradient_accumulation_steps % world_size:
        raise ConfigError(f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by the "
                          f"{world_size} processes: make it a multiple of {world_size} (it counts all ranks' micro-steps)")
    return gradient_accumulation_steps // world_size


# ----------------------------------------------------------------------------- types

def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if tp is bool:
        return "True or False"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp):
    """value as type tp (int -> float where a float is expected), or raise TypeError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in typing.get_args(tp)):
            return value
        raise TypeError
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if tp is bool:  # a real bool only: 1 or 'true' would hide a mistake
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if isinstance(value, tp):  # str and None (the config classes use no other types)
        return value
    raise TypeError


def check_types(cfg) -> None:
    """Check (and coerce int -> float) every field of a config dataclass instance; ConfigError on a mismatch."""
    hints = typing.get_type_hints(type(cfg))
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        setattr(cfg, field.name, _checked(field.name, value, hints[field.name]))


def _checked(key: str, value, tp):
    try:
        return _coerce(value, tp)
    except TypeError:
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})") from None


# ----------------------------------------------------------------------------- help text

def field_comments(config_cls) -> dict:
    """{field name: the comment on its line} read from the class source (the one place it is written), and
    from its `keys_from` class for the fields it takes from there (TrainConfig's model keys: GPTConfig)."""
    source_cls = config_cls.__dict__.get("keys_from")
    inherited = field_comments(source_cls) if source_cls is not None else {}
    try:
        source = textwrap.dedent(inspect.getsource(config_cls))
    except (OSError, TypeError):
        return inherited
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    class_def = ast.parse(source).body[0]
    return inherited | {node.target.id: comments[node.lineno] for node in class_def.body
                        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                        and node.lineno in comments}


def help_text(config_cls, prog: str) -> str:
    # a subclass (bench.py's BenchConfig extends TrainConfig) inherits its bases' comments
    comments = {name: text for cls in reversed(config_cls.__mro__) if dataclasses.is_dataclass(cls)
                for name, text in field_comments(cls).items()}
    hints = typing.get_type_hints(config_cls)
    lines = [f"usage: {prog} [config_file.py ...] [--key=value ...]", "",
             "Config files (Python assignments) apply in order, then --key=value overrides.", "", "keys:"]
    fields = dataclasses.fields(config_cls)
    width = max(len(f"--{f.name}={_default(f)!r}") for f in fields)
    for f in fields:
        left = f"--{f.name}={_default(f)!r}"
        lines.append(f"  {left:<{width}}  ({_type_name(hints[f.name])}) {comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def _default(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


# ----------------------------------------------------------------------------- loading

def _unknown_key(key: str, known, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "run with --help to list the keys"
    return ConfigError(f"unknown config key {key!r} {where}; {hint}")


def read_config_file(path: str, known) -> dict:
    """The assignments of one config file, run in a private namespace; only known keys allowed."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} not found; check the path (config files live in config/)")
    try:
        source = file.read_text(encoding="utf-8")
        code = compile(source, str(file), "exec")
    except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
        line = f" line {exc.lineno}" if getattr(exc, "lineno", None) else ""
        raise ConfigError(f"config file {path}{line} is not valid Python: {getattr(exc, 'msg', exc)}") from None
    namespace: dict = {}  # private: never this module's globals; names starting with _ are the file's own helpers
    try:
        exec(code, namespace)
    except Exception as exc:
        raise ConfigError(f"config file {path} failed: {type(exc).__name__}: {exc}") from None
    values = {}
    for key, value in namespace.items():
        if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        if key not in known:
            raise _unknown_key(key, known, f"in {path}")
        values[key] = value
    return values


def _parse_override(arg: str, known, hints) -> tuple:
    body = arg[2:]
    if "=" not in body:
        raise ConfigError(f"override {arg!r} needs a value: write --{body}=VALUE")
    key, raw = body.split("=", 1)  # values may contain '='
    if key not in known:
        raise _unknown_key(key, known, f"in {arg!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = raw
    try:
        return key, _coerce(value, hints[key])
    except TypeError:
        pass
    if not isinstance(value, str):
        try:  # a string key given something literal_eval reads as a number, e.g. --wandb_run_name=1e3
            return key, _coerce(raw, hints[key])
        except TypeError:
            pass
    return key, _checked(key, value, hints[key])


def load_config(argv, config_cls=TrainConfig, prog: str | None = None, base=None):
    """config_cls from config files and --key=value overrides in argv; --help prints the keys and exits.

    base(values) -> dict, if given, supplies the values under the ones argv sets, before the config is
    validated as a whole (train.py: a resumed run's stored config, so --n_embd=... is checked against the
    run's n_head, not the default's)."""
    prog = prog or Path(sys.argv[0]).name
    if "--help" in argv or "-h" in argv:
        print(help_text(config_cls, prog))
        raise SystemExit(0)
    known = [f.name for f in dataclasses.fields(config_cls)]
    hints = typing.get_type_hints(config_cls)
    values: dict = {}
    for arg in argv:
        if arg.startswith("--"):
            key, value = _parse_override(arg, known, hints)
        elif arg.startswith("-"):
            raise ConfigError(f"unrecognised option {arg!r}; overrides are written --key=value")
        else:
            for key, value in read_config_file(arg, known).items():
                values[key] = _checked(key, value, hints[key])
            continue
        values[key] = value
    return config_cls(**{**(base(values) if base else {}), **values})


def config_dict(cfg) -> dict:
    """The resolved configuration as plain JSON-able values."""
    return dataclasses.asdict(cfg)


def format_config(cfg) -> str:
    return json.dumps(config_dict(cfg), indent=2, sort_keys=False)
