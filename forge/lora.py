"""LoRA: fine-tune a GPT through low-rank adapters on its linear layers, the base weights frozen.

    python train.py config/finetune_lora.py            # finetune='lora', lora_rank=8, lora_alpha=16, ...

Each targeted nn.Linear (W: out x in) becomes a LoRALinear that computes
    y = x W^T + b + (dropout(x) A^T B^T) * alpha / rank,   A: rank x in, B: out x rank
(Hu et al., "LoRA", https://arxiv.org/abs/2106.09685). B starts at zero, so step 0 is the base model
exactly; W and b, and every other parameter of the model, are frozen (requires_grad=False) and only
A and B reach the optimizer. LoRALinear subclasses nn.Linear and keeps W and b under their own
names, so the model's parameter names, compile, activation checkpointing and DDP are unchanged.

Targets are module names ending in one of: c_attn (attention q, k, v), attn.c_proj (attention
output), c_fc (MLP in), mlp.c_proj (MLP out), c_proj (both projections), lm_head (an untied head only).

The checkpoint (written by forge.checkpoint.save_training_state through lora_checkpoint_entries):
    'model': the MERGED weights (W + B A * alpha / rank), a plain GPT state dict, so sample.py,
             evaluate.py, the Hugging Face export and nanoGPT's tools load a LoRA run as the
             fine-tuned model it is, knowing nothing about LoRA;
    'lora':  {'rank', 'alpha', 'dropout', 'targets', 'base': the frozen W of each targeted layer,
             'adapters': every A and B}. The frozen base is STORED, not referenced: a resume needs
             only the run folder (not the Hub cache or the folder it started from), and rebuilds the
             exact base from 'model' with 'base' put back, so resuming is bit-identical.
The optimizer state holds only A and B (Adam's two moments: 2 x the adapter size).
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from forge.errors import UserError

TARGET_NAMES = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "c_proj", "lm_head")


@dataclass(frozen=True)
class LoRASpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple = ("c_attn", "c_proj", "c_fc")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, cfg) -> "LoRASpec":
        return cls(cfg.lora_rank, float(cfg.lora_alpha), float(cfg.lora_dropout), parse_targets(cfg.lora_targets))

    def as_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


def parse_targets(text: str) -> tuple:
    """'c_attn,c_proj' -> ('c_attn', 'c_proj'); an unknown or empty list is a UserError."""
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in targets if t not in TARGET_NAMES]
    if unknown or not targets:
        raise UserError(f"lora_targets={text!r}: {'unknown ' + repr(unknown[0]) if unknown else 'empty'}; "
                        f"use a comma-separated list of {', '.join(TARGET_NAMES)}")
    return targets


def check_spec(spec: LoRASpec) -> None:
    if spec.rank < 1:
        raise UserError(f"lora_rank={spec.rank} must be at least 1 (8 or 16 are usual)")
    if spec.alpha <= 0:
        raise UserError(f"lora_alpha={spec.alpha} must be positive (the update is scaled by alpha / rank)")
    if not 0.0 <= spec.dropout < 1.0:
        raise UserError(f"lora_dropout={spec.dropout} must be in [0, 1)")


class LoRALinear(nn.Linear):
    """nn.Linear (frozen weight and bias, the same parameters as the layer it replaces) plus B A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: no copy, the name stays `<layer>.weight`
        self.bias = base.bias
        self.scaling = alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # (out, r): zero, so B A = 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in the LoRA paper's code
        self.lora_dropout = nn.Dropout(dropout)
        self.train(base.training)  # a model in eval mode stays in eval mode

    def forward(self, x):
        # two thin matmuls (x A^T is (.., r)): the full-size B A is never formed in training
        return F.linear(x, self.weight, self.bias) + (self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[0]}, scaling={self.scaling:g}"


def _is_target(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, spec: LoRASpec) -> list:
    """Freeze every parameter of model and wrap the targeted nn.Linear layers in LoRALinear, in place.
    Returns the wrapped layers' names. Call before compile / DDP and before building the optimizer."""
    check_spec(spec)
    if not hasattr(getattr(model, "transformer", None), "h"):
        raise UserError(f"finetune=lora needs the transformer (model_type='gpt'); a {type(model).__name__} has "
                        "no attention or MLP layers to adapt: use finetune='full'")
    config = getattr(model, "config", None)
    if "lm_head" in spec.targets and not getattr(config, "untied_head", True):
        raise UserError("lora_targets includes lm_head, but this model's head is tied to the token embedding (GPT-2's "
                        "is): an adapter there cannot be merged into one matrix; drop lm_head from lora_targets")
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and _is_target(name, spec.targets)]
    if not found:
        raise UserError(f"lora_targets={','.join(spec.targets)} matches no linear layer of this model")
    for name, layer in found:
        if spec.rank > min(layer.in_features, layer.out_features):
            raise UserError(f"lora_rank={spec.rank} is larger than {name}'s smallest dimension "
                            f"({layer.out_features} x {layer.in_features}): a low-rank update needs rank below it")
    model.requires_grad_(False)
    for name, layer in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(layer, spec.rank, spec.alpha, spec.dropout))
    return [name for name, _ in found]


