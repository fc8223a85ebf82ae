"""forge/optim.py: Newton-Schulz, the Muon step against a hand-computed one, param grouping, AdamW parity,
DDP and FSDP2 equal to one process, and the optimizer state through full distributed state dicts."""
import copy
import io

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.flop_counter import FlopCounterMode

from forge.errors import UserError
from forge.metrics import read_metrics
from forge.optim import (
    NS_COEFFICIENTS,
    Muon,
    build_optimizer,
    muon_param_groups,
    zeropower_via_newtonschulz,
)
from model import GPT, GPTConfig
from tests.util import REPO, end_spawned_worker, run_py

pytestmark = pytest.mark.usefixtures("one_thread")

FULL = StateDictOptions(full_state_dict=True)
MUON_ARGS = dict(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")


def tiny_gpt(seed=0, **overrides) -> GPT:
    """n_embd=9 is odd on purpose: the (27, 9) c_attn and (9, 9) c_proj shard unevenly over 2 ranks."""
    torch.manual_seed(seed)
    args = dict(block_size=8, vocab_size=13, n_layer=2, n_head=3, n_embd=9, dropout=0.0, bias=True)
    return GPT(GPTConfig(**{**args, **overrides}))


def batch(step, n=4, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    x = torch.randint(0, 13, (n, 8), generator=g)
    return x, torch.roll(x, -1, dims=1)


def polynomial_orthogonalisation(G, steps=5):
    """Newton-Schulz written on the SVD: U p(S / |G|_F) V^T, with p the quintic applied `steps` times."""
    a, b, c = NS_COEFFICIENTS
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    s = S / G.double().norm()
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return (U * s) @ Vh


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (3, 48, 96)])
def test_newton_schulz_is_near_orthogonal_and_matches_its_svd_form(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    X = zeropower_via_newtonschulz(G, steps=5)
    assert X.shape == G.shape and X.dtype == torch.float32
    singular_values = torch.linalg.svdvals(X)
    assert singular_values.min() > 0.65 and singular_values.max() < 1.21, singular_values
    for g, x in zip(G.reshape(-1, *shape[-2:]), X.reshape(-1, *shape[-2:])):
        torch.testing.assert_close(x.double(), polynomial_orthogonalisation(g), atol=2e-5, rtol=0)


def test_newton_schulz_on_wide_matrices_holds_over_six_decades_of_singular_values():
    """A wide float32 matrix iterates on X X^T, which squares its condition number: singular values spread
    over six decades, as a momentum's few large directions over small noise, still give the SVD form within
    1e-4 (the direct form: 2e-6; the entries of a 64 x 256 update are ~0.06)."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(256, 64, generator=g))
    G = (U * torch.logspace(0, -6, 64)) @ V.T  # (64, 256)
    for matrix, expected in ((G, polynomial_orthogonalisation(G)), (G.T, polynomial_orthogonalisation(G).T)):
        torch.testing.assert_close(zeropower_via_newtonschulz(matrix, steps=5).double(), expected, atol=1e-4, rtol=0)


def test_newton_schulz_on_a_1_to_4_matrix_costs_under_60_percent_of_the_direct_form():
    """Muon's MLP matrices are 1:4: iterating on the (rows, rows) Gram matrices saves ~45% of the FLOPs."""
    rows, cols, steps = 128, 512, 5
    direct = steps * (2 * (2 * rows * rows * cols) + 2 * rows**3)  # per step X X^T and B X, and A^2
    with FlopCounterMode(display=False) as counter:
        zeropower_via_newtonschulz(torch.randn(rows, cols), steps=steps)
    assert counter.get_total_flops() < 0.6 * direct
    with FlopCounterMode(display=False) as counter:  # square: the direct form
        zeropower_via_newtonschulz(torch.randn(rows, rows), steps=steps)
    assert counter.get_total_flops() == steps * 3 * 2 * rows**3


def test_muon_step_equals_hand_computed_step():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(12, 6))  # tall: scaled by sqrt(12 / 6)
    w0 = w.detach().clone()
    lr, beta, wd = 0.05, 0.9, 0.1
    opt = Muon([dict(params=[w], lr=lr, momentum=beta, weight_decay=wd, use_muon=True)])
    grads = [torch.randn(12, 6) for _ in range(2)]
    expected, buf = w0.double(), torch.zeros(12, 6, dtype=torch.float64)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        buf = beta * buf + (1 - beta) * g.double()
        nesterov = (1 - beta) * g.double() + beta * buf
        expected = expected * (1 - lr * wd) - lr * 2**0.5 * polynomial_orthogonalisation(nesterov)
    torch.testing.assert_close(w.detach().double(), expected, atol=1e-5, rtol=0)


