"""model.py: attention, loss, KV-cache sampling, cropping, optimizer groups, MFU, bigram, bad inputs."""
import math

import pytest
import torch
from torch.nn import functional as F

import model as model_module
from forge.checkpoint import build_model
from forge.flops import PEAK_FLOPS, device_peak_flops, peak_flops_for_gpu_name
from model import (
    GPT,
    BigramLanguageModel,
    CausalSelfAttention,
    GPTConfig,
    ModelError,
    sample_next_token,
)
from tests.util import assert_clean_error, run_py

SMALL = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)


def make_gpt(seed=0, scale=10.0, **overrides):
    """A small GPT with its matrices `scale` times their initial size (plus a little noise, so
    zero-initialised ones move too): logits far from uniform, so greedy decoding has clear
    winners (no ties that float noise could flip)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale).add_(0.05 * torch.randn_like(p))
    return model


def tokens(*shape, vocab=50, seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def reference_generate(model, idx, max_new_tokens):
    """Greedy decoding the plain nanoGPT way: no cache, the context cropped to block_size each step."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat((idx, logits[:, -1, :].argmax(dim=-1, keepdim=True)), dim=1)
    return idx


# --- config and forward ------------------------------------------------------------------------


def test_config_rejects_n_embd_not_divisible_by_n_head():
    with pytest.raises(ModelError, match=r"n_embd=100 is not divisible by n_head=12"):
        GPTConfig(n_embd=100, n_head=12)
    with pytest.raises(ModelError, match="n_layer=0"):
        GPTConfig(n_layer=0)
    with pytest.raises(ModelError, match="dropout"):
        GPTConfig(dropout=1.0)


def test_sdpa_attention_equals_explicit_masked_softmax():
    torch.manual_seed(0)
    config = GPTConfig(**SMALL)
    attn = CausalSelfAttention(config, layer_idx=0).eval()
    x = torch.randn(2, 7, config.n_embd)
    B, T, C = x.shape
    hs = C // config.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, config.n_head, hs).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    weights = F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    expected = attn.c_proj((weights @ v).transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("precision", ["high", "medium"])  # medium on a CPU: the plain-matmul path, not SDPA
def test_causal_attention_equals_masked_softmax_with_and_without_a_cache(precision):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 9, 16).unbind(0)  # (B, nh, T, hs) each
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(16)
    mask = torch.tril(torch.ones(9, 9, dtype=torch.bool))
    expected = F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v.double()
    torch.set_float32_matmul_precision(precision)
    tolerance = dict(atol=3e-2, rtol=3e-2) if precision == "medium" else dict(atol=1e-5, rtol=1e-5)  # bf16 products
    torch.testing.assert_close(model_module.causal_attention(q, k, v, 0.0).double(), expected, **tolerance)
    # the last token alone against keys and values for all 9 positions (a KV cache): the last row
    last = model_module.causal_attention(q[:, :, -1:], k, v, 0.0)
    torch.testing.assert_close(last.double(), expected[:, :, -1:], **tolerance)


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_causal_attention_with_dropout_never_looks_ahead(precision):
    torch.set_float32_matmul_precision(precision)
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in torch.randn(3, 2, 4, 9, 16).unbind(0))
    y = model_module.causal_attention(q, k, v, 0.5)
    y[:, :, 3].sum().backward()  # position 3's output
    for grad in (k.grad, v.grad):
        assert grad[:, :, 4:].abs().max() == 0 and grad[:, :, :4].abs().max() > 0
    y2 = model_module.causal_attention(q, k, v, 0.5)
    assert not torch.equal(y, y2)  # dropout really applied: two draws differ


def test_forward_shapes_and_last_position_logits():
    model = make_gpt()
    idx = tokens(3, 10)
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (3, 10, 50) and loss.shape == ()
    last_logits, no_loss = model(idx)
    assert last_logits.shape == (3, 1, 50) and no_loss is None
    torch.testing.assert_close(last_logits[:, 0], logits[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{}, dict(logit_softcap=3.0), dict(untied_head=True), dict(untied_head=True, logit_softcap=2.0)])
