"""
The GPT language model, in one file, read top to bottom.

GPT-2 by default: token + learned position embeddings, pre-LayerNorm transformer blocks
(causal self-attention with a fused QKV projection, 4x GELU MLP), a final LayerNorm and an LM
head tied to the token embedding. Parameter names follow Hugging Face's GPT-2 (wte, wpe, h.N,
ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj, ln_f, lm_head), so OpenAI's weights
load with a transpose and nothing else.

Options in GPTConfig, all off by default, turn it into a modern recipe (rotary positions,
RMSNorm, QK-norm, ReLU^2 or SwiGLU MLPs, an untied head, zero-initialised projections, logit
soft-capping); each is a small, named branch, so the GPT-2 path reads as before.

Also here: the LM head's loss in chunks, KV-cache sampling (stream / generate) and a bigram
baseline. Hugging Face conversion lives in forge/hf.py. Only torch is needed at import time, so
this file can be copied alone: then from_pretrained still reads a local GPT-2 folder.

References:
1) OpenAI's GPT-2 TensorFlow code: https://github.com/openai/gpt-2/blob/master/src/model.py
2) Hugging Face's PyTorch GPT-2:
   https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F


class ModelError(ValueError):
    """A bad input the user can fix; the message is one line naming the culprit and what to do.

    `user_error = True` makes forge.errors.run_main print it as one clean line (model.py does not
    import forge, so that it can be copied alone).
    """

    user_error = True


MLP_KINDS = ("gelu", "gelu_exact", "relu2", "swiglu")  # the values GPTConfig.mlp may take


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length: the most tokens the model sees at once
    vocab_size: int = 50304  # GPT-2's 50257 tokens padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # dropout probability (0 for pretraining, try 0.1+ for fine-tuning)
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2; False is a bit better and faster
    # Architecture options beyond GPT-2 (modern recipes, e.g. modded-nanogpt); all off by default.
    rotary: bool = False  # rotary position embeddings (RoPE) on queries and keys; no learned wpe table
    rotary_base: float = 10000.0  # RoPE base: rotation i turns by rotary_base ** (-2i / head size) per position
    rmsnorm: bool = False  # RMSNorm (scale only, no mean subtraction, no bias) instead of LayerNorm
    qk_norm: bool = False  # normalise each head's queries and keys before attention (stabler at high lr)
    mlp: str = "gelu"  # "gelu" (GPT-2's 4x GELU), "gelu_exact" (erf GELU, classic nanoGPT's), "relu2" (4x ReLU squared) or "swiglu" (gated SiLU, ~same params)
    untied_head: bool = False  # a separate lm_head matrix instead of reusing the token embedding
    zero_init_proj: bool = False  # attn.c_proj and mlp.c_proj start at zero, so every block starts as identity
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap), bounding them smoothly; 0 is off

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"{name}={value!r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.n_embd % self.n_head != 0:
            raise ModelError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                f"choose n_embd as a multiple of n_head (e.g. n_embd={self.n_head * 64})"
            )
        if self.rotary and (self.n_embd // self.n_head) % 2 != 0:
            raise ModelError(
                f"rotary needs an even head size, but n_embd/n_head = {self.n_embd // self.n_head}: "
                "change n_embd or n_head"
            )
        if self.rotary_base <= 0:
            raise ModelError(f"rotary_base={self.rotary_base!r} must be positive")
        if self.mlp not in MLP_KINDS:
            raise ModelError(f"mlp={self.mlp!r} is not one of {', '.join(map(repr, MLP_KINDS))}")
        if self.logit_softcap < 0:
            raise ModelError(f"logit_softcap={self.logit_softcap!r} must be >= 0 (0 turns it off)")


# ---------------------------------------------------------------------------------------------
# The transformer


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    """GPT-2's LayerNorm, or RMSNorm when config.rmsnorm (used for ln_1, ln_2, ln_f and QK-norm)."""
    if config.rmsnorm:
        return nn.RMSNorm(dim, eps=1e-5)
    return nn.LayerNorm(dim, eps=1e-5, bias=config.bias)