def test_fused_qkv_is_orthogonalised_per_block():
    torch.manual_seed(0)
    w = nn.Parameter(torch.zeros(3 * 4, 4))
    opt = Muon([dict(params=[w], lr=1.0, momentum=0.0, ns_split=3, use_muon=True)])
    g = torch.randn(12, 4)
    w.grad = g.clone()
    opt.step()
    expected = torch.cat([-polynomial_orthogonalisation(block) for block in g.split(4)])
    torch.testing.assert_close(w.detach().double(), expected, atol=1e-5, rtol=0)


def test_newton_schulz_runs_once_per_shape_not_per_matrix(monkeypatch):
    import forge.optim

    shapes, original = [], forge.optim.zeropower_via_newtonschulz
    monkeypatch.setattr(forge.optim, "zeropower_via_newtonschulz",
                        lambda G, *args, **kwargs: shapes.append(tuple(G.shape)) or original(G, *args, **kwargs))
    model = tiny_gpt(n_layer=4)
    train_steps(model, build_optimizer(model, "muon", **MUON_ARGS), 1)
    # 4 layers: 4 c_proj (9, 9) and c_attn's 12 (9, 9) blocks in one batch, 4 c_fc (36, 9) transposed with
    # the 4 mlp.c_proj (9, 36) in the other, though they are two parameter groups and two shapes
    assert sorted(shapes) == [(8, 9, 36), (16, 9, 9)]


def test_param_groups_put_hidden_matrices_on_muon_and_the_rest_on_adamw():
    model = tiny_gpt()
    named = {id(p): n for n, p in model.named_parameters()}
    groups = {k: sorted(named[id(p)] for p in ps) for k, ps in muon_param_groups(model).items()}
    assert groups["muon_qkv"] == ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"]
    assert groups["muon"] == sorted(
        f"transformer.h.{i}.{n}.weight" for i in range(2) for n in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    assert groups["embeddings"] == ["transformer.wpe.weight", "transformer.wte.weight"]  # lm_head is tied to wte
    assert groups["head"] == []
    assert groups["gains"] and all(model.get_parameter(n).dim() == 1 for n in groups["gains"])
    assert sum(len(v) for v in groups.values()) == len(named)

    opt = build_optimizer(model, "muon", **MUON_ARGS, muon_lr=0.02)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)
    muon_groups = [g for g in opt.param_groups if g["use_muon"]]
    assert {g["lr"] for g in muon_groups} == {0.02} and {g["lr_scale"] for g in muon_groups} == {20.0}
    adam_groups = {g["weight_decay"]: g for g in opt.param_groups if not g["use_muon"]}
    assert set(adam_groups) == {0.1, 0.0} and all(g["lr"] == 1e-3 for g in adam_groups.values())


