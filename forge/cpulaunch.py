"""Training on a CPU with every core: one process per physical core, one thread each (gloo DDP).

    python train.py config/shakespeare_char_cpu.py          # on a machine without GPUs: N processes
    python train.py config/shakespeare_char_cpu.py --cpu_procs=1          # one process, torch's threads
    OMP_NUM_THREADS=2 python train.py config/shakespeare_char_cpu.py      # one process, 2 threads

For the small models trained on a CPU, a process's intra-op threads mostly wait on each other (and
collapse when another job takes a core); processes with one thread each, all-reducing a few MB of
gradients over gloo, do not. The loader's batches do not depend on the world size, so N processes
train the same model as one (up to the order of the gradient sums' float rounding).

train.py's and bench.py's entries call run_on_cpu_cores(main, cfg, ...): on a CPU, outside any
launcher, it runs main(cfg) as N worker processes (torchrun's environment: RANK, WORLD_SIZE,
MASTER_ADDR, ...) and exits with their code (bench.py's --threads: one process). On Linux the workers
are forks of this process, which has already imported torch and read the config (a new interpreter
per worker would spend ~3 s of a core on that again, before the first step); elsewhere, or if this
process already runs other threads, each worker is the same script run again.
How many (the `cpu_procs` key and OMP_NUM_THREADS):
- cpu_procs='auto' (the default): the most processes, up to the physical cores this process may use,
  that divide gradient_accumulation_steps (the micro-steps are split across processes) and that
  fit in the available memory, by an estimate from the model's shape; threads: the cores divided
  among them (one each when there is one per core). With OMP_NUM_THREADS set, the user chose the
  threads: one process with that many.
- cpu_procs=N: N processes, each with OMP_NUM_THREADS threads if set, else the cores divided among them.
- one process (no relaunch): under torchrun or any launcher that set RANK/WORLD_SIZE (no nested
  launch), a device other than the CPU, eval_only, one physical core, or a plan of one process.
Physical cores: the CPUs of os.sched_getaffinity, SMT siblings (Linux's topology/thread_siblings_list)
counted once, capped by a cgroup CPU quota (a container's --cpus); macOS's hw.physicalcpu; else
os.cpu_count().

A small launcher rather than torchrun's agent, for the behaviour of a single process: Ctrl-C or
SIGTERM reaches every worker exactly once (the workers run in their own session, and this process
forwards the signal), each finishes its step, rank 0 saves once, and the command exits 0, where
torchrun's agent would exit 128+signal; a second Ctrl-C aborts, as in one process. A worker that
failed with a user error already printed its one `error:` line (forge.errors.run_main); a crash gets
one line naming the process here. Workers die with this process (PR_SET_PDEATHSIG: SIGTERM, so they
save), and count time_s from its start (GPTFORGE_RUN_START, read by forge.metrics).
"""
import ctypes
import math
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

from forge.errors import UserError, run_main
from forge.launch import HUNG_PEER, LOST_PEER, USER_ERROR
from forge.metrics import PROCESS_START, RUN_START_ENV

LAUNCHER_ENV = "GPTFORGE_CPU_LAUNCHER"  # set in the workers: the launcher's pid
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")  # set: a launcher already runs us
FAILURE_GRACE_S = 10.0  # after a worker fails, the others get this long to fail on their own, then are killed
MEMORY_SHARE = 0.8  # auto: the processes' estimated memory stays under this share of the available memory
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
CPU_SYSFS = Path("/sys/devices/system/cpu")


def physical_cores() -> int:
    """Physical cores this process may run on: its CPU affinity with SMT siblings counted once, capped by a
    cgroup CPU quota. macOS: sysctl hw.physicalcpu; elsewhere without affinity (Windows): os.cpu_count()."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        if sys.platform == "darwin":
            try:
                return int(subprocess.run(["sysctl", "-n", "hw.physicalcpu"], capture_output=True, text=True,
                                          timeout=10).stdout)
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:  # e.g. "0,64" or "0-1": the logical CPUs of cpu's physical core
            cores.add((CPU_SYSFS / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:  # no topology exposed: count the CPU as a core
            cores.add(str(cpu))
    quota = cgroup_cpu_quota()
    return max(1, min(len(cores), quota or len(cores)))


def cgroup_cpu_quota() -> int | None:
    """The CPUs a cgroup quota allows (cgroup v2 cpu.max, or v1 cfs quota/period), rounded up; None: no quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
            period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        return math.ceil(int(quota) / int(period)) if int(quota) > 0 else None
    except ValueError:  # "max": no quota
        return None


