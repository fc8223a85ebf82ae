"""Benchmarks of data preparation and the loader (figures in docs/BENCHMARKS.md).

    python data/bench_prepare.py corpus /tmp/corpus --mb 300     # a generated corpus: jsonl documents
    python data/bench_prepare.py tokenize /tmp/corpus --mb 40    # tokens/s: tiktoken alone vs the pipeline
    python data/bench_prepare.py memory -- python data/text/prepare.py /tmp/corpus --out_dir /tmp/corpus-bins
    python data/bench_prepare.py loader /tmp/corpus-bins         # batches/s at GPT-2 124M's batch shape
    python data/bench_prepare.py tokenizer input.txt --vocab_size 2048 8192   # trained BPE vs GPT-2: tokens/byte

The corpus is real English: documents of 2-20k characters cut at random from Tiny Shakespeare
(--text FILE, else data/shakespeare_char/input.txt, downloaded there if missing), so BPE sees
realistic text.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a plain checkout

import numpy as np  # noqa: E402

from forge.errors import ArgumentParser, run_main  # noqa: E402
from forge.tokenize import (TINY_SHAKESPEARE_URL, GPT2Tokenizer, get_tokenizer, gpt2_meta,  # noqa: E402
                            local_or_downloaded_text, tokenize_to_bin, train_bpe)

REPO = Path(__file__).resolve().parents[1]


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


def make_corpus(out_dir: Path, megabytes: int, text_file=None, seed: int = 0) -> None:
    """jsonl files of about 50 MB, documents cut at random from text_file (default: Tiny Shakespeare)."""
    text = local_or_downloaded_text(text_file, REPO / "data" / "shakespeare_char" / "input.txt", TINY_SHAKESPEARE_URL)
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, file_index = 0, 0
    while written < megabytes * 1e6:
        with open(out_dir / f"part{file_index:03d}.jsonl", "w", encoding="utf-8") as f:
            file_written = 0
            while file_written < 50e6 and written + file_written < megabytes * 1e6:
                length = int(rng.integers(2_000, 20_000))
                start = int(rng.integers(0, len(text) - length))
                line = json.dumps({"text": text[start:start + length]}) + "\n"
                f.write(line)
                file_written += len(line)
        written += file_written
        file_index += 1
    print(f"{written / 1e6:.0f} MB in {file_index} jsonl file(s) -> {out_dir}")


def read_documents(corpus: Path, megabytes: int) -> list[str]:
    docs, size = [], 0
    for path in sorted(corpus.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                docs.append(json.loads(line)["text"])
                size += len(docs[-1])
                if size >= megabytes * 1e6:
                    return docs
    return docs


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pipeline's pool workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_tokenize(corpus: Path, megabytes: int, num_procs: list[int]) -> None:
    """Wall-clock tokens/s and tokens per CPU-second (which a busy machine disturbs much less)."""
    docs = read_documents(corpus, megabytes)
    chars = sum(map(len, docs))
    encoding = GPT2Tokenizer().encoding
    encoding.encode_ordinary_batch(docs[:20], num_threads=1)  # warm-up

    def timed(work) -> tuple[int, float, float]:
        wall, cpu = time.perf_counter(), _cpu_seconds()
        tokens = work()
        return tokens, tokens / (time.perf_counter() - wall), tokens / (_cpu_seconds() - cpu)

    def tiktoken_alone() -> int:
        return sum(map(len, encoding.encode_ordinary_batch(docs, num_threads=1))) + len(docs)  # + one EOT each

    tokens, ceiling, ceiling_cpu = timed(tiktoken_alone)
    print(f"{len(docs):,} documents, {chars / 1e6:.1f}M characters, {tokens:,} tokens")
    print(f"tiktoken encode_ordinary_batch, 1 thread: {ceiling / 1e6:.2f}M tokens/s, "
          f"{ceiling_cpu / 1e6:.2f}M tokens per CPU-second (load {load()})")
    with tempfile.TemporaryDirectory() as tmp:
        for num_proc in num_procs:
            written, rate, rate_cpu = timed(lambda: tokenize_to_bin(
                docs, Path(tmp) / "bench.bin", gpt2_meta(), num_proc=num_proc, append_eot=True).tokens)
            assert written == tokens
            print(f"pipeline, num_proc={num_proc}: {rate / 1e6:.2f}M tokens/s = {rate / ceiling:.2f} x tiktoken's "
                  f"1-thread rate; {rate_cpu / 1e6:.2f}M tokens per CPU-second = {rate_cpu / ceiling_cpu:.2f} x "
                  f"(bin written, pool start-up included; load {load()})")


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def _memory_kb(pid: int) -> tuple[int, int]:
    """(Rss, Pss) of a process in kB; Pss shares copy-on-write pages fairly between forked workers."""
    values = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values.get("Rss", 0), values.get("Pss", 0)


def bench_memory(command: list[str]) -> None:
    """Run command; sample its process tree every 0.1 s: peak summed PSS and peak single-process RSS."""
    proc = subprocess.Popen(command)
    peak_pss = peak_rss = 0
    done = threading.Event()

    def sample():
        nonlocal peak_pss, peak_rss
        while not done.wait(0.1):
            usage = [_memory_kb(p) for p in _tree(proc.pid)]
            peak_pss = max(peak_pss, sum(pss for _, pss in usage))
            peak_rss = max([peak_rss] + [rss for rss, _ in usage])

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    returncode = proc.wait()
    done.set()
    sampler.join()
    print(f"exit {returncode} after {time.perf_counter() - t0:.1f}s; peak memory of the process tree (summed PSS): "
          f"{peak_pss / 1024:.0f} MiB; largest single process RSS: {peak_rss / 1024:.0f} MiB (load {load()})")


def bench_loader(data_dir: Path, batches: int) -> None:
    from forge.data import TokenBatches

    loader = TokenBatches(data_dir, "train", 12, 1024, grad_accum_steps=40)
    rss_before = _rss_mb()
    for _ in range(5):
        loader.next()
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next()
    rate = batches / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(batches):
        loader.get_batch(1000 + i // 40, i % 40)
    direct = batches / (time.perf_counter() - t0)
    rss_growth = _rss_mb() - rss_before
    loader.close()
    print(f"{data_dir}/train.bin ({loader.num_tokens:,} tokens), batch 12 x 1024, accumulation 40: next() "
          f"{rate:.0f} batches/s ({rate * 12 * 1024 / 1e6:.1f}M tokens/s); get_batch() without prefetch "
          f"{direct:.0f} batches/s; resident memory grew {rss_growth:.0f} MB (load {load()})")


def _rss_mb() -> float:
    """This process's resident memory now (Linux /proc), in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def bench_tokenizer(paths: list[Path], vocab_sizes: list[int]) -> None:
    """Tokens per byte of the text of paths (the UTF-8 files, concatenated) under GPT-2's BPE and under
    byte-level BPEs of vocab_sizes trained on that same text (as data/text/prepare.py --tokenizer bpe does)."""
    text = "".join(p.read_text(encoding="utf-8") for p in paths)
    size = len(text.encode("utf-8"))
    gpt2 = len(GPT2Tokenizer().encode(text))
    print(f"{len(paths)} file(s), {size:,} bytes; GPT-2 BPE: {gpt2:,} tokens, {gpt2 / size:.3f} tokens/byte")
    with tempfile.TemporaryDirectory() as tmp:
        for vocab_size in vocab_sizes:
            t0 = time.perf_counter()
            meta = train_bpe([text], vocab_size, Path(tmp) / "tokenizer.json")
            seconds = time.perf_counter() - t0
            tokens = len(get_tokenizer(meta, tmp).encode(text))
            print(f"trained BPE, vocab {meta['vocab_size']:,} (trained in {seconds:.1f} s): {tokens:,} tokens, "
                  f"{tokens / size:.3f} tokens/byte = {tokens / gpt2:.2f} x GPT-2's (load {load()})")


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    corpus = modes.add_parser("corpus", help="generate a corpus")
    corpus.add_argument("out_dir", type=Path)
    corpus.add_argument("--mb", type=int, default=300, help="megabytes of text")
    corpus.add_argument("--text", type=Path, default=None, help="the text to cut documents from (default: Tiny Shakespeare)")
    tokenize = modes.add_parser("tokenize", help="tokens/s of tiktoken alone and of the pipeline")
    tokenize.add_argument("corpus", type=Path)
    tokenize.add_argument("--mb", type=int, default=40, help="megabytes of the corpus to tokenize")
    tokenize.add_argument("--num_proc", type=int, nargs="+", default=[1, 2])
    memory = modes.add_parser("memory", help="peak memory of a command's process tree")
    memory.add_argument("command", nargs="+")
    loader = modes.add_parser("loader", help="batches/s of TokenBatches at GPT-2 124M's batch shape")
    loader.add_argument("data_dir", type=Path)
    loader.add_argument("--batches", type=int, default=400)
    tokenizer = modes.add_parser("tokenizer", help="tokens per byte: a BPE trained on the text vs GPT-2's")
    tokenizer.add_argument("files", type=Path, nargs="+")
    tokenizer.add_argument("--vocab_size", type=int, nargs="+", default=[2048, 8192])
    args = parser.parse_args(argv)
    if args.mode == "corpus":
        make_corpus(args.out_dir, args.mb, args.text)
    elif args.mode == "tokenize":
        bench_tokenize(args.corpus, args.mb, args.num_proc)
    elif args.mode == "memory":
        bench_memory(args.command)
    elif args.mode == "loader":
        bench_loader(args.data_dir, args.batches)
    else:
        bench_tokenizer(args.files, args.vocab_size)


if __name__ == "__main__":
    run_main(main)
