"""Optimizers: AdamW (the model's own param groups) and Muon (orthogonalised momentum for hidden matrices).

`build_optimizer` is the one call train.py makes. Every param group may carry `lr_scale`; the loop sets
`group['lr'] = lr * group.get('lr_scale', 1.0)` each step, so one learning-rate schedule drives all groups.

Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/) runs SGD with Nesterov momentum on each
2-D hidden weight matrix and replaces the update by the nearest semi-orthogonal matrix, computed by a
quintic Newton-Schulz iteration. It suits only the hidden matrices (attention and MLP linears in the
blocks); embeddings, the lm_head and every 1-D gain or bias keep AdamW, in the same optimizer object, so
train.py and the checkpoint code see one optimizer whatever the choice.
"""
import torch
import torch.distributed as tdist
from torch.distributed.tensor import DTensor, distribute_tensor

from forge.errors import UserError

OPTIMIZERS = ("adamw", "muon")
# torch 2.13 renamed all_gather_into_tensor (kept, with a FutureWarning on every call) to all_gather_single
ALL_GATHER_SINGLE = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor
# Quintic Newton-Schulz coefficients from Keller Jordan's Muon, chosen to maximise the slope at zero:
# five steps push every singular value into roughly [0.7, 1.2] rather than exactly to 1, which trains as well.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def build_optimizer(
    model,
    name,
    weight_decay,
    learning_rate,
    betas,
    device_type,
    *,
    muon_lr=0.02,
    muon_momentum=0.95,
    muon_weight_decay=0.0,
    muon_ns_steps=5,
    embedding_lr=0.0,
    head_lr=0.0,
):
    """The optimizer for `model` (the raw model; build it after parallelize(): FSDP2 swaps in DTensors).

    'adamw': model.configure_optimizers(weight_decay, learning_rate, betas, device_type).
    'muon':  Muon for the 2-D weights inside model.transformer.h, AdamW(betas) for everything else:
             the embeddings at embedding_lr, an untied lm_head at head_lr (0: learning_rate for either),
             1-D gains and biases at learning_rate; weight_decay on the embeddings and head only.
             Every group's lr is its peak value and follows the schedule in proportion (lr_scale).
    """
    if name == "adamw":
        return model.configure_optimizers(weight_decay, learning_rate, betas, device_type)
    if name != "muon":
        raise UserError(f"optimizer={name!r} is unknown: use one of {', '.join(OPTIMIZERS)}")
    if learning_rate <= 0 or muon_lr <= 0 or embedding_lr < 0 or head_lr < 0:
        raise UserError(
            f"optimizer=muon needs learning_rate > 0, muon_lr > 0, embedding_lr >= 0 and head_lr >= 0 (got "
            f"{learning_rate}, {muon_lr}, {embedding_lr}, {head_lr}): each group follows the schedule as "
            "lr * its_lr / learning_rate"
        )
    if not 0 <= muon_momentum < 1:
        raise UserError(f"muon_momentum={muon_momentum} must be in [0, 1)")
    if muon_ns_steps < 1:
        raise UserError(f"muon_ns_steps={muon_ns_steps} must be at least 1")
    groups = muon_param_groups(model)
    if not groups["muon"] + groups["muon_qkv"]:
        raise UserError(
            f"optimizer=muon found no 2-D hidden weights in this {type(model).__name__} "
            "(Muon needs model.transformer.h): use optimizer=adamw"
        )
    muon = dict(
        use_muon=True, lr=muon_lr, lr_scale=muon_lr / learning_rate,
        momentum=muon_momentum, weight_decay=muon_weight_decay, ns_steps=muon_ns_steps,
    )

    def adam(params, lr, decay):
        return dict(params=params, use_muon=False, lr=lr, lr_scale=lr / learning_rate, betas=tuple(betas), eps=1e-8,
                    weight_decay=weight_decay if decay else 0.0)

    param_groups = [
        dict(muon, params=groups["muon"], ns_split=1),
        dict(muon, params=groups["muon_qkv"], ns_split=3),
        adam(groups["embeddings"], embedding_lr or learning_rate, decay=True),
        adam(groups["head"], head_lr or learning_rate, decay=True),
        adam(groups["gains"], learning_rate, decay=False),
    ]
    return Muon([g for g in param_groups if g["params"]])


