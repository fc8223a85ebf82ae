"""model.py's architecture options beyond GPT-2 (issue 8): each off by default, each tested here,
and KV-cache generation equal to the no-cache reference with every one of them."""
import math
import warnings

import pytest
import torch
from torch.nn import functional as F

from model import GPT, MLP, GPTConfig, ModelError, apply_rotary, rotary_cos_sin
from tests.test_model import SMALL, make_gpt, reference_generate, tokens

OPTIONS = {
    "rotary": dict(rotary=True),
    "rmsnorm": dict(rmsnorm=True),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(mlp="relu2"),
    "swiglu": dict(mlp="swiglu"),
    "untied_head": dict(untied_head=True),
    "zero_init_proj": dict(zero_init_proj=True),
    "logit_softcap": dict(logit_softcap=5.0),
    "all": dict(rotary=True, rmsnorm=True, qk_norm=True, mlp="swiglu", untied_head=True, logit_softcap=5.0, bias=False),
}


def test_options_are_off_by_default():
    config = GPTConfig()
    assert not (config.rotary or config.rmsnorm or config.qk_norm or config.untied_head or config.zero_init_proj)
    assert config.mlp == "gelu" and config.logit_softcap == 0.0


@pytest.mark.parametrize("name", list(OPTIONS))
def test_kv_cache_greedy_equals_no_cache_with_each_option(name):
    model = make_gpt(**OPTIONS[name])
    for prompt_len, new_tokens in ((5, 25), (20, 3)):  # slides past block_size 16; prompt longer than it
        idx = tokens(2, prompt_len)
        assert torch.equal(model.generate(idx, new_tokens, temperature=0), reference_generate(model, idx, new_tokens))


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_trains(name):
    model = make_gpt(scale=1.0, **OPTIONS[name]).train()
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    idx = tokens(4, 16)
    targets = idx.roll(-1, dims=1)
    losses = []
    for _ in range(5):
        _, loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_config_rejects_bad_option_values():
    with pytest.raises(ModelError, match=r"mlp='geglu' is not one of 'gelu', 'gelu_exact', 'relu2', 'swiglu'"):
        GPTConfig(mlp="geglu")
    with pytest.raises(ModelError, match="rotary needs an even head size"):
        GPTConfig(n_embd=30, n_head=2, rotary=True)
    with pytest.raises(ModelError, match="logit_softcap"):
        GPTConfig(logit_softcap=-1.0)


def test_rotary_has_no_position_table_and_depends_on_relative_positions():
    model = make_gpt(rotary=True)
    assert "wpe" not in model.transformer
    assert all("wpe" not in name for name, _ in model.named_parameters())
    hs = 16
    q, k = torch.randn(2, hs), torch.randn(2, hs)  # one query, one key

    def score(q_pos, k_pos):
        cos, sin = rotary_cos_sin(torch.tensor([q_pos, k_pos]), hs, 10000.0)
        rq = apply_rotary(q[None, None, :1], cos[:1], sin[:1])
        rk = apply_rotary(k[None, None, :1], cos[1:], sin[1:])
        return (rq * rk).sum().item()

    assert score(7, 3) == pytest.approx(score(12, 8), abs=1e-4)  # same distance, same score
    assert score(7, 3) != pytest.approx(score(7, 1), abs=1e-3)  # another distance, another score
    x = torch.randn(1, 2, 5, hs)
    cos, sin = rotary_cos_sin(torch.arange(5), hs, 10000.0)
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))  # a rotation
    # the token at position 0 is not rotated
    torch.testing.assert_close(apply_rotary(x, cos, sin)[:, :, 0], x[:, :, 0])
    model.crop_block_size(8)  # nothing to crop but the limit
    assert model.config.block_size == 8