def test_chunked_head_and_loss_equal_the_plain_path(options, monkeypatch):
    """return_logits=False (training's path): the same loss and gradients, tied or untied head, softcap or
    not, targets of -1 ignored, over several uneven chunks; the (N, V) logits are never saved for backward."""
    model = make_gpt(scale=1.0, **options).train()
    idx, targets = tokens(3, 16), tokens(3, 16, seed=2)
    targets[0, :5] = -1
    _, plain = model(idx, targets)
    plain.backward()
    plain_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(model_module, "CHUNK_ELEMENTS", 700)  # 48 rows x 50 classes: 4 chunks (12 rows each)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        logits, chunked = model(idx, targets, return_logits=False)
    chunked.backward()
    assert logits is None
    assert not [s for s in saved if s[-1:] == (50,) and s.numel() >= 12 * 50]  # not even one chunk of logits
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():  # evaluation: no gradients made
        torch.testing.assert_close(model(idx, targets, return_logits=False)[1], plain, atol=1e-6, rtol=1e-6)


def test_chunked_loss_under_bf16_autocast_is_close_to_the_plain_path():
    model = make_gpt(scale=1.0, logit_softcap=5.0).train()
    idx, targets = tokens(2, 16), tokens(2, 16, seed=3)
    with torch.autocast("cpu", torch.bfloat16):
        _, plain = model(idx, targets)
    plain.backward()
    plain_grad = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16):
        _, chunked = model(idx, targets, return_logits=False)
    chunked.backward()
    assert chunked.dtype == torch.float32 and model.lm_head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(chunked, plain.float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(model.lm_head.weight.grad, plain_grad, atol=2e-3, rtol=5e-2)


def test_loss_is_mean_cross_entropy_ignoring_minus_one():
    model = make_gpt()
    idx = tokens(2, 8)
    targets = tokens(2, 8, seed=2)
    targets[0, :3] = -1
    targets[1, 5] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    expected = -F.log_softmax(logits, dim=-1)[keep].gather(1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, expected)


def test_forward_rejects_sequence_longer_than_block_size():
    model = make_gpt()
    with pytest.raises(ModelError, match=r"sequence of 17 tokens is longer than block_size=16"):
        model(tokens(1, 17))


def test_weight_tying_and_residual_projection_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=32, vocab_size=512))
    assert model.lm_head.weight is model.transformer.wte.weight
    c_proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h])
    c_fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.transformer.h])
    assert c_proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert c_fc.std().item() == pytest.approx(0.02, rel=0.05)


def test_get_num_params_counts_by_hand():
    model = GPT(GPTConfig(**SMALL))
    V, C, T, L = 50, 32, 16, 2
    per_block = (2 * 2 * C) + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    total = V * C + T * C + L * per_block + 2 * C  # wte (tied head), wpe, blocks, ln_f
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == total - T * C


def test_crop_block_size():
    model = make_gpt()
    idx = tokens(1, 8)
    before, _ = model(idx, idx)
    model.crop_block_size(8)
    assert model.config.block_size == 8 and model.transformer.wpe.weight.shape == (8, 32)
    after, _ = model(idx, idx)
    torch.testing.assert_close(after, before)  # the first 8 positions are untouched
    with pytest.raises(ModelError, match=r"cannot crop block_size to 9.*block_size=8"):
        model.crop_block_size(9)


# --- sampling ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt_len, new_tokens",
    [(5, 8), (5, 30), (20, 6)],  # inside block_size, sliding past it, a prompt longer than it
)
def test_kv_cache_greedy_equals_no_cache_reference(prompt_len, new_tokens):
    model = make_gpt()
    idx = tokens(2, prompt_len)
    out = model.generate(idx, new_tokens, temperature=0)
    assert out.shape == (2, prompt_len + new_tokens)
    assert torch.equal(out, reference_generate(model, idx, new_tokens))