def available_memory() -> int | None:
    """Bytes of memory available to new processes (Linux's MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_memory_estimate(cfg) -> int:
    """Rough bytes one training process needs, from the config's shape: float32 weights, gradients and two
    AdamW moments (16 bytes a parameter; GPT-2's padded vocabulary assumed), activations of one micro-batch
    (Korthikanti et al. 2022, in float32), and its logits with their gradient. An upper guess, for a cap."""
    d, layers, tokens = cfg.n_embd, cfg.n_layer, cfg.batch_size * cfg.block_size
    params = 12 * layers * d * d + (50304 + cfg.block_size) * d
    activations = 2 * tokens * d * layers * (34 + 5 * cfg.n_head * cfg.block_size / d)
    logits = 3 * 4 * tokens * 50304
    return int(16 * params + activations + logits)


def plan_processes(cfg, cores: int, environ=os.environ, memory: int | None = None) -> tuple[int, int | None]:
    """(processes, threads per process; None: torch's default) for a CPU run with `cores` physical cores."""
    threads = environ.get("OMP_NUM_THREADS")
    threads = int(threads) if threads and threads.isdigit() and int(threads) > 0 else None
    accum = cfg.gradient_accumulation_steps
    if cfg.cpu_procs == "auto":
        if threads is not None:  # the user chose the threads: one process with that many
            return 1, threads
        fit = max(1, int(MEMORY_SHARE * memory // process_memory_estimate(cfg))) if memory else cores
        procs = max(n for n in range(1, min(cores, fit) + 1) if accum % n == 0)
    else:
        procs = cfg.cpu_procs
        if accum % procs:
            raise UserError(f"cpu_procs={procs} does not divide gradient_accumulation_steps={accum} (each process "
                            f"runs an equal share of the micro-steps): use a divisor of {accum}, or cpu_procs='auto'")
    if procs == 1:
        return 1, threads
    return procs, threads or max(1, cores // procs)


def run_on_cpu_cores(main, cfg, script: str, argv: list) -> None:
    """An entry point's body: main(cfg) in this process, or in the processes train_on_cpu_cores() starts."""
    code = train_on_cpu_cores(cfg, script, argv, main)
    if code is None:
        main(cfg)
    elif code:
        sys.exit(code)


def train_on_cpu_cores(cfg, script: str, argv: list, main=None) -> int | None:
    """Called by an entry point before it trains: on a CPU, outside any launcher, run main(cfg) (or `script argv`)
    as the processes plan_processes() chooses and return their exit code; None: this process trains itself."""
    if os.environ.get(LAUNCHER_ENV):
        die_with_launcher(int(os.environ[LAUNCHER_ENV]))
    if any(os.environ.get(name) for name in TORCHRUN_ENV) or cfg.eval_only:
        return None
    from forge.distributed import resolve_device  # imports torch: only on the way to training anyway

    if resolve_device(cfg.device) != "cpu":
        return None
    procs, threads = plan_processes(cfg, physical_cores(), memory=available_memory())  # launch/single_node.sh too
    if procs == 1:
        return None
    print(f"training on {procs} CPU processes x {threads} thread(s) (gloo); --cpu_procs=1 (or OMP_NUM_THREADS) "
          "for one process", flush=True)
    return run_workers(script, argv, procs, threads, (lambda: main(cfg)) if main else None)


def run_workers(script: str, argv: list, procs: int, threads: int, work=None) -> int:
    """Run ranks 0..procs-1 of one job on this machine; their exit code. Each rank calls work() in a fork of
    this process where that is safe (forked_workers_safe), else runs `python script argv`."""
    env = {**os.environ, "WORLD_SIZE": str(procs), "LOCAL_WORLD_SIZE": str(procs), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": str(threads), LAUNCHER_ENV: str(os.getpid()),
           RUN_START_ENV: os.environ.get(RUN_START_ENV, repr(PROCESS_START))}
    fork = work is not None and forked_workers_safe()
    workers = []
    received = []

    def forward(signum, frame):  # each worker gets each signal once: the first saves, a second Ctrl-C aborts
        received.append(signum)
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for rank in range(procs):
            rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            workers.append(ForkedWorker(work, rank_env, threads, previous) if fork else
                           subprocess.Popen([sys.executable, script, *argv], start_new_session=True, env=rank_env))
        return wait_for(workers, received)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def forked_workers_safe() -> bool:
    """True where the workers can be forks of this process: Linux, and no thread started since this module
    was imported (before the entry points compute anything).

    A fork skips each worker's own start (importing torch and the rest: ~3 s of CPU a process, while the
    run waits). A thread pool started later (OpenMP's once a parallel op ran, a CUDA driver's, any Python
    thread) would not survive the fork and could hold a lock the worker then waits on forever; then the
    workers start as new interpreters instead. The threads already there at import are numpy's OpenBLAS
    servers, which stop and restart around a fork themselves (pthread_atfork).
    """
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return False
    threads = _native_threads()
    return threads is not None and threads <= _THREADS_AT_IMPORT


def _native_threads() -> set | None:
    """The ids of this process's threads, native ones included (Linux); None where unknown."""
    try:
        return set(os.listdir("/proc/self/task"))
    except OSError:
        return None


_THREADS_AT_IMPORT = _native_threads() or set()


class ForkedWorker:
    """A worker forked from this process that calls work() as one rank; the subprocess.Popen methods
    run_workers and wait_for use (poll, wait, send_signal, kill, returncode)."""

    def __init__(self, work, env: dict, threads: int, handlers: dict):
        sys.stdout.flush()  # else what is buffered here would be printed again by every fork
        sys.stderr.flush()
        self.returncode = None
        self.pid = os.fork()
        if self.pid == 0:
            os._exit(self._child(work, env, threads, handlers))

    @staticmethod
    def _child(work, env: dict, threads: int, handlers: dict) -> int:
        """The worker's whole life, as `python script argv` would live it; its exit code (never returns
        through the launcher's frames, so no cleanup of the launcher's runs twice)."""
        code = 1
        try:
            os.setsid()  # its own session, as start_new_session: a terminal's Ctrl-C reaches it only through us
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            os.environ.clear()
            os.environ.update(env)
            die_with_launcher(int(env[LAUNCHER_ENV]))
            import torch  # already imported here: OpenMP read OMP_NUM_THREADS when it loaded, before env was set

            torch.set_num_threads(threads)
            run_main(work)
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
        return code

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self):
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def wait_for(workers: list, received: list) -> int:
    """Wait for every worker; after the first failure the others get FAILURE_GRACE_S to end, then are killed.
    0 if all succeeded; the code of a worker that reported its own `error:` line; else 1 and one line here."""
    first_failure, killed = None, set()
    while any(worker.poll() is None for worker in workers):
        failed = [rank for rank, worker in enumerate(workers) if worker.poll() not in (None, 0)]
        if failed and first_failure is None:
            first_failure = time.monotonic()
        if first_failure is not None and time.monotonic() - first_failure > FAILURE_GRACE_S:
            for rank, worker in enumerate(workers):
                if worker.poll() is None:
                    killed.add(rank)
                    worker.kill()
        time.sleep(0.2)
    codes = {rank: worker.returncode for rank, worker in enumerate(workers)}
    if all(code == 0 for code in codes.values()):
        return 0
    for reported in (USER_ERROR, HUNG_PEER, 130):  # already said: an `error:` line, or `interrupted`
        if reported in codes.values():
            return reported
    causes = {rank: code for rank, code in codes.items()
              if code != 0 and rank not in killed and code != LOST_PEER and -code not in received}
    rank, code = min(causes.items()) if causes else min((r, c) for r, c in codes.items() if c != 0)
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    hint = " (out of memory? try fewer processes with --cpu_procs)" if code == -signal.SIGKILL else ""
    print(f"error: training process rank {rank} {how}{hint}; its output above says why", file=sys.stderr, flush=True)
    return 1


def free_port() -> int:
    """A TCP port free on the loopback interface now, for rank 0's rendezvous store."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_launcher(launcher_pid: int) -> None:
    """In a worker: receive SIGTERM (finish the step, save, exit) when the launcher dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the workers outlive a killed launcher
        return
    if os.getppid() != launcher_pid:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)