def muon_param_groups(model) -> dict:
    """Split the model's parameters by how Muon treats them (tied weights counted once).

    muon:       2-D weights inside model.transformer.h (attention and MLP linears)
    muon_qkv:   fused attention c_attn weights of shape (3C, C), orthogonalised as three C x C blocks
                (q, k and v separately, as modded-nanogpt does)
    embeddings: the other 2-D weights but the head: token (and tied head) and position embeddings
    head:       an untied lm_head
    gains:      1-D gains and biases everywhere
    """
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    hidden = {id(p) for p in blocks.parameters() if p.dim() == 2} if blocks is not None else set()
    groups = {"muon": [], "muon_qkv": [], "embeddings": [], "head": [], "gains": []}
    for name, p in model.named_parameters():  # a tied lm_head is listed once, as transformer.wte.weight
        if not p.requires_grad:
            continue
        if id(p) in hidden:
            fused_qkv = name.endswith("attn.c_attn.weight") and p.shape[0] == 3 * p.shape[1]
            groups["muon_qkv" if fused_qkv else "muon"].append(p)
        elif p.dim() < 2:
            groups["gains"].append(p)
        else:
            groups["head" if name == "lm_head.weight" else "embeddings"].append(p)
    return groups


def zeropower_via_newtonschulz(G: torch.Tensor, steps: int = 5, dtype=None) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T (batched over leading dims): every singular value -> ~1.

    Runs in bfloat16 on CUDA (stable, and the fast path there) and float32 elsewhere (CPUs have no fast
    bfloat16 matmul). The result has G's shape and the compute dtype.
    """
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype or (torch.bfloat16 if G.is_cuda else torch.float32))
    wide = G.size(-2) <= G.size(-1)
    if not wide:  # iterate on the wide orientation, so the Gram matrix X X^T is the small one
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    fused_multiply_add = torch.addmm if X.dim() == 2 else torch.baddbmm  # beta * M + alpha * P @ Q, one kernel
    if X.dtype == torch.float32 and X.size(-1) >= 2 * X.size(-2):
        # Each step is X <- P(A) X with A = X X^T and P(A) = a I + b A + c A^2, so the next A is P A P (polynomials
        # in A commute): iterate on the small (rows, rows) matrices and apply the product of the P's to X once.
        # For a 1:4 matrix that is ~45% fewer FLOPs. It squares X's condition number, which float32 holds for
        # these few steps (within 1e-4 of the exact result over six decades of singular values, the direct
        # form 2e-6) and bfloat16 does not, so the CUDA path keeps the direct form.
        A = X @ X.mT
        product = None
        for step in range(steps):
            P = fused_multiply_add(A, A, A, beta=b, alpha=c)  # b A + c A^2
            P.diagonal(dim1=-2, dim2=-1).add_(a)
            product = P if product is None else P @ product
            if step < steps - 1:
                A = P @ A @ P
        X = product @ X
    else:
        for _ in range(steps):
            A = X @ X.mT
            B = fused_multiply_add(A, A, A, beta=b, alpha=c)  # b A + c A^2
            X = fused_multiply_add(X, B, X, beta=a)  # a X + b A X + c A^2 X: odd quintic in the singular values
    return X if wide else X.mT


def orthogonalized_updates(updates: list, ns_steps: list, ns_split: list) -> list:
    """The Muon update of each (rows, cols) momentum in `updates`: Newton-Schulz orthogonalised, scaled by
    sqrt(max(1, rows / cols)) so tall matrices get the same per-element size as square ones (Keller
    Jordan's scaling), in the update's dtype. Per update: ns_steps Newton-Schulz steps, and ns_split=k
    orthogonalises k stacked row blocks separately.

    Blocks of one shape (a tall block counts as its transpose, which Newton-Schulz iterates on anyway) and
    one step count are orthogonalised as one batch, whichever matrix or parameter group they come from: a
    kernel per Newton-Schulz matmul, not one per matrix. In a process group each rank orthogonalises its
    share of every batch and an all-gather hands all of them to every rank (modded-nanogpt's split of the
    work), so the result is one process's; one batch per shape keeps the all-gathers few (2 per step for
    the GPT blocks, not 4). A DTensor (FSDP2 shard) is gathered whole first (orthogonalisation is not
    elementwise) and this rank's shard of its result returned with the same placements (uneven shards
    included).
    """
    full = [u.full_tensor() if isinstance(u, DTensor) else u for u in updates]
    blocks = [matrix.reshape(k, matrix.size(0) // k, matrix.size(1)) for matrix, k in zip(full, ns_split)]
    by_shape = {}
    for i, block in enumerate(blocks):
        by_shape.setdefault((ns_steps[i], min(block.shape[1:]), max(block.shape[1:])), []).append(i)

    def cost(item):  # a batch's Newton-Schulz FLOPs, up to a constant: count x rows^2 x cols
        (_, rows, cols), indices = item
        return len(indices) * rows * rows * cols

    # every batch is started before any is awaited, so a batch's all-gather travels while the next one
    # computes; the costliest go first, and the all-gather left to wait for at the end is the cheapest's
    started = []
    for (ns, _, _), indices in sorted(by_shape.items(), key=cost, reverse=True):
        wide = torch.cat([blocks[i] if blocks[i].size(1) <= blocks[i].size(2) else blocks[i].mT for i in indices])
        started.append((indices, split_across_ranks(wide, lambda batch: zeropower_via_newtonschulz(batch, ns))))
    results = [None] * len(updates)
    for indices, gathered in started:
        for i, result in zip(indices, gathered().split([ns_split[i] for i in indices])):
            rows, cols = blocks[i].shape[1:]
            result = (result if rows <= cols else result.mT) * max(1.0, rows / cols) ** 0.5
            update, result = updates[i], result.reshape(full[i].shape).to(updates[i].dtype)
            if isinstance(update, DTensor):
                result = distribute_tensor(result, update.device_mesh, update.placements, src_data_rank=None)
            results[i] = result
    return results


def split_across_ranks(batch: torch.Tensor, fn):
    """fn(batch) for a function batched over dim 0, each rank of the process group computing a share.

    The batch is zero-padded to a multiple of the world size, rank r computes rows [r*k, (r+1)*k), and
    an all-gather assembles the whole result on every rank. It returns without waiting for that all-gather:
    call the returned function for the result. Without a process group: fn(batch), returned the same way.
    """
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        whole = fn(batch)
        return lambda: whole
    world, rank = tdist.get_world_size(), tdist.get_rank()
    share = -(-batch.size(0) // world)
    padded = torch.cat([batch, batch.new_zeros(share * world - batch.size(0), *batch.shape[1:])])
    mine = fn(padded[rank * share : (rank + 1) * share]).contiguous()
    gathered = mine.new_empty(share * world, *mine.shape[1:])
    work = ALL_GATHER_SINGLE(gathered, mine, async_op=True)

    def wait():
        work.wait()
        return gathered[: batch.size(0)]

    return wait


class Muon(torch.optim.Optimizer):
    """Muon for the groups with use_muon=True, torch.optim.AdamW for the others (sharing their dicts and state).

    Muon group keys: lr, momentum, weight_decay (decoupled: p *= 1 - lr * wd), ns_steps, ns_split.
    AdamW group keys: lr, betas, eps, weight_decay. Any group may carry lr_scale (read by the loop).

    Distributed: with DDP the gradients are already averaged, so every rank would compute the same update;
    with FSDP2 each matrix's update is all-gathered and each rank applies its own shard of the result.
    Either way the Newton-Schulz work is split across ranks, then all-gathered (orthogonalized_updates).
    """

    def __init__(self, param_groups):
        kind_defaults = {True: dict(momentum=0.95, ns_steps=5, ns_split=1), False: dict(betas=(0.9, 0.95), eps=1e-8)}
        param_groups = [{**kind_defaults[bool(g.get("use_muon", True))], **g} for g in param_groups]
        super().__init__(param_groups, dict(lr=0.02, weight_decay=0.0, use_muon=True))
        self._adamw = None  # torch.optim.AdamW stepping the AdamW groups, made on the first step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon_step([group for group in self.param_groups if group["use_muon"]])
        if not all(group["use_muon"] for group in self.param_groups):
            self._adamw_groups().step()
        return loss

    def _muon_step(self, groups):
        """Every Muon group's step, with one Newton-Schulz batch per shape across the groups."""
        params, nesterov = [], []
        for group in groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                params.append((p, group))
                nesterov.append(p.grad.lerp(buf, group["momentum"]))  # g + beta * (buf - g): one momentum step ahead
        updates = orthogonalized_updates(nesterov, [g["ns_steps"] for _, g in params], [g["ns_split"] for _, g in params])
        for (p, group), update in zip(params, updates):
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"])

    def _adamw_groups(self) -> torch.optim.AdamW:
        """torch.optim.AdamW over this optimizer's AdamW groups: the very same group dicts (it adds its own
        defaults to them) and the same state, so state_dict() holds torch.optim.AdamW's layout. Made anew
        after load_state_dict, which replaces both."""
        if self._adamw is None or self._adamw.state is not self.state:
            groups = [g for g in self.param_groups if not g["use_muon"]]
            # the fused kernel (one launch for all of them) where torch has it, as configure_optimizers
            fused = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
            self._adamw = torch.optim.AdamW(groups, fused=fused)
            self._adamw.state = self.state
        return self._adamw
