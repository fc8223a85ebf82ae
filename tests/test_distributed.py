"""forge/distributed.py on CPU: one process, and 2 processes over gloo with a FileStore (no ports).

A tiny stand-in model with the GPT's layout (transformer.wte, transformer.h blocks, a tied head)
keeps these tests independent of model.py and fast; tests/test_distributed_train.py runs the real
train.py under torchrun.
"""
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from forge import distributed as D
from forge.errors import UserError
from tests.util import REPO, end_spawned_worker

VOCAB, WIDTH, N_BLOCKS, SEQ = 32, 16, 2, 6
GRAD_ACCUM, MICRO_BATCH, STEPS = 4, 2, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(torch.tanh(self.fc(self.ln(x))))


class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(wte=nn.Embedding(VOCAB, WIDTH), h=nn.ModuleList(Block() for _ in range(N_BLOCKS)), ln_f=nn.LayerNorm(WIDTH))
        )
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2

    def forward(self, idx, targets):
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))


def global_batch(step):
    """The same global batch for every world size: GRAD_ACCUM micro-batches of MICRO_BATCH rows."""
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, VOCAB, (GRAD_ACCUM * MICRO_BATCH, SEQ + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def new_model():
    torch.manual_seed(0)
    return TinyGPT()


def train(dist, model, module, optimizer, steps):
    """The training loop's distributed skeleton: rank r does its share of the global micro-steps."""
    per_rank = GRAD_ACCUM // dist.world_size
    losses = []
    for step in steps:
        x, y = global_batch(step)
        total = torch.zeros(())
        for k in range(per_rank):
            rows = slice((dist.rank * per_rank + k) * MICRO_BATCH, (dist.rank * per_rank + k + 1) * MICRO_BATCH)
            torch.manual_seed(step * 100 + dist.rank * per_rank + k)  # dropout masks follow the global micro-step
            with D.gradient_sync(module, enabled=k == per_rank - 1):
                _, loss = module(x[rows], y[rows])
                (loss / per_rank).backward()
            total += loss.detach() / per_rank
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(D.all_reduce_mean(total).item())
    return losses


def run(dist, parallelism, steps, checkpoint=None, activation_checkpointing=False):
    model = new_model()
    if checkpoint is not None:
        D.load_full_model_state_dict(model, checkpoint["model"])
    module = D.parallelize(model, dist, parallelism=parallelism, activation_checkpointing=activation_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if checkpoint is not None:
        D.load_full_optimizer_state_dict(model, optimizer, checkpoint["optimizer"])
    losses = train(dist, model, module, optimizer, steps)
    state = {"model": D.full_model_state_dict(model), "optimizer": D.full_optimizer_state_dict(model, optimizer)}
    return losses, state


def two_rank_worker(rank, store, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    dist = D.init_distributed("cpu", timeout_s=60, init_method=f"file://{store}")
    assert dist == D.DistInfo(rank, rank, 2, "cpu")
    results = {
        "is_main": dist.is_main,
        "any_rank_one": D.any_rank(rank == 1),
        "any_rank_none": D.any_rank(False),
        "mean": D.all_reduce_mean(torch.tensor([float(rank), 10.0 * rank])).tolist(),
        "broadcast": D.broadcast_object({"from": rank}),
    }
    results["ddp"] = run(dist, "ddp", range(STEPS))
    results["fsdp_first_half"] = run(dist, "fsdp", range(STEPS // 2), activation_checkpointing=True)
    # Every rank reads the (rank 0) checkpoint, as train.py does from out_dir/ckpt.pt.
    checkpoint = D.broadcast_object(results["fsdp_first_half"][1])
    results["fsdp_resumed"] = run(dist, "fsdp", range(STEPS // 2, STEPS), checkpoint, activation_checkpointing=True)
    D.barrier()
    D.destroy()
    torch.save(results, f"{out}.{rank}")
    end_spawned_worker()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-process gloo job that runs every scenario (spawning is the slow part); results per rank."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(two_rank_worker, args=(str(tmp / "store"), str(tmp / "results")), nprocs=2, join=True)
    return [torch.load(tmp / f"results.{r}", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def reference():
    """The same global batches on one process, no process group."""
    dist = D.init_distributed("cpu")
    first_half = run(dist, "ddp", range(STEPS // 2))
    return run(dist, "ddp", range(STEPS)), first_half


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=name)


def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    dist = D.init_distributed("cpu")
    assert dist == D.DistInfo(0, 0, 1, "cpu") and dist.is_main and not dist.is_distributed
    assert D.any_rank(True) is True and D.any_rank(False) is False
    t = torch.tensor([1.5])
    assert D.all_reduce_mean(t) is t
    model = new_model()
    assert D.parallelize(model, dist, parallelism="fsdp") is model
    D.barrier()
    D.destroy()


def test_ddp_two_ranks_equal_one_process(two_ranks, reference):
    (ref_losses, ref_state), _ = reference
    for rank_result in two_ranks:
        losses, _ = rank_result["ddp"]
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    # Rank 0 holds the gathered full state; the others get empty dicts (only rank 0 saves).
    state = two_ranks[0]["ddp"][1]
    assert_same_weights(state["model"], ref_state["model"])
    assert two_ranks[1]["ddp"][1]["model"] == {}
    assert ref_losses[-1] < ref_losses[0]


def test_collectives_two_ranks(two_ranks):
    assert [r["is_main"] for r in two_ranks] == [True, False]
    assert all(r["any_rank_one"] is True and r["any_rank_none"] is False for r in two_ranks)
    assert all(r["mean"] == [0.5, 5.0] for r in two_ranks)
    assert all(r["broadcast"] == {"from": 0} for r in two_ranks)


def test_fsdp_resume_equals_uninterrupted_and_loads_in_one_process(two_ranks, reference):
    (ref_losses, ref_state), (ref_first_losses, _) = reference
    first_losses, first_state = two_ranks[0]["fsdp_first_half"]
    resumed_losses, resumed_state = two_ranks[0]["fsdp_resumed"]
    # FSDP + activation checkpointing on 2 ranks follows the 1-process run, across a save/resume.
    assert first_losses + resumed_losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert_same_weights(resumed_state["model"], ref_state["model"])
    # Plain names, no wrapper prefixes; the optimizer state is keyed by the same names.
    assert not any(k.startswith(("module.", "_orig_mod.")) or "_fsdp" in k or "checkpoint" in k for k in first_state["model"])
    assert set(first_state["optimizer"]["state"]) <= set(first_state["model"])
    # The 2-rank FSDP checkpoint resumes in a single process (a different world size) to the same weights.
    dist = D.init_distributed("cpu")
    losses, state = run(dist, "ddp", range(STEPS // 2, STEPS), first_state)
    assert losses == pytest.approx(resumed_losses, rel=1e-5, abs=1e-6)
    assert_same_weights(state["model"], ref_state["model"])


def test_activation_checkpointing_same_gradients_and_names():
    x, y = global_batch(0)
    grads = []
    for checkpointing in (False, True):
        model = new_model()
        if checkpointing:
            D.apply_activation_checkpointing(model)
        torch.manual_seed(7)
        model(x, y)[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        assert list(model.state_dict()) == list(new_model().state_dict())
    assert_same_weights(grads[0], grads[1], atol=1e-7)


def test_classic_index_keyed_optimizer_state_loads():
    """A nanoGPT checkpoint's optimizer.state_dict() (integer ids) loads like a name-keyed one."""
    dist = D.init_distributed("cpu")
    model = new_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(dist, model, model, optimizer, range(2))
    classic = optimizer.state_dict()
    fresh = new_model()
    fresh.load_state_dict(model.state_dict())
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    D.load_full_optimizer_state_dict(fresh, fresh_optimizer, classic)
    assert_same_weights(
        D.full_optimizer_state_dict(fresh, fresh_optimizer)["state"]["transformer.wte.weight"],
        D.full_optimizer_state_dict(model, optimizer)["state"]["transformer.wte.weight"],
        atol=0,
    )


def hung_rank_worker(rank, store, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    D.init_distributed("cpu", timeout_s=2, init_method=f"file://{store}")
    if rank == 1:
        time.sleep(4)  # hangs past rank 0's timeout, then leaves without joining the collective
    else:
        start = time.monotonic()
        try:
            D.all_reduce_mean(torch.ones(1))
            message = "no error"
        except D.CollectiveError as exc:
            message = str(exc)
        with open(out, "w") as f:
            f.write(f"{time.monotonic() - start:.1f}\n{message}")
    D.destroy()


def test_hung_rank_hits_collective_timeout(tmp_path):
    mp.spawn(hung_rank_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    waited, message = (tmp_path / "out").read_text().split("\n", 1)
    assert float(waited) < 3.5, "rank 0 waited for the hung rank instead of timing out"
    assert message.startswith("rank 0: all_reduce_mean failed after waiting up to 2s")
    assert "another rank hung or died" in message and "dist_timeout_s" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "env, kwargs, needle",
    [
        ({}, dict(device="cpu", backend="nccl"), "backend='nccl' needs CUDA GPUs"),
        ({}, dict(device="cpu", backend="mpi"), "backend='mpi' is not supported"),
        ({}, dict(device="cpu", timeout_s=0), "dist_timeout_s=0"),
    ],
)
def test_bad_setup_is_a_clear_error_on_every_rank(monkeypatch, env, kwargs, needle):
    # Before any process group exists, so every rank of such a job fails the same way.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        D.init_distributed(**kwargs)


def test_more_ranks_than_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for var, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="4", LOCAL_WORLD_SIZE="4").items():
        monkeypatch.setenv(var, value)
    with pytest.raises(UserError, match=r"4 processes on this node but only 2 GPU\(s\).*--nproc_per_node=2"):
        D.init_distributed("cuda")


def test_no_gpu_for_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no usable CUDA GPU"):
        D.init_distributed("cuda")


def test_cuda_index_beyond_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"device='cuda:2' but this machine shows 2 CUDA GPU\(s\)"):
        D.resolve_device("cuda:2")
    assert D.resolve_device("cuda:1") == "cuda:1"


@pytest.mark.parametrize(
    "model, kwargs, needle",
    [
        (nn.Linear(2, 2), dict(parallelism="fsdp"), "needs a model with transformer blocks"),
        (nn.Linear(2, 2), dict(activation_checkpointing=True), "needs a model with transformer blocks"),
        (None, dict(parallelism="tp"), "parallelism='tp' is not supported"),
    ],
)
def test_incompatible_parallelism_options(model, kwargs, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        D.parallelize(model or new_model(), D.DistInfo(), **kwargs)


def test_run_main_reports_a_collective_failure_in_one_line(monkeypatch, capsys):
    """A collective that fails inside torch (FSDP's all-gather, the grad norm) is still one line.

    A timeout (a hung peer) is reported by every waiting rank, exit 3; a lost peer (it died, and the
    launcher names it) like a user error, by rank 0 only, exit 4.
    """
    from forge.errors import run_main

    monkeypatch.setattr(D, "_joined_rank", 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")

    def failing(message):
        def main():
            raise torch.distributed.DistBackendError(message)
        return main

    with pytest.raises(SystemExit) as exit_info:
        run_main(failing("[unbound_buffer.cc:78] Timed out waiting 2000ms for recv operation\nmore detail"))
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: rank 1: a collective failed")
    assert "Timed out waiting 2000ms" in err and "more detail" not in err
    with pytest.raises(SystemExit) as exit_info:
        run_main(failing("[pair.cc:534] Read error: Connection reset by peer"))
    assert exit_info.value.code == 4 and capsys.readouterr().err == ""
    # Unrelated errors are not disguised as collective failures.
    assert D.as_collective_error(ValueError("shape mismatch")) is None
    assert D.as_collective_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def _failure(rank, exitcode, error_file=""):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(error_file))


USER = "data/x/train.bin is missing"  # a user error's message, left in the error file by forge.errors.run_main


@pytest.mark.parametrize(
    "failures, code, needles",
    [
        ({1: -9, 0: -15}, 1, ["worker rank 1", "killed by SIGKILL", "--max_restarts=0"]),
        ({0: 1}, 1, ["worker rank 0", "exited with code 1"]),
        ({1: (2, USER), 0: (2, USER)}, 2, []),  # a user error: local rank 0 printed its line; nothing to add
        ({1: (2, USER), 0: (-15, USER)}, 2, []),  # local rank 0 printed it, then torchrun stopped it
        ({1: (2, USER), 0: -15}, 2, ["rank 1: " + USER]),  # only rank 1 hit it: nobody printed it
        ({1: 2, 0: -15}, 2, ["rank 1: a user error it did not report"]),  # a worker outside run_main
        ({0: 3, 1: -9}, 3, []),  # a collective timeout, reported by the waiting workers
        ({0: 4, 1: -9}, 1, ["worker rank 1", "killed by SIGKILL"]),  # rank 0 lost its peer: name the dead one
    ],
)
def test_launcher_reports_worker_failures_in_one_line(monkeypatch, capsys, tmp_path, failures, code, needles):
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from forge import errors, launch

    def failure(rank, spec):
        exitcode, message = spec if isinstance(spec, tuple) else (spec, None)
        if message is None:
            return _failure(rank, exitcode)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / f"error-{rank}.json"))
        errors.record_for_launcher(message)
        return _failure(rank, exitcode, tmp_path / f"error-{rank}.json")

    def failing_run(args):
        raise ChildFailedError("train.py", {rank: failure(rank, spec) for rank, spec in failures.items()})

    monkeypatch.setattr(torchrun, "run", failing_run)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert launch.main(["--standalone", "--nproc_per_node=2", "train.py", "--device=cpu"]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if needles:
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and all(n in lines[0] for n in needles), err
    else:
        assert "error:" not in err


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--nproc_per_node=2", "train.py", "--device=cpu", "--n_head=5"], ["n_embd=768", "n_head=5"]),
        (["--nproc_per_node=2", "train.py", "--device=cpu", "--gradient_accumulation_steps=3"],
         ["gradient_accumulation_steps=3", "2 processes"]),
        (["--nnodes=2", "--nproc_per_node=2", "train.py", "--device=cpu", "--gradient_accumulation_steps=6"],
         ["gradient_accumulation_steps=6", "4 processes"]),
        (["--nproc_per_node=2", "train.py", "--device=cpu", "--backend=nccl"], ["backend='nccl'", "--backend=gloo"]),
    ],
)
def test_launcher_finds_setup_mistakes_before_starting_workers(monkeypatch, argv, needles):
    """torchrun would restart the workers on a mistake that fails every attempt alike: none is started."""
    import torch.distributed.run as torchrun

    from forge import launch
    from forge.errors import UserError

    started = []
    monkeypatch.setattr(torchrun, "run", started.append)
    with pytest.raises(UserError) as raised:
        launch.main(["--standalone", *argv])
    assert started == [] and all(n in str(raised.value) for n in needles), raised.value


def test_launcher_reports_a_failed_rendezvous_in_one_line(monkeypatch, capsys):
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    from forge import launch

    def failing_run(args):
        raise RendezvousTimeoutError("The node 'a' has not joined the rendezvous in time.\ndetails")

    monkeypatch.setattr(torchrun, "run", failing_run)
    monkeypatch.setattr(launch.socket, "getaddrinfo", lambda host, port: [])  # node0 resolves on a cluster only
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert launch.main(["--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=node0:29500", "train.py"]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "node0:29500" in err and "--nnodes=2" in err and "details" not in err


def leave_with_a_collective_in_flight(rank: int, store: str) -> None:
    """Rank 0 leaves the job as train.py does (destroy(), then its DDP module goes) while a collective it
    started still runs: rank 1 joins that collective only seconds later."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    dist = D.init_distributed("cpu", timeout_s=60, init_method=f"file://{store}")
    module = D.parallelize(nn.Linear(2, 2), dist, parallelism="ddp")
    if rank == 1:
        time.sleep(5)  # rank 0 tears down meanwhile
        D.any_rank(False)
    else:
        # its tensor and work are dropped here: the gloo thread that runs it frees the tensor when it ends
        torch.distributed.all_reduce(torch.zeros(1, dtype=torch.int32), async_op=True)
    D.destroy()
    del module  # DDP's reducer held the group: its release must not wait on that thread with the GIL held


def test_leaving_with_a_collective_in_flight_does_not_deadlock(tmp_path):
    ranks = [subprocess.Popen([sys.executable, "-c", "import sys; from tests.test_distributed import "
                               "leave_with_a_collective_in_flight as leave; leave(int(sys.argv[1]), sys.argv[2])",
                               str(rank), str(tmp_path / "store")], cwd=REPO) for rank in range(2)]
    try:
        codes = [rank.wait(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert codes == [0, 0]