def test_untied_head_and_embeddings_get_their_own_learning_rates():
    model = tiny_gpt(untied_head=True, rotary=True, n_embd=8, n_head=2)  # rotary: no position table
    by_name = {id(p): n for n, p in model.named_parameters()}
    opt = build_optimizer(model, "muon", **MUON_ARGS, embedding_lr=0.3, head_lr=0.004)
    lrs = {by_name[id(p)]: (g["lr"], g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert lrs["transformer.wte.weight"] == (0.3, pytest.approx(300.0), 0.1)
    assert lrs["lm_head.weight"] == (0.004, pytest.approx(4.0), 0.1)
    assert lrs["transformer.ln_f.weight"] == (1e-3, 1.0, 0.0)
    assert "transformer.wpe.weight" not in lrs


def test_adamw_groups_match_torch_adamw():
    model = tiny_gpt()
    reference = copy.deepcopy(model)
    ours = Muon([dict(params=list(model.parameters()), lr=1e-2, weight_decay=0.1, use_muon=False)])
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                               fused=True)  # the kernel configure_optimizers uses on a CPU or GPU
    for step in range(3):
        for m, opt in ((model, ours), (reference, theirs)):
            m(*batch(step))[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert ours._adamw_groups().defaults["fused"]  # one kernel launch for all AdamW parameters


def test_bad_settings_raise_clear_errors():
    model = tiny_gpt()
    with pytest.raises(UserError, match="optimizer='lion' is unknown: use one of adamw, muon"):
        build_optimizer(model, "lion", **MUON_ARGS)
    with pytest.raises(UserError, match="muon_momentum=1.5"):
        build_optimizer(model, "muon", **MUON_ARGS, muon_momentum=1.5)
    with pytest.raises(UserError, match="no 2-D hidden weights.*use optimizer=adamw"):
        build_optimizer(nn.Sequential(nn.Linear(4, 4)), "muon", **MUON_ARGS)


def train_steps(model, opt, steps, rank=0, world_size=1, first_step=0):
    """Mean loss over the global batch of 4; each rank takes its contiguous share."""
    per_rank = 4 // world_size
    for step in range(first_step, first_step + steps):
        x, y = batch(step)
        model(x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank])[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def assert_same_state(a, b):
    """Two full optimizer state dicts (FQN-keyed) hold equal tensors and equal hyperparameters."""
    assert a["state"].keys() == b["state"].keys()
    for fqn, state in a["state"].items():
        assert state.keys() == b["state"][fqn].keys(), fqn
        for key, value in state.items():
            torch.testing.assert_close(value, b["state"][fqn][key], atol=1e-6, rtol=0, msg=f"{fqn}.{key}")
    assert hyperparameters(a) == hyperparameters(b)


def hyperparameters(state_dict):
    """The param groups, with lists read as tuples: betas may come back from a state dict as a list."""
    return [{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()} for g in state_dict["param_groups"]]


def saved_and_loaded(state_dict):
    """Through torch.save and torch.load(weights_only=True), as checkpoints go. This also breaks the aliasing
    between a full state dict and the live optimizer (DCP returns the live 'step' tensors themselves)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_round_trip_single_process():
    model = tiny_gpt()
    opt = build_optimizer(model, "muon", **MUON_ARGS)
    train_steps(model, opt, 2)
    full = saved_and_loaded(get_optimizer_state_dict(model, opt, options=FULL))

    restored = tiny_gpt(seed=1)
    restored.load_state_dict(model.state_dict())
    restored_opt = build_optimizer(restored, "muon", **MUON_ARGS)
    set_optimizer_state_dict(restored, restored_opt, full, options=FULL)
    assert_same_state(get_optimizer_state_dict(restored, restored_opt, options=FULL), full)
    train_steps(model, opt, 2, first_step=2)
    train_steps(restored, restored_opt, 2, first_step=2)
    for p, q in zip(model.parameters(), restored.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def _distributed_worker(rank, world_size, store_path, parallelism):
    import forge.optim

    torch.set_num_threads(1)  # two processes on a shared 2-core machine
    newton_schulz, orthogonalised = forge.optim.zeropower_via_newtonschulz, {"one process": 0, "a rank": 0}
    counting = ["one process"]

    def counted(G, steps=5, dtype=None):  # how many matrices this process orthogonalises
        orthogonalised[counting[0]] += G.size(0) if G.dim() == 3 else 1
        return newton_schulz(G, steps, dtype)

    forge.optim.zeropower_via_newtonschulz = counted
    reference = tiny_gpt()  # the single-process reference, trained before the process group exists
    reference_opt = build_optimizer(reference, "muon", **MUON_ARGS)
    train_steps(reference, reference_opt, 3)
    counting[0] = "a rank"
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        model = tiny_gpt()
        if parallelism == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for block in model.transformer.h:
                fully_shard(block)
            wrapped = fully_shard(model)
        opt = build_optimizer(model, "muon", **MUON_ARGS)
        train_steps(wrapped, opt, 3, rank, world_size)
        # the Newton-Schulz work is split: every batch of equal shapes (8 or 4 blocks here) halves
        assert orthogonalised["a rank"] * world_size == orthogonalised["one process"] == 3 * 12, orthogonalised

        full_params = get_model_state_dict(model, options=FULL)
        for name, p in reference.state_dict().items():
            torch.testing.assert_close(full_params[name], p, atol=2e-5, rtol=0, msg=name)
        full_state = saved_and_loaded(get_optimizer_state_dict(model, opt, options=FULL))
        assert_same_state(full_state, get_optimizer_state_dict(reference, reference_opt, options=FULL))

        if parallelism == "fsdp":  # a fresh sharded model and optimizer resume from the full state dicts
            restored = tiny_gpt(seed=1)
            for block in restored.transformer.h:
                fully_shard(block)
            fully_shard(restored)
            set_model_state_dict(restored, full_params, options=FULL)
            restored_opt = build_optimizer(restored, "muon", **MUON_ARGS)
            set_optimizer_state_dict(restored, restored_opt, full_state, options=FULL)
            assert_same_state(get_optimizer_state_dict(restored, restored_opt, options=FULL), full_state)
            train_steps(restored, restored_opt, 1, rank, world_size, first_step=3)
            train_steps(model, opt, 1, rank, world_size, first_step=3)
            restored_params = get_model_state_dict(restored, options=FULL)
            for name, p in get_model_state_dict(model, options=FULL).items():
                torch.testing.assert_close(restored_params[name], p, atol=0, rtol=0, msg=name)
    finally:
        dist.destroy_process_group()
    end_spawned_worker()


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_muon_distributed_equals_single_process(parallelism, tmp_path):
    """2 gloo ranks equal one process, each rank orthogonalising half of the matrices."""
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "store"), parallelism), nprocs=2, join=True)


SPEEDRUN_CONFIGS = ["shakespeare_char_speedrun_cpu.py", "shakespeare_char_speedrun.py", "gpt2_124m_speedrun.py"]


@pytest.mark.parametrize("config", SPEEDRUN_CONFIGS)
def test_speedrun_configs_train_a_few_steps_on_cpu(config, tiny_char_data, tmp_path):
    """The speedrun configs are valid and train under Muon; shapes shrunk, the GPU ones moved to the CPU."""
    out = tmp_path / "out"
    small = dict(device="cpu", dtype="float32", compile=False, data_dir=tiny_char_data, out_dir=out, max_iters=3,
                 eval_interval=3, eval_iters=1, batch_size=2, block_size=16, n_layer=1, n_head=2, n_embd=16,
                 gradient_accumulation_steps=1, wandb_log=False, eval_at_start=True)  # a start to compare with
    run_py("train.py", f"config/{config}", *(f"--{k}={v}" for k, v in small.items()), env={"OMP_NUM_THREADS": "1"},
           check=True)
    config_text = (REPO / "config" / config).read_text()
    assert 'optimizer = "muon"' in config_text
    evals = [r for r in read_metrics(out) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 3] and evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_speed_record_clock_starts_with_the_process():
    """time_s (what speed records read) counts from the interpreter's start, not from an import."""
    code = "import time; time.sleep(1.0); import forge.metrics as m; print(time.time() - m.PROCESS_START)"
    age_at_import = float(run_py("-c", code, check=True).stdout)
    assert 1.0 <= age_at_import < 30