def is_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def _adapted_layers(state_dict: dict) -> list:
    return [name.removesuffix(".lora_A") for name in state_dict if name.endswith(".lora_A")]


def merge_adapters(state_dict: dict, scaling: float) -> dict:
    """A plain state dict (no lora_ keys) with W + B A * scaling in each adapted layer; the input is not changed."""
    merged = {k: v for k, v in state_dict.items() if not is_adapter(k)}
    for layer in _adapted_layers(state_dict):
        weight = state_dict[f"{layer}.weight"]
        delta = state_dict[f"{layer}.lora_B"].float() @ state_dict[f"{layer}.lora_A"].float()  # (out, in)
        merged[f"{layer}.weight"] = (weight.float() + delta * scaling).to(weight.dtype)
    return merged


def lora_checkpoint_entries(state_dict: dict, spec: dict) -> tuple:
    """(the checkpoint's 'model': merged plain weights, its 'lora': spec + frozen base weights + adapters)."""
    if not state_dict:  # a non-writing rank gathers nothing
        return state_dict, spec
    layers = _adapted_layers(state_dict)
    lora = {**spec, "base": {f"{layer}.weight": state_dict[f"{layer}.weight"] for layer in layers},
            "adapters": {k: v for k, v in state_dict.items() if is_adapter(k)}}
    return merge_adapters(state_dict, spec["alpha"] / spec["rank"]), lora


def spec_from_checkpoint(ckpt: dict) -> LoRASpec:
    lora = ckpt["lora"]
    return LoRASpec(int(lora["rank"]), float(lora["alpha"]), float(lora["dropout"]), tuple(lora["targets"]))


def load_adapters(model: nn.Module, adapters: dict, source) -> None:
    """Copy a checkpoint's A and B into a model that apply_lora wrapped with the same spec."""
    own = {name: p for name, p in model.named_parameters() if is_adapter(name)}
    if set(own) != set(adapters) or any(own[k].shape != adapters[k].shape for k in own):
        raise UserError(f"{source}: the stored adapters ({len(adapters)} tensors) do not fit this model's "
                        f"({len(own)}); resume with the model and LoRA settings the run was started with")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(adapters[name])


def check_resume_settings(cfg, ckpt: dict, source) -> None:
    """A resumed run keeps its fine-tuning mode and LoRA shape (dropout may change, as the model's may)."""
    saved_mode = "lora" if ckpt.get("lora") else "full"
    if cfg.finetune != saved_mode:
        raise UserError(f"{source} was trained with finetune={saved_mode!r} but the config says "
                        f"finetune={cfg.finetune!r}: resume with the same mode, or start a new --out_dir")
    if saved_mode == "lora":
        saved, wanted = spec_from_checkpoint(ckpt), LoRASpec.from_config(cfg)
        for key in ("rank", "alpha", "targets"):
            if getattr(saved, key) != getattr(wanted, key):
                raise UserError(f"{source} was trained with lora_{key}={getattr(saved, key)!r} but the config says "
                                f"{getattr(wanted, key)!r}: resume with the run's LoRA settings")


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)"


def prepare_finetune(model: nn.Module, cfg, ckpt: dict | None, source) -> dict | None:
    """train.py's one call: with finetune=lora, wrap the model (resuming: the stored base and adapters
    loaded, bit for bit) and return the spec the checkpoint records; finetune=full: None."""
    if ckpt is not None:
        check_resume_settings(cfg, ckpt, source)
    if cfg.finetune != "lora":
        return None
    spec = LoRASpec.from_config(cfg)
    if ckpt is not None:  # 'model' is merged: the frozen base weights go back first
        with torch.no_grad():
            for name, tensor in ckpt["lora"]["base"].items():
                model.get_parameter(name).copy_(tensor)
    apply_lora(model, spec)
    if ckpt is not None:
        load_adapters(model, ckpt["lora"]["adapters"], source)
    return spec.as_dict()