def test_kv_cache_prefills_once_then_one_token_per_step():
    model = make_gpt()
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0].shape[1]), with_kwargs=True)
    model.generate(tokens(1, 5), 8, temperature=0)
    assert seen == [5] + [1] * 7
    seen.clear()
    model.generate(tokens(1, 14), 5, temperature=0)  # past block_size 16: re-prefill the window
    assert seen == [14, 1, 1, 16, 16]


def test_stream_yields_each_token_and_generate_concatenates():
    model = make_gpt()
    idx = tokens(2, 4)
    streamed = list(model.stream(idx, 6, temperature=0))
    assert len(streamed) == 6 and all(t.shape == (2, 1) for t in streamed)
    assert torch.equal(model.generate(idx, 6, temperature=0), torch.cat([idx, *streamed], dim=1))


def test_generate_restores_training_mode():
    model = make_gpt(dropout=0.1).train()
    model.generate(tokens(1, 3), 2, temperature=0)
    assert model.training


def test_top_k_and_top_p_restrict_the_support():
    # probabilities 0.5, 0.25, 0.125, 0.0625, ... over 8 tokens, most likely first after a shuffle
    order = torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])
    logits = torch.empty(1, 8)
    logits[0, order] = -torch.arange(8.0) * math.log(2)
    logits = logits.expand(4000, 8)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next_token(logits, top_k=2, generator=gen).unique().tolist()) == {3, 7}
    # 0.5 + 0.25 = 0.75 < 0.8, so top_p=0.8 keeps three tokens
    assert set(sample_next_token(logits, top_p=0.8, generator=gen).unique().tolist()) == {3, 7, 0}
    assert set(sample_next_token(logits, top_p=0.1, generator=gen).unique().tolist()) == {3}
    assert set(sample_next_token(logits, top_k=2, top_p=0.8, generator=gen).unique().tolist()) == {3, 7}
    assert len(sample_next_token(logits, generator=gen).unique()) == 8  # unrestricted: all of them
    assert torch.equal(sample_next_token(logits[:2], temperature=0), torch.tensor([[3], [3]]))


def test_seeded_sampling_is_reproducible():
    model = make_gpt()
    model.apply(lambda m: m.weight.data.div_(10) if isinstance(m, torch.nn.Embedding) else None)  # flatter
    idx = tokens(2, 4)
    runs = [model.generate(idx, 20, top_k=10, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(idx=torch.zeros(1, 0, dtype=torch.long)), "idx"),
        (dict(idx=torch.zeros(3, dtype=torch.long)), "idx"),
        (dict(idx=torch.zeros(1, 3)), "integer"),
    ],
)
def test_bad_sampling_arguments_raise_model_error(kwargs, culprit):
    args = {"idx": tokens(1, 3), "max_new_tokens": 2, **kwargs}
    for model in (make_gpt(), BigramLanguageModel(50)):
        with pytest.raises(ModelError, match=culprit):
            model.generate(**args)


# --- optimizer and MFU -------------------------------------------------------------------------


def test_configure_optimizers_decays_matrices_only_and_uses_fused_adamw():
    model = make_gpt()
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-4, betas=(0.9, 0.95), device_type="cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    # every parameter in exactly one group; wte/lm_head (tied) once
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == model.get_num_params(False)
    assert len(decay["params"]) == 1 + 1 + 2 * 4  # wte, wpe, and per block c_attn, c_proj, c_fc, c_proj
    assert optimizer.defaults["fused"] is True and optimizer.defaults["betas"] == (0.9, 0.95)


def test_flops_per_token_and_estimate_mfu_by_hand():
    model = make_gpt()
    N = model.get_num_params()
    flops_per_token = 6 * N + 12 * 2 * 2 * 16 * 16  # L=2, H=2, Q=16, T=16
    assert model.flops_per_token() == flops_per_token
    mfu = model.estimate_mfu(tokens_per_iter=4096, dt=0.5, peak_flops=1e12)
    assert mfu == pytest.approx(flops_per_token * 4096 / 0.5 / 1e12)
    assert model.estimate_mfu(tokens_per_iter=4096, dt=0.5) is None  # a CPU has no table entry
    assert BigramLanguageModel(50).estimate_mfu(4096, 0.5, peak_flops=1e12) is None  # no matmuls