def test_rmsnorm_replaces_every_layernorm():
    model = make_gpt(rmsnorm=True, qk_norm=True)
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))]
    assert len(norms) == 2 * 2 + 1 + 2 * 2 and all(isinstance(m, torch.nn.RMSNorm) for m in norms)
    x = torch.randn(3, 32)
    ln = model.transformer.ln_f
    torch.testing.assert_close(ln(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * ln.weight)


def test_qk_norm_normalises_each_heads_queries_and_keys():
    model = make_gpt(qk_norm=True, rmsnorm=True)
    attn = model.transformer.h[0].attn
    seen = []
    attn.q_norm.register_forward_hook(lambda module, args, out: seen.append(out))
    attn.k_norm.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        attn.q_norm.weight.fill_(1.0)
        attn.k_norm.weight.fill_(1.0)
        model(tokens(2, 9))
    q, k = seen
    assert q.shape == k.shape == (2, 2, 9, 16)  # (B, nh, T, hs): normalised per head
    for t in (q, k):
        torch.testing.assert_close(t.pow(2).mean(-1), torch.ones(2, 2, 9), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", ["gelu", "gelu_exact", "relu2", "swiglu"])
def test_mlp_kinds_compute_their_formula(kind):
    torch.manual_seed(0)
    mlp = MLP(GPTConfig(**SMALL, mlp=kind)).eval()
    x = torch.randn(2, 5, 32, requires_grad=True)
    h = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
    if kind == "gelu":
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # HF's gelu_new
    elif kind == "gelu_exact":
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # classic nanoGPT's nn.GELU()
    elif kind == "relu2":
        h = torch.clamp(h, min=0) ** 2
    else:
        gate, value = h.chunk(2, dim=-1)
        h = gate * torch.sigmoid(gate) * value
    out, expected = mlp(x), h @ mlp.c_proj.weight.T + mlp.c_proj.bias
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out)  # and the gradient the backward pass gives (relu2 has its own form)
    grad, = torch.autograd.grad(out, x, upstream)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, x, upstream)[0], atol=1e-5, rtol=1e-5)
    if kind == "swiglu":  # 2/3 of 4x rounded up to 64: 85.3 -> 128 here; 768 wide -> exactly 2048
        assert mlp.c_proj.in_features == 128
        assert MLP(GPTConfig(mlp="swiglu")).c_proj.in_features == 2048


def test_untied_head_is_a_separate_matrix_and_counted_honestly():
    tied, untied = make_gpt(), make_gpt(untied_head=True)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    V, C = 50, 32
    assert untied.get_num_params(non_embedding=False) == tied.get_num_params(non_embedding=False) + V * C
    # the untied token table is a lookup (no FLOPs), the head a matmul: N is the same as tied
    assert untied.get_num_params() == tied.get_num_params() and untied.flops_per_token() == tied.flops_per_token()
    optimizer = untied.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert id(untied.lm_head.weight) in decayed and id(untied.transformer.wte.weight) in decayed


def test_zero_init_proj_makes_every_block_start_as_identity():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, zero_init_proj=True)).eval()
    projections = [p for name, p in model.named_parameters() if name.endswith("c_proj.weight")]
    assert len(projections) == 4 and all(torch.count_nonzero(p) == 0 for p in projections)
    idx = tokens(2, 8)
    logits, _ = model(idx, idx)
    t = model.transformer
    expected = model.lm_head(t.ln_f(t.wte(idx) + t.wpe(torch.arange(8))))
    torch.testing.assert_close(logits, expected)
    c_fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in t.h])
    assert c_fc.std().item() == pytest.approx(0.02, rel=0.1)  # the rest keeps GPT-2's init


def test_logit_softcap_bounds_the_logits():
    capped, plain = make_gpt(logit_softcap=2.0), make_gpt()  # same seed: same weights
    idx = tokens(2, 8)
    capped_logits, capped_loss = capped(idx, idx)
    plain_logits, _ = plain(idx, idx)
    assert plain_logits.abs().max() > 2.0 > capped_logits.abs().max()
    torch.testing.assert_close(capped_logits, 2.0 * torch.tanh(plain_logits / 2.0))
    torch.testing.assert_close(capped_loss, F.cross_entropy(capped_logits.view(-1, 50), idx.view(-1)))


@pytest.mark.parametrize(
    "options, culprit",
    [
        (dict(rotary=True), "rotary"),
        (dict(rmsnorm=True), "rmsnorm"),
        (dict(qk_norm=True), "qk_norm"),
        (dict(mlp="swiglu"), "mlp='swiglu'"),
        (dict(logit_softcap=30.0), "logit_softcap"),
    ],
)
def test_save_pretrained_refuses_options_gpt2_does_not_have(tmp_path, options, culprit):
    model = make_gpt(**options)
    with pytest.raises(ModelError, match=f"cannot export to GPT-2 format: this model uses {culprit}"):
        model.save_pretrained(tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("options", [OPTIONS["all"], dict(qk_norm=True)], ids=["all", "qk_norm_layernorm"])
def test_options_run_under_bf16_autocast_without_dtype_warnings(options):
    model = make_gpt(scale=1.0, **options).train()
    idx = tokens(2, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Mismatch dtype between input and weight"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
            loss.backward()
            out = model.generate(idx[:, :4], 14, temperature=0)
    assert math.isfinite(loss.item()) and out.shape == (2, 18)