def rotary_cos_sin(pos, head_size, base):
    """cos and sin (T, hs/2) of the rotary angles pos * base ** (-2i / hs), in float32.

    Computed on the fly (it is tiny), so there is no buffer to checkpoint, move or cast.
    """
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32, device=pos.device) / head_size)
    angles = pos.float()[:, None] * inv_freq[None, :]  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate pairs (x[i], x[i + hs/2]) of x (B, nh, T, hs) by their position's angles.

    q . k then depends on the positions only through their difference (relative positions).
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class KVCache:
    """Keys and values of the tokens seen so far, one preallocated buffer pair per layer.

    It takes a prefill from position 0 and then one token at a time. Its entries are only valid
    while the context window starts where it did: once the window slides (past block_size) each
    entry has a new position and, in every layer but the first, was computed from tokens that
    have left the window. So the caller then starts a new cache (GPT.stream does).
    """

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = max_len  # the most tokens this cache can hold (<= block_size)
        self.pos = 0  # tokens cached so far = position of the next token
        self.k = [None] * n_layer  # per layer (B, nh, max_len, hs), allocated on first use
        self.v = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new tokens' k, v (B, nh, T, hs); return all keys and values so far (B, nh, pos+T, hs)."""
        B, nh, T, hs = k.shape
        if T > 1 and self.pos > 0:
            raise ValueError("KVCache takes a prefill from position 0, then one token at a time")
        if self.pos + T > self.max_len:
            raise ValueError(f"KVCache of {self.max_len} tokens is full")
        if self.k[layer] is None:  # allocate here to take the dtype autocast gave k and v
            self.k[layer] = k.new_empty(B, nh, self.max_len, hs)
            self.v[layer] = v.new_empty(B, nh, self.max_len, hs)
        end = self.pos + T
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n_tokens: int):
        """Called once per forward, after every layer has stored its keys and values."""
        self.pos += n_tokens


def matmul_attention_wanted(device) -> bool:
    """True where plain batched matmuls beat SDPA: a CPU computing float32 matmuls with bf16 products.

    That is torch.set_float32_matmul_precision("medium") on a CPU (forge/precision.py): SDPA's math
    kernel would compute in exact float32 and its flash kernel's many tiny matmuls crawl there, so
    two batched matmuls with an additive mask run ~2x faster (docs/BENCHMARKS.md).
    """
    return torch.device(device).type == "cpu" and torch.get_float32_matmul_precision() == "medium"


def causal_attention(q, k, v, dropout_p, matmul=None):
    """softmax(q k^T / sqrt(hs) + causal mask) v for q (B, nh, T, hs) and k, v (B, nh, S, hs).

    Either S == T (training, or a prompt filling an empty KV cache) or T == 1 (one new token, which
    attends to the whole cache). matmul: use two batched matmuls instead of SDPA; None decides by
    matmul_attention_wanted() on each call (eager use; a compiled model has it decided beforehand,
    see GPT.choose_attention_kernel).
    """
    B, nh, T, hs = q.size()
    S = k.size(2)
    if matmul is None:
        matmul = matmul_attention_wanted(q.device)
    if matmul:
        mask = torch.full((T, S), float("-inf"), device=q.device, dtype=q.dtype).triu(S - T + 1)  # 0 where seen
        att = torch.baddbmm(mask, q.reshape(B * nh, T, hs), k.reshape(B * nh, S, hs).transpose(1, 2),
                            alpha=1.0 / math.sqrt(hs))  # (B * nh, T, S)
        att = F.dropout(F.softmax(att, dim=-1), dropout_p)
        return torch.bmm(att, v.reshape(B * nh, S, hs)).view(B, nh, T, hs)
    # flash/memory-efficient kernels where available; a single new token needs no mask. A Python branch,
    # not is_causal=T > 1: under torch.compile with dynamic shapes (variable-width evaluation) T is
    # symbolic, SDPA rejects a symbolic is_causal, and the whole forward would fall back to eager
    if T > 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which KV-cache slot is ours
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # query, key and value projections for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection back into the residual stream
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # QK-norm option: per-head norms on queries and keys keep attention logits bounded
        head_size = config.n_embd // config.n_head
        self.q_norm = make_norm(config, head_size) if config.qk_norm else None
        self.k_norm = make_norm(config, head_size) if config.qk_norm else None
        self.matmul_attention = None  # None: decided per call; True/False: fixed (GPT.choose_attention_kernel)

    def forward(self, x, kv_cache=None, rope=None):
        B, T, C = x.size()  # batch, sequence length, n_embd
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.q_norm is not None:  # in the gains' dtype: autocast hands us bf16 q, k but float32 gains
            q = self.q_norm(q.to(self.q_norm.weight.dtype)).type_as(v)
            k = self.k_norm(k.to(self.k_norm.weight.dtype)).type_as(v)
        if rope is not None:  # rotary option: (cos, sin) of these T positions
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, pos+T, hs)
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0, self.matmul_attention)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = 4 * config.n_embd
        fc_out = hidden
        if config.mlp == "swiglu":
            # two thirds of 4x (rounded up to a multiple of 64 for fast matmuls) keeps about the
            # parameter count of the 4x MLP; c_fc makes the gate and the value in one matmul
            hidden = 64 * math.ceil(8 * config.n_embd / 3 / 64)
            fc_out = 2 * hidden
        self.c_fc = nn.Linear(config.n_embd, fc_out, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, hidden), or (B, T, 2 * hidden) for swiglu
        if self.kind == "gelu":
            # the tanh approximation is what GPT-2 was trained with (Hugging Face's "gelu_new")
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "gelu_exact":
            # the erf form (classic nanoGPT's nn.GELU(), HF's activation_function="gelu"): ~2.5x cheaper than tanh on CPUs
            h = F.gelu(h)
        elif self.kind == "relu2":
            h = F.relu(h)
            h = h * h  # the same values as h.square(), whose pow-based backward is ~4x slower on a CPU
        else:  # swiglu
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, rope=None):
        x = x + self.attn(self.ln_1(x), kv_cache, rope)
        x = x + self.mlp(self.ln_2(x))
        return x