@pytest.mark.parametrize(
    "device_name, key",
    [
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100-PCIE-40GB", "A100"),
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("NVIDIA GeForce RTX 3090", "RTX 3090"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("Tesla T4", "T4"),
        ("AMD Instinct MI300X", "MI300X"),
        ("AMD Instinct MI325X", "MI325X"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA A40", "A40"),
        ("Tesla V100-PCIE-32GB", "V100 PCIe"),
    ],
)
def test_peak_flops_matches_device_names(device_name, key):
    assert peak_flops_for_gpu_name(device_name) == PEAK_FLOPS[key]


def test_peak_flops_unknown_device_and_cpu():
    for unlisted in ("NVIDIA GeForce GTX 1080", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA RTX A4000", "NVIDIA T400"):
        assert peak_flops_for_gpu_name(unlisted) is None, unlisted
    assert device_peak_flops("cpu", torch.bfloat16) is None


# --- bigram and build_model --------------------------------------------------------------------


class AdvancedIndexing(torch.overrides.TorchFunctionMode):
    """Records tensor indexing by a list or tensor: on a GPU each such index is a host-to-device copy."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, (list, torch.Tensor)) for i in index):
                self.seen.append(index)
        return func(*args, **(kwargs or {}))


def test_decoding_indexes_without_host_to_device_copies():
    """Every decoding step (KV cache, sampling with top_k/top_p, the window sliding) indexes by slices only."""
    prompt = tokens(2, 5)
    for model in (make_gpt(), model_module.BigramLanguageModel(50, block_size=16)):
        with AdvancedIndexing() as watch:
            model.generate(prompt, 14, temperature=0.8, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(0))
        assert watch.seen == [], type(model).__name__


def test_bigram_forward_and_generate():
    torch.manual_seed(0)
    bigram = BigramLanguageModel(vocab_size=20, block_size=8)
    assert bigram.config.block_size == 8 and bigram.get_num_params() == 400
    idx = tokens(2, 8, vocab=20)
    logits, loss = bigram(idx, idx)
    assert logits.shape == (2, 8, 20)
    torch.testing.assert_close(logits, bigram.logits_table.weight[idx])
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 20), idx.view(-1)))
    last, _ = bigram(idx)
    assert last.shape == (2, 1, 20)
    out = bigram.generate(idx, 5, temperature=0)
    expected = idx
    for _ in range(5):  # greedy: each next token is the argmax of the previous token's row
        expected = torch.cat((expected, bigram.logits_table.weight[expected[:, -1]].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, expected)
    # it learns: a few steps lower the loss
    optimizer = bigram.configure_optimizers(0.0, 0.1, (0.9, 0.95), "cpu")
    for _ in range(20):
        _, step_loss = bigram(idx, idx.roll(-1, dims=1))
        optimizer.zero_grad()
        step_loss.backward()
        optimizer.step()
    assert step_loss.item() < loss.item() - 0.5


def test_build_model():
    gpt = build_model("gpt", dict(SMALL, dropout=0.0, bias=False))
    assert isinstance(gpt, GPT) and gpt.config.bias is False and gpt.config.n_layer == 2
    bigram = build_model("bigram", dict(SMALL))  # GPT-only fields are ignored
    assert isinstance(bigram, BigramLanguageModel) and bigram.config.vocab_size == 50
    with pytest.raises(ModelError, match=r"unknown model_type 'llama'.*'gpt' or 'bigram'"):
        build_model("llama", SMALL)
    with pytest.raises(ModelError, match="n_lyer"):
        build_model("gpt", dict(SMALL, n_lyer=3))


def test_model_error_is_one_clean_line_under_run_main():
    script = (
        "from forge.errors import run_main; from model import GPTConfig; "
        "run_main(lambda: GPTConfig(n_embd=100, n_head=12))"
    )
    proc = run_py("-c", script)
    assert_clean_error(proc, "n_embd=100", "n_head=12")
