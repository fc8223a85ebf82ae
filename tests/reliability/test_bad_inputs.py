"""The bad-input table: every entry point, every kind of mistake a user makes.

Each case must end with a non-zero exit, exactly one `error:` line on stderr naming the culprit, no
Python traceback, no file under the workspace (data folders, runs, configs) created or changed, and
no code run from a malicious pickle (its marker file never appears).
"""
import json
import os
import pickle
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_char_dataset
from tests.reliability.conftest import Finished, cli
from tests.util import ABSENT_GPU, REPO, assert_clean_error, snapshot


class MakesMarker:
    """A pickled object whose unpickling creates a file: proof that loading it ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@dataclass
class Workspace:
    root: Path
    data: Path  # a character dataset (the tiny Shakespeare slice)
    other: Path  # a character dataset with another, larger vocabulary
    empty: Path  # bins of zero bytes
    short: Path  # 10 tokens per split
    evil_meta: Path  # a legacy meta.pkl that runs code when unpickled
    run: Path  # a finished tiny run (iter 2) on `data`
    corrupt: Path
    truncated: Path
    foreign: Path
    evil: Path  # a checkpoint pickle that runs code when loaded unsafely
    configs: Path
    texts: Path
    marker: Path  # must never exist
    edited: dict  # runs whose ckpt.pt had a small edit: wide, deep (model_args), no_args, nan (weights), orphaned

    def train(self, out=None, data=None, **overrides) -> list:
        return cli(out or self.root / "fresh", data or self.data, max_iters=4, lr_decay_iters=4, **overrides)


@pytest.fixture(scope="module")
def ws(forks, tmp_path_factory, shakespeare_text) -> Workspace:
    root = tmp_path_factory.mktemp("bad_inputs")
    marker = root / "CODE_RAN"
    data = make_char_dataset(root / "data" / "char", shakespeare_text[:20_000])
    other = make_char_dataset(root / "data" / "other", "".join(map(chr, range(40, 140))) * 50)
    empty = make_char_dataset(root / "data" / "empty", "abc")
    for split in ("train", "val"):
        (empty / f"{split}.bin").write_bytes(b"")
    short = make_char_dataset(root / "data" / "short", "abcdefghij")
    evil_meta = make_char_dataset(root / "data" / "evil_meta", shakespeare_text[:5_000])
    meta = json.loads((evil_meta / "meta.json").read_text())
    (evil_meta / "meta.json").unlink()
    with open(evil_meta / "meta.pkl", "wb") as f:
        pickle.dump({**meta, "payload": MakesMarker(marker)}, f)

    run = root / "runs" / "good"
    done = forks.run("train.py", *cli(run, data, max_iters=2, lr_decay_iters=2))
    assert done.returncode == 0, done.stderr
    runs = {}
    for kind in ("corrupt", "truncated", "foreign", "evil"):
        runs[kind] = shutil.copytree(run, root / "runs" / kind)
    ckpt = (run / "ckpt.pt").read_bytes()
    (runs["corrupt"] / "ckpt.pt").write_bytes(ckpt[:100] + b"\x00garbage" * 1000)
    (runs["truncated"] / "ckpt.pt").write_bytes(ckpt[: len(ckpt) // 2])
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "epoch": 3}, runs["foreign"] / "ckpt.pt")
    torch.save({"model": {"w": torch.zeros(1)}, "model_args": {}, "payload": MakesMarker(marker)},
               runs["evil"] / "ckpt.pt")
    # the payload is real: loading such a file unsafely does create its marker
    proof = root / "proof"
    torch.save({"payload": MakesMarker(proof)}, root / "proof.pt")
    torch.load(root / "proof.pt", weights_only=False)
    assert proof.exists()
    proof.unlink()
    (root / "proof.pt").unlink()
    with open(evil_meta / "meta.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()

    edited = {kind: shutil.copytree(run, root / "runs" / kind) for kind in ("wide", "deep", "no_args", "nan")}
    for kind, edit in (("wide", lambda c: c["model_args"].update(n_embd=10**6)),
                       ("deep", lambda c: c["model_args"].update(n_layer=10**9)),
                       ("no_args", lambda c: c.pop("model_args")),
                       ("nan", lambda c: c["model"]["transformer.h.0.attn.c_attn.weight"].fill_(float("nan")))):
        ckpt = torch.load(run / "ckpt.pt", weights_only=True)
        edit(ckpt)
        torch.save(ckpt, edited[kind] / "ckpt.pt")
    edited["orphaned"] = shutil.copytree(run, root / "runs" / "orphaned")
    (edited["orphaned"] / "ckpt.pt").rename(edited["orphaned"] / "ckpt-2.pt")

    configs = root / "configs"
    configs.mkdir()
    (configs / "ok.py").write_text("n_layer = 2\n")
    (configs / "typo.py").write_text("n_layer = 2\nlearning_rat = 1e-3\n")
    (configs / "syntax.py").write_text("n_layer = = 2\n")
    (configs / "wrong_type.py").write_text("batch_size = '12'\n")
    texts = root / "texts"
    texts.mkdir()
    (texts / "empty.txt").write_text("")
    (texts / "bad.jsonl").write_text('{"text": "fine"}\n{"text": unquoted}\n')
    (texts / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (texts / "notes.txt").write_text("some text\n" * 50)
    return Workspace(root, data, other, empty, short, evil_meta, run, runs["corrupt"], runs["truncated"],
                     runs["foreign"], runs["evil"], configs, texts, marker, edited)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(forks, script: str, args: list, world_size: int = 2) -> Finished:
    """`script` as torchrun would start it on one node (RANK, WORLD_SIZE, MASTER_*), from the fork server.
    Returns rank 0's output; the other ranks must fail too, silently and without a traceback."""
    env = {"WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "LOCAL_WORLD_SIZE": str(world_size)}
    children = [forks.start(script, *args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world_size)]
    codes = [forks.wait(child, 120) for child in children]
    for child, code in zip(children[1:], codes[1:]):
        assert code not in (0, None) and "Traceback" not in child.stderr(), child.stderr()
        assert "error:" not in child.stderr(), "only rank 0 reports the error"
    return Finished(codes[0], children[0].stdout(), children[0].stderr())


def run_bash(script: str, args: list) -> Finished:
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", str(Path(os.sys.executable)))}
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.run(["bash", script, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    return Finished(proc.returncode, proc.stdout, proc.stderr)


# (id, entry point, arguments from the workspace, words the error line must contain)
CASES = [
    # train.py: configuration
    ("train-unknown-key", "train.py", lambda w: w.train() + ["--n_layr=3"], ["n_layr", "n_layer"]),
    ("train-wrong-type", "train.py", lambda w: w.train() + ["--max_iters=four"], ["max_iters", "int"]),
    ("train-float-for-int", "train.py", lambda w: w.train() + ["--batch_size=2.5"], ["batch_size"]),
    ("train-missing-config", "train.py", lambda w: [w.configs / "missing.py"], ["missing.py", "not found"]),
    ("train-malformed-config", "train.py", lambda w: [w.configs / "syntax.py"], ["syntax.py", "not valid python"]),
    ("train-config-typo", "train.py", lambda w: [w.configs / "typo.py"], ["learning_rat", "learning_rate"]),
    ("train-config-wrong-type", "train.py", lambda w: [w.configs / "wrong_type.py"], ["batch_size", "int"]),
    # train.py: data
    ("train-missing-dataset", "train.py", lambda w: w.train(data=w.root / "data" / "nothing"), ["nothing"]),
    ("train-empty-dataset", "train.py", lambda w: w.train(data=w.empty), ["train.bin", "empty"]),
    ("train-dataset-too-short", "train.py", lambda w: w.train(data=w.short), ["block_size"]),
    ("train-code-in-meta-pkl", "train.py", lambda w: w.train(data=w.evil_meta), ["meta.pkl"]),
    ("train-vocab-mismatch", "train.py", lambda w: w.train(w.run, w.other, init_from="resume"), ["vocabulary"]),
    # train.py: checkpoints
    ("train-corrupt-ckpt", "train.py", lambda w: w.train(w.corrupt, init_from="resume"), ["ckpt.pt", "corrupt"]),
    ("train-truncated-ckpt", "train.py", lambda w: w.train(w.truncated, init_from="resume"), ["ckpt.pt", "truncated"]),
    ("train-foreign-ckpt", "train.py", lambda w: w.train(w.foreign, init_from="resume"), ["not a training checkpoint"]),
    ("train-code-in-ckpt", "train.py", lambda w: w.train(w.evil, init_from="resume"), ["ckpt.pt", "run code"]),
    ("train-resume-without-ckpt", "train.py", lambda w: w.train(init_from="resume"), ["init_from=resume", "ckpt.pt"]),
    ("train-overwrite-run", "train.py", lambda w: w.train(w.run, init_from="scratch"), ["already exists"]),
    ("train-shape-mismatch", "train.py", lambda w: w.train(w.run, init_from="resume", n_layer=3), ["n_layer"]),
    ("train-ckpt-model-args-wider", "train.py", lambda w: w.train(w.edited["wide"], init_from="resume"),
     ["ckpt.pt", "does not fit"]),
    ("train-ckpt-model-args-deeper", "train.py", lambda w: w.train(w.edited["deep"], init_from="resume"),
     ["ckpt.pt", "n_layer=1000000000"]),
    ("train-ckpt-without-model-args", "train.py", lambda w: w.train(w.edited["no_args"], init_from="resume"),
     ["ckpt.pt", "no model_args"]),
    ("train-numbered-ckpts-without-ckpt", "train.py", lambda w: w.train(w.edited["orphaned"], init_from="auto"),
     ["ckpt-2.pt", "--init_from=resume"]),
    # train.py: run folder, data folder, seeds, schedules
    ("train-empty-out-dir", "train.py", lambda w: w.train() + ["--out_dir="], ["out_dir", "empty"]),
    ("train-data-dir-is-a-file", "train.py", lambda w: w.train(data=w.data / "meta.json"), ["meta.json", "a file"]),
    ("train-seed-too-large", "train.py", lambda w: w.train(seed=2**32), ["seed=4294967296"]),
    ("train-min-lr-above-lr", "train.py", lambda w: w.train(min_lr=0.5), ["min_lr=0.5", "learning_rate"]),
    ("train-warmup-past-decay", "train.py", lambda w: w.train(warmup_iters=10), ["warmup_iters=10", "lr_decay_iters"]),
    ("train-absurd-batch", "train.py", lambda w: w.train(batch_size=10**9), ["batch_size=1000000000"]),
    ("train-absurd-model", "train.py", lambda w: w.train(n_layer=10**5, n_embd=8192, n_head=8), ["n_layer=100000"]),
    # train.py: machine, batch, world size, pretrained names
    ("train-device-cuda", "train.py", lambda w: w.train(device=ABSENT_GPU), [ABSENT_GPU]),
    ("train-float16-on-cpu", "train.py", lambda w: w.train(dtype="float16"), ["float16"]),
    ("train-batch-zero", "train.py", lambda w: w.train(batch_size=0), ["batch_size"]),
    ("train-dropout-out-of-range", "train.py", lambda w: w.train(dropout=1.5), ["dropout=1.5"]),
    ("train-nccl-on-cpu", "ranks", lambda w: w.train(backend="nccl"), ["nccl"]),
    ("train-accumulation-vs-world-size", "ranks", lambda w: w.train(gradient_accumulation_steps=3),
     ["gradient_accumulation_steps=3", "2 processes"]),
    ("train-unknown-pretrained", "train.py", lambda w: w.train(init_from="gpt3"), ["gpt3"]),
    ("train-unknown-gpt2-size", "train.py", lambda w: w.train(init_from="gpt2-huge"), ["gpt2-huge"]),
    # sample.py
    ("sample-missing-run", "sample.py", lambda w: [f"--out_dir={w.root / 'nowhere'}"], ["nowhere"]),
    ("sample-truncated-ckpt", "sample.py", lambda w: [f"--out_dir={w.truncated}"], ["ckpt.pt", "truncated"]),
    ("sample-code-in-ckpt", "sample.py", lambda w: [f"--out_dir={w.evil}"], ["ckpt.pt", "run code"]),
    ("sample-vocab-mismatch", "sample.py", lambda w: [f"--out_dir={w.run}", f"--meta={w.other / 'meta.json'}"],
     ["does not fit"]),
    ("sample-wrong-type", "sample.py", lambda w: [f"--out_dir={w.run}", "--num_samples=two"], ["num_samples"]),
    ("sample-device-cuda", "sample.py", lambda w: [f"--out_dir={w.run}", f"--device={ABSENT_GPU}"], [ABSENT_GPU]),
    ("sample-unknown-pretrained", "sample.py", lambda w: ["--init_from=gpt3"], ["gpt3"]),
    ("sample-missing-prompt-file", "sample.py", lambda w: [f"--out_dir={w.run}", f"--start=FILE:{w.texts / 'no.txt'}"],
     ["no.txt", "not found"]),
    ("sample-prompt-outside-vocab", "sample.py", lambda w: [f"--out_dir={w.run}", "--start=\u00e9t\u00e9 \u2603"],
     ["prompt", "vocabulary"]),
    ("sample-nan-weights", "sample.py", lambda w: [f"--out_dir={w.edited['nan']}"], ["ckpt.pt", "nan"]),
    ("sample-ckpt-model-args-wider", "sample.py", lambda w: [f"--out_dir={w.edited['wide']}"], ["does not fit"]),
    ("sample-seed-too-large", "sample.py", lambda w: [f"--out_dir={w.run}", f"--seed={2**64}"], ["seed"]),
    # evaluate.py
    ("evaluate-vocab-mismatch", "evaluate.py", lambda w: [f"--out_dir={w.run}", f"--data_dir={w.other}"],
     ["tokenized with"]),
    ("evaluate-missing-split", "evaluate.py", lambda w: [f"--out_dir={w.run}", "--split=test"], ["test.bin"]),
    ("evaluate-foreign-ckpt", "evaluate.py", lambda w: [f"--out_dir={w.foreign}"], ["not a training checkpoint"]),
    ("evaluate-context-too-long", "evaluate.py", lambda w: [f"--out_dir={w.run}", "--block_size=4096"],
     ["block_size=4096"]),
    ("evaluate-nothing-to-do", "evaluate.py", lambda w: [f"--out_dir={w.run}", "--loss=False"], ["nothing to do"]),
    ("evaluate-hellaswag-on-char-model", "evaluate.py", lambda w: [f"--out_dir={w.run}", "--loss=False",
                                                                   "--hellaswag=True"], ["gpt-2 bpe"]),
    ("evaluate-unknown-pretrained", "evaluate.py", lambda w: ["--init_from=gpt2-huge", f"--data_dir={w.data}"],
     ["gpt2-huge"]),
    # bench.py
    ("bench-steps-zero", "bench.py", lambda w: ["--steps=0"], ["steps=0"]),
    ("bench-missing-dataset", "bench.py", lambda w: w.train(data=w.root / "data" / "nothing"), ["nothing"]),
    ("bench-unknown-key", "bench.py", lambda w: ["--stepz=3"], ["stepz", "steps"]),
    # data preparation
    ("text-missing-input", "data/text/prepare.py", lambda w: [w.texts / "none.txt", "--out_dir", w.root / "p"],
     ["none.txt", "not found"]),
    ("text-empty-input", "data/text/prepare.py", lambda w: [w.texts / "empty.txt", "--out_dir", w.root / "p"],
     ["no text"]),
    ("text-bad-jsonl", "data/text/prepare.py", lambda w: [w.texts / "bad.jsonl", "--out_dir", w.root / "p"],
     ["bad.jsonl:2"]),
    ("text-val-fraction", "data/text/prepare.py",
     lambda w: [w.texts / "notes.txt", "--val_fraction", "1.5", "--out_dir", w.root / "p"], ["val_fraction"]),
    ("text-over-existing-bad", "data/text/prepare.py",
     lambda w: [w.texts / "latin1.txt", "--out_dir", w.data, "--force"], ["latin1.txt", "utf-8"]),
    ("text-over-complete-without-force", "data/text/prepare.py", lambda w: [w.texts / "notes.txt", "--out_dir", w.data],
     ["already holds a complete dataset", "--force"]),
    ("text-out-dir-is-a-file", "data/text/prepare.py",
     lambda w: [w.texts / "notes.txt", "--out_dir", w.texts / "notes.txt"], ["notes.txt", "a file"]),
    ("text-num-proc-too-many", "data/text/prepare.py",
     lambda w: [w.texts / "notes.txt", "--num_proc", "100000", "--out_dir", w.root / "p"], ["--num_proc", "100000"]),
    ("shakespeare-char-missing-input", "data/shakespeare_char/prepare.py",
     lambda w: ["--input", w.texts / "none.txt", "--out_dir", w.root / "p"], ["none.txt", "not found"]),
    ("shakespeare-char-unknown-option", "data/shakespeare_char/prepare.py",
     lambda w: ["--inptu", w.texts / "notes.txt"], ["--inptu"]),
    ("shakespeare-not-utf8", "data/shakespeare/prepare.py",
     lambda w: ["--input", w.texts / "latin1.txt", "--out_dir", w.root / "p"], ["latin1.txt", "utf-8"]),
    ("openwebtext-missing-dataset", "data/openwebtext/prepare.py",
     lambda w: ["--dataset", w.root / "no_such_dataset", "--out_dir", w.root / "p"], ["no_such_dataset"]),
    ("text-bpe-vocab-too-small", "data/text/prepare.py",
     lambda w: [w.texts / "notes.txt", "--tokenizer", "bpe", "--vocab_size", "200", "--out_dir", w.root / "p"],
     ["--vocab_size 200", "257"]),
    ("text-vocab-size-without-bpe", "data/text/prepare.py",
     lambda w: [w.texts / "notes.txt", "--vocab_size", "1000", "--out_dir", w.root / "p"], ["--vocab_size", "bpe"]),
    ("fineweb-unknown-subset", "data/fineweb/prepare.py",
     lambda w: ["--subset", "sample-1BT", "--out_dir", w.root / "p"], ["sample-1BT", "sample-10BT"]),
    ("fineweb-missing-input", "data/fineweb/prepare.py",
     lambda w: ["--input", w.texts / "shards", "--out_dir", w.root / "p"], ["shards", "not found"]),
    ("fineweb-input-without-shards", "data/fineweb/prepare.py",
     lambda w: ["--input", w.configs, "--out_dir", w.root / "p"], ["configs", ".parquet"]),
    ("fineweb-input-bad-jsonl", "data/fineweb/prepare.py",
     lambda w: ["--input", w.texts / "bad.jsonl", "--out_dir", w.root / "p"], ["bad.jsonl", "json"]),
    # launchers
    ("single-node-bad-nproc", "launch/single_node.sh", lambda w: ["--nproc_per_node=two", w.configs / "typo.py"],
     ["nproc_per_node"]),
    ("single-node-nproc-leading-zero", "launch/single_node.sh",
     lambda w: ["--nproc_per_node=08", w.configs / "ok.py"], ["nproc_per_node=08"]),
    ("single-node-nproc-zero", "launch/single_node.sh", lambda w: ["--nproc_per_node=0", w.configs / "ok.py"],
     ["nproc_per_node=0"]),
    ("single-node-config-typo", "launch/single_node.sh", lambda w: ["--nproc_per_node=1", w.configs / "typo.py"],
     ["learning_rat"]),
    ("multi-node-missing-nnodes", "launch/multi_node.sh", lambda w: [w.configs / "typo.py"], ["--nnodes"]),
    ("multi-node-bad-endpoint", "launch/multi_node.sh",
     lambda w: ["--nnodes=2", "--rdzv_endpoint=node0", w.configs / "typo.py"], ["rdzv_endpoint", "host:port"]),
    ("multi-node-zero-nodes", "launch/multi_node.sh",
     lambda w: ["--nnodes=0", "--rdzv_endpoint=node0:29500", w.configs / "ok.py"], ["--nnodes=0"]),
    ("multi-node-bad-port", "launch/multi_node.sh",
     lambda w: ["--nnodes=2", "--rdzv_endpoint=node0:70000", w.configs / "ok.py"], ["rdzv_endpoint", "65535"]),
    ("multi-node-unknown-host", "launch/multi_node.sh",
     lambda w: ["--nnodes=2", "--rdzv_endpoint=no-such-host.invalid:29500", "--nproc_per_node=1", w.configs / "ok.py",
                f"--out_dir={w.root / 'fresh'}", f"--data_dir={w.data}", "--device=cpu"],
     ["no-such-host.invalid", "resolved"]),
    ("slurm-outside-sbatch", "launch/slurm.sbatch", lambda w: [w.configs / "typo.py"], ["sbatch"]),
]


@pytest.mark.parametrize("case_id, entry_point, make_args, needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_changes_nothing(forks, ws, case_id, entry_point, make_args, needles):
    args = [str(a) for a in make_args(ws)]
    before = snapshot(ws.root)
    if entry_point == "ranks":
        proc = run_ranks(forks, "train.py", args)
    elif entry_point.startswith("launch/"):
        proc = run_bash(entry_point, args)
    else:
        proc = forks.run(entry_point, *args)
    print(f"{case_id}: {assert_clean_error(proc, *needles)}")
    assert not ws.marker.exists(), "a malicious pickle ran code"
    assert snapshot(ws.root) == before, "a file was created or changed"


def test_the_table_covers_every_entry_point():
    covered = {c[1] for c in CASES} | {"train.py"}
    entry_points = {"train.py", "sample.py", "evaluate.py", "bench.py"} | \
        {str(p.relative_to(REPO)) for p in REPO.glob("data/*/prepare.py")} | \
        {str(p.relative_to(REPO)) for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch")
         and p.name != "common.sh"}
    assert entry_points - covered == set()
    assert len(CASES) >= 25


def test_fork_server_runs_are_what_a_fresh_interpreter_gives(forks, ws):
    """The table runs most cases from the fork server: for one case, a fresh `python train.py` says the same."""
    from tests.util import run_py

    args = ws.train(init_from="resume", out=ws.evil)
    fresh, forked = run_py("train.py", *args), forks.run("train.py", *args)
    assert (fresh.returncode, fresh.stderr) == (forked.returncode, forked.stderr)
    assert not ws.marker.exists()


def test_numpy_bins_of_the_workspace_are_what_the_cases_claim(ws):
    """Guards the table against testing the wrong thing: the empty, short and other datasets are as named."""
    assert (ws.empty / "train.bin").stat().st_size == 0
    assert len(np.fromfile(ws.short / "train.bin", dtype="<u2")) < 17
    assert json.loads((ws.other / "meta.json").read_text())["vocab_size"] > \
        json.loads((ws.data / "meta.json").read_text())["vocab_size"]