# ---------------------------------------------------------------------------------------------
# The LM head and cross-entropy in chunks (training): the full (B*T, V) logits never exist at once

CHUNK_ELEMENTS = 1 << 25  # logits per chunk: 32M elements (a 128 MB float32 block), unless MAX_CHUNKS caps the count
MAX_CHUNKS = 32  # each chunk is one unrolled step in a compiled graph


def _chunk_losses(x, weight, targets, softcap, grads):
    """Per chunk of rows: (summed loss, grad wrt x or None, grad wrt weight or None), grads of the summed loss.

    x (N, C), weight (V, C), targets (N,) with -1 ignored. Logits are float32 only one chunk at a time.
    """
    n_chunks = min(MAX_CHUNKS, max(1, -(-x.size(0) * weight.size(0) // CHUNK_ELEMENTS)))
    loss = x.new_zeros((), dtype=torch.float32)
    grad_x, grad_w = [], None
    for x_c, y_c in zip(x.chunk(n_chunks), targets.chunk(n_chunks)):
        logits = F.linear(x_c, weight).float()  # (n, V)
        if softcap:
            tanh = torch.tanh(logits / softcap)
            logits = softcap * tanh
        valid = y_c != -1
        target = y_c.clamp(min=0).unsqueeze(1)  # an ignored row picks class 0, then counts 0
        lse = torch.logsumexp(logits, dim=-1)
        loss = loss + ((lse - logits.gather(1, target).squeeze(1)) * valid).sum()
        if not grads:
            continue
        # d loss / d logits = softmax - one_hot(target), zero on ignored rows; through the softcap x (1 - tanh^2)
        g = torch.exp(logits - lse.unsqueeze(1)).scatter_add(1, target, -torch.ones_like(target, dtype=logits.dtype))
        g = g * valid.unsqueeze(1)
        if softcap:
            g = g * (1 - tanh * tanh)
        g = g.to(weight.dtype)  # the matmuls below run as the forward's did (autocast casts them alike)
        grad_x.append(g @ weight)  # (n, C)
        partial = g.t() @ x_c  # (V, C)
        grad_w = partial.float() if grad_w is None else grad_w + partial.float()
    return loss, (torch.cat(grad_x) if grads else None), grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the head's logits; forward also makes the gradients, chunk by chunk,
    so backward keeps no logits (a scalar times the saved gradients)."""

    @staticmethod
    def forward(ctx, x, weight, targets, softcap):
        loss, grad_x, grad_w = _chunk_losses(x, weight, targets, softcap, grads=True)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.dtypes = (x.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return (grad_x.float() * grad_loss).to(ctx.dtypes[0]), (grad_w * grad_loss).to(ctx.dtypes[1]), None, None


def linear_cross_entropy(x, weight, targets, softcap=0.0):
    """F.cross_entropy(softcap(x @ weight^T), targets, ignore_index=-1) (mean over the counted targets),
    computed a chunk of rows at a time, so the (N, V) float32 logits are never materialised.

    x (N, C), weight (V, C), targets (N,). Gradients equal the plain path's (float32 softmax, the
    matmuls in the forward's dtype); with gradients on, they are made during forward (no recomputation).
    """
    count = (targets != -1).sum()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        total = _LinearCrossEntropy.apply(x, weight, targets, softcap)
    else:
        total = _chunk_losses(x, weight, targets, softcap, grads=False)[0]
    return total / count  # 0 counted targets: nan, as F.cross_entropy


class LanguageModel(nn.Module):
    """What GPT and the bigram baseline share: generate() on top of stream(), AdamW, MFU.

    A subclass provides forward(idx, targets), stream(...), get_num_params() and flops_per_token().
    """

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                 vocab_size=None):
        """Continue idx (B, T) by max_new_tokens sampled tokens; returns (B, T + max_new_tokens).

        Same arguments as stream(); temperature=0 is greedy decoding.
        """
        new_tokens = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, generator, vocab_size))
        return torch.cat([idx, *new_tokens], dim=1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices (>= 2-D: matmul weights, embeddings) only.

        Biases and norm gains are not decayed. The fused kernel (one launch for all parameters)
        is used on CUDA and CPU, where torch has it.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = device_type in ("cuda", "cpu")  # torch 2.13 has fused AdamW for both (FSDP2's DTensors too)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), fused=fused)

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops=None):
        """Model FLOPs utilisation: achieved FLOP/s as a fraction of the device's peak.

        tokens_per_iter: tokens this process trained on (forward + backward) in dt seconds, e.g.
        batch_size * block_size * its gradient-accumulation steps; the result is per device.
        peak_flops: the device's peak FLOP/s to compare with (forge.flops.device_peak_flops knows
        common GPUs'). Returns None when it is not given (unknown), or when the model does no
        matmuls (the bigram).
        """
        flops = self.flops_per_token()
        if not peak_flops or not flops or dt <= 0:
            return None
        return flops * tokens_per_iter / dt / peak_flops


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from logits (B, V): greedy at temperature 0, else sample; returns (B, 1).

    top_k keeps the k most likely tokens; top_p keeps the smallest set of most likely tokens whose
    probability adds up to at least top_p (nucleus sampling). Both may be combined.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature  # float32: softmax of bf16 logits loses the tail
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the more likely tokens
        sorted_drop = mass_before >= top_p  # never drops the most likely token (mass_before = 0)
        drop = sorted_drop.scatter(1, sorted_idx, sorted_drop)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def check_sampling_args(idx, max_new_tokens, temperature, top_k, top_p):
    """One clear error for each bad sampling argument, before any work is done."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(1) == 0:
        shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ModelError(f"prompt idx must be a (batch, tokens) tensor with at least one token, got {shape}")
    if idx.is_floating_point() or idx.is_complex():
        raise ModelError(f"prompt idx must hold integer token ids, got dtype {idx.dtype}")
    if max_new_tokens < 0:
        raise ModelError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ModelError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise ModelError(f"top_k={top_k} must be >= 1 (or None to keep every token)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ModelError(f"top_p={top_p} must be in (0, 1] (or None to keep every token)")


class GPT(LanguageModel):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))  # token embedding
        if not config.rotary:  # GPT-2: a learned vector per position (rotary rotates q and k instead)
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules["drop"] = nn.Dropout(config.dropout)
        modules["h"] = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        modules["ln_f"] = make_norm(config, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if not config.untied_head:
            # weight tying (https://paperswithcode.com/method/weight-tying): the same matrix maps
            # tokens to vectors and vectors to logits, as in GPT-2; it saves vocab x n_embd params
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the projections into the residual stream by 1/sqrt(2 * n_layer) (two per
        # block), so the residual stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Number of parameters; non_embedding=True leaves out the lookup-only tables.

        Those are the position table and, with an untied head, the token embedding. A token
        embedding tied to the LM head is counted: its matrix does a matmul for every token, a
        lookup does none. This is the N of flops_per_token().
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n_params -= self.transformer.wpe.weight.numel()
            if self.config.untied_head:
                n_params -= self.transformer.wte.weight.numel()
        return n_params

    def choose_attention_kernel(self):
        """Fix each block's attention kernel (SDPA or plain matmuls) for this device and float32 matmul
        precision now, instead of on every call: call it after moving the model and before
        torch.compile, in whose graph reading the precision would be a graph break per layer."""
        matmul = matmul_attention_wanted(next(self.parameters()).device)
        for block in self.transformer.h:
            block.attn.matmul_attention = matmul

    def forward(self, idx, targets=None, kv_cache=None, return_logits=True):
        """idx (B, T) token ids -> (logits, loss).

        With targets (B, T): logits (B, T, V) and the mean cross-entropy, ignoring targets of -1.
        Without: logits of the last position only (B, 1, V) and loss None, the cheap inference path.
        kv_cache: a KVCache to read and extend (used by stream()); positions continue from it.
        return_logits=False (with targets; what training and loss evaluation use): (None, loss), the
        head and loss computed in chunks (linear_cross_entropy), so the (B, T, V) logits, the largest
        tensor of a GPT-2 step, are never materialised; the loss and gradients are the same.
        """
        B, T = idx.size()
        start = 0 if kv_cache is None else kv_cache.pos
        if start + T > self.config.block_size:
            raise ModelError(
                f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}: "
                f"crop it to the last {self.config.block_size} tokens"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # token embeddings (B, T, C)
        rope = None
        if self.config.rotary:  # positions enter attention as rotations of q and k
            rope = rotary_cos_sin(pos, self.config.n_embd // self.config.n_head, self.config.rotary_base)
        else:
            x = x + self.transformer.wpe(pos)  # position embeddings (T, C), broadcast over the batch
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, kv_cache, rope)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        if targets is not None and not return_logits:
            cap = self.config.logit_softcap
            return None, linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), cap)
        if targets is None:
            x = x[:, -1:, :]  # inference: only the last position's logits; the slice keeps the time dim
        logits = self.lm_head(x)  # (B, T, V) or (B, 1, V)
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, vocab_size=None):
        """Yield max_new_tokens new tokens, each a (B, 1) tensor, as soon as it is sampled.

        idx (B, T): the prompt. A prompt longer than block_size is cropped to its last block_size
        tokens, as the context is whenever it grows past block_size (what nanoGPT's generate does).
        KV cache: the prompt is prefilled once, then each step runs the model on one token. Once
        the context is longer than block_size, the window slides by one token per step and every
        cached entry is stale (see KVCache), so each such step re-prefills the cropped window, with
        every architecture option: the output always equals forward() on the cropped context.
        Runs with dropout off (eval mode) and restores the module's mode afterwards.
        temperature=0 is greedy; top_k / top_p / generator: see sample_next_token().
        vocab_size: the tokenizer's vocabulary; only ids below it are drawn, never one of the rows
        a vocabulary is padded with for speed (50,257 -> 50,304), which no tokenizer can decode.
        """
        check_sampling_args(idx, max_new_tokens, temperature, top_k, top_p)
        block_size = self.config.block_size
        was_training = self.training
        self.eval()
        try:
            kv_cache = None
            for _ in range(max_new_tokens):
                if kv_cache is None or kv_cache.pos == block_size:  # first step, or the window slides
                    context = idx[:, -block_size:]
                    kv_cache = KVCache(self.config.n_layer, min(block_size, context.size(1) + max_new_tokens))
                    logits, _ = self(context, kv_cache=kv_cache)
                else:
                    logits, _ = self(idx[:, -1:], kv_cache=kv_cache)
                next_token = sample_next_token(logits[:, -1, :vocab_size], temperature, top_k, top_p, generator)  # (B, 1)
                idx = torch.cat((idx, next_token), dim=1)
                yield next_token
        finally:
            self.train(was_training)

    def crop_block_size(self, block_size):
        """Shrink the context length, e.g. to fine-tune GPT-2 (1024) with a smaller block_size."""
        if not 1 <= block_size <= self.config.block_size:
            raise ModelError(
                f"cannot crop block_size to {block_size}: it must be between 1 and the model's "
                f"block_size={self.config.block_size} (a model cannot be grown this way)"
            )
        self.config.block_size = block_size
        if "wpe" in self.transformer:  # (rotary has no position table to crop)
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def flops_per_token(self):
        """FLOPs of one training token (forward + backward), as in the PaLM paper, appendix B.

        6N for the matmuls with the N parameters of get_num_params() (2 per multiply-add forward,
        4 backward; the tied LM head counts once, as the matmul it is) plus 12 * L * H * Q * T for
        attention's scores and weighted sums over a full context of T tokens.
        """
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.get_num_params() + 12 * L * H * Q * T

    # -----------------------------------------------------------------------------------------
    # GPT-2 in Hugging Face format: the conversion lives in forge/hf.py

    @classmethod
    def from_pretrained(cls, name_or_dir, override_args=None):
        """GPT-2 weights: 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' from the Hugging Face Hub, or a
        local Hugging Face GPT-2 folder; override_args may set dropout and (a smaller) block_size.

        forge.hf.load_pretrained does it. Where model.py is used without gptforge's forge package,
        a local folder of config.json and model.safetensors still loads (_load_hf_folder).
        """
        try:
            from forge.hf import load_pretrained
        except ModuleNotFoundError as exc:
            if exc.name not in ("forge", "forge.hf"):
                raise
            load_pretrained = _load_hf_folder
        return load_pretrained(cls, name_or_dir, override_args)

    def save_pretrained(self, save_dir, vocab_size=None, meta=None, tokenizer_dir=None):
        """Export to a Hugging Face GPT-2 folder for transformers: see forge.hf.save_pretrained."""
        from forge.hf import save_pretrained

        return save_pretrained(self, save_dir, vocab_size, meta, tokenizer_dir)


def _load_hf_folder(cls, folder, override_args=None):
    """from_pretrained without forge/hf.py: a local folder of config.json and model.safetensors,
    converted as forge/hf.py does but without its checks, the Hub, and sharded or .bin files.

    Kept minimal on purpose, and its own copy of the name mapping: it is what lets this file,
    copied alone with only torch (and safetensors) installed, still load GPT-2 weights.
    """
    from safetensors.torch import load_file

    hf = json.loads((Path(folder) / "config.json").read_text())
    override_args = override_args or {}
    model = cls(GPTConfig(
        block_size=hf.get("n_positions", hf.get("n_ctx")), vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
        n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=override_args.get("dropout", 0.0),
        mlp="gelu_exact" if hf.get("activation_function") == "gelu" else "gelu",
        untied_head=not hf.get("tie_word_embeddings", True),
    ))
    hf_sd = {k.removeprefix("transformer."): v for k, v in load_file(Path(folder) / "model.safetensors").items()}
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is wte (named once)
            tensor = hf_sd[name.removeprefix("transformer.")]
            # HF GPT-2 stores the blocks' Linear weights as Conv1D, (in, out)
            p.copy_(tensor.t() if name.startswith("transformer.h.") and p.dim() == 2 else tensor)
    if "block_size" in override_args:
        model.crop_block_size(override_args["block_size"])
    return model


# ---------------------------------------------------------------------------------------------
# The bigram baseline


@dataclass
class BigramConfig:
    vocab_size: int  # tokens in the vocabulary; the table is vocab_size x vocab_size
    block_size: int = 1024  # length of the training sequences (the model itself looks at one token)


class BigramLanguageModel(LanguageModel):
    """The simplest language model: the next token's logits are a row of a table, picked by the
    current token. A teaching baseline: any real model must beat its loss."""

    def __init__(self, vocab_size, block_size=1024):
        super().__init__()
        self.config = BigramConfig(vocab_size=vocab_size, block_size=block_size)
        self.logits_table = nn.Embedding(vocab_size, vocab_size)  # row t: logits of the token after t
        nn.init.normal_(self.logits_table.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, return_logits=True):
        """Same contract as GPT.forward: (B, T, V) logits (None if not return_logits) and the loss with
        targets, else (B, 1, V)."""
        if targets is not None:
            logits = self.logits_table(idx)  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            return (logits if return_logits else None), loss
        return self.logits_table(idx[:, -1:]), None  # (B, 1, V)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, vocab_size=None):
        """Yield max_new_tokens new (B, 1) tokens; each depends on the previous token only."""
        check_sampling_args(idx, max_new_tokens, temperature, top_k, top_p)
        token = idx[:, -1:]
        for _ in range(max_new_tokens):
            logits = self.logits_table(token)[:, -1, :vocab_size]
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            yield token

    def get_num_params(self, non_embedding=True):
        """The table's size: it is the model's only parameter (and its output layer)."""
        return self.logits_table.weight.numel()

    def flops_per_token(self):
        """0: a table lookup does no matmul, so MFU does not apply (estimate_mfu returns None)."""
        return 0

