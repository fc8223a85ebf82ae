"""torchrun, with failures reported in one line instead of torchrun's traceback.

    python -m forge.launch [torchrun options] train.py CONFIG [--key=value ...]

Takes exactly torchrun's options (`--standalone`, `--nproc_per_node`, `--nnodes`, `--rdzv_endpoint`,
`--rdzv_id`, `--max_restarts`, ...) and runs torch.distributed.run in this process; the launch/
scripts call it. What changes is how the job ends:
- a worker that failed with a user error (exit 2) or a collective timeout (exit 3) already printed
  its `error:` line (forge.errors.run_main): exit with its code and add nothing (torchrun would add
  a ChildFailedError traceback). A user error that only ranks which print nothing hit is printed
  here, from the worker's error file;
- a worker that crashed or was killed, with no restarts left: one `error:` line naming the rank and
  the exit code or signal (its own output, above, says why), not the ones that lost it (exit 4);
- a rendezvous that fails (a node never joined, a wrong endpoint): one `error:` line;
- a mistake in a train.py setup (its config, an accumulation the world size does not divide, a
  device or backend the processes cannot use) is reported before any worker starts
  (check_before_launch), so it is not retried; --max_restarts is for workers that died or hung (a
  user error found only inside the workers fails each attempt, then is reported once).
It also gives each worker an equal share of the CPU cores (OMP_NUM_THREADS) unless set, instead of
torchrun's 1 and its warning, lets workers stopped by SIGTERM (preemption) take
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default here 120) to save a checkpoint, and gives each
restart a fresh rendezvous store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1).
"""
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path

from forge.errors import run_main
from forge.io import first_line

# Exit codes of workers under forge.errors.run_main:
USER_ERROR = 2  # a UserError, reported by rank 0: the same mistake on every attempt
HUNG_PEER = 3  # forge.distributed.CollectiveError after a timeout, reported by every waiting rank
LOST_PEER = 4  # forge.distributed.CollectiveError after a peer died: the dead one is the cause
DEFAULT_SHUTDOWN_TIMEOUT_S = "120"


def _local_processes(nproc_per_node: str) -> int:
    """torchrun's --nproc_per_node as a number ('gpu' / 'auto' count the GPUs, or 1 without them)."""
    if nproc_per_node.isdigit():
        return int(nproc_per_node)
    import torch

    return torch.cuda.device_count() or 1


class _DropReportedFailures(logging.Filter):
    """Drop torchrun's 'failed (exitcode: 2) ...' log line: the worker's `error:` line already said why."""

    _REPORTED = re.compile(r"failed \(exitcode: (%d|%d)\)" % (USER_ERROR, HUNG_PEER))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._REPORTED.match(record.getMessage())


def check_before_launch(args) -> None:
    """Find the mistakes every worker would hit before any starts: the config of a train.py run, a world
    size that does not divide gradient_accumulation_steps, a device or backend the processes cannot use
    (forge.distributed.check_processes). A UserError (one `error:` line, exit 2).

    torchrun restarts a failed worker group whatever the failure and has no public hook to tell it
    otherwise, so a mistake that fails every attempt the same way is caught here, once, instead.
    A user error found only inside the workers is retried up to --max_restarts and then reported once.
    """
    if Path(args.training_script).name != "train.py":
        return
    from configurator import accumulation_per_rank, load_config
    from forge.distributed import check_processes, resolve_device

    cfg = load_config(args.training_script_args, prog="train.py")
    local = _local_processes(args.nproc_per_node)
    min_nodes, _, max_nodes = args.nnodes.partition(":")
    world_size = int(max_nodes or min_nodes) * local
    check_processes(resolve_device(cfg.device), None if cfg.backend == "auto" else cfg.backend, world_size, local)
    if not max_nodes or min_nodes == max_nodes:  # a fixed world size (an elastic range is checked by the workers)
        accumulation_per_rank(cfg.gradient_accumulation_steps, world_size)


def check_arguments(args) -> str | None:
    """The first launcher option that cannot work, as an error message (None when all can): process and
    node counts written as plain positive numbers (bash reads 08 as bad octal, 0 processes run nothing),
    rendezvous ports in 1..65535 and a host name that resolves (an unknown host would otherwise be
    retried until torchrun's join timeout, silently)."""
    nproc = str(args.nproc_per_node)
    if nproc not in ("gpu", "auto", "cpu", "xpu") and not re.fullmatch(r"[1-9][0-9]*", nproc):
        return (f"--nproc_per_node={nproc} must be a number of processes per node (1 or more, no leading zeros), "
                "or gpu/auto/cpu")
    nnodes = re.fullmatch(r"([1-9][0-9]*)(?::([1-9][0-9]*))?", str(args.nnodes))
    if not nnodes:
        return f"--nnodes={args.nnodes} must be a number of nodes (1 or more) or MIN:MAX"
    if nnodes.group(2) and int(nnodes.group(2)) < int(nnodes.group(1)):
        return f"--nnodes={args.nnodes}: MIN must not exceed MAX"
    if args.rdzv_endpoint:
        host, _, port = args.rdzv_endpoint.rpartition(":")
        if not host:
            host, port = args.rdzv_endpoint, str(args.master_port or "29400")
    else:
        host, port = args.master_addr, str(args.master_port or "29500")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"rendezvous port {port!r} (of {args.rdzv_endpoint or '--master_port'}) must be a number in 1..65535"
    try:
        socket.getaddrinfo(host.strip("[]"), int(port))
    except (socket.gaierror, UnicodeError) as exc:
        return (f"rendezvous host {host!r} cannot be resolved ({exc.strerror or exc}): check the name in "
                "--rdzv_endpoint (one node's host name or address, reachable from every node)")
    return None


def _is_cause(failure) -> bool:
    """A worker that crashed or was killed, not one that torchrun stopped (SIGTERM) or that lost its peer."""
    if failure.exitcode < 0:
        return -failure.exitcode != signal.SIGTERM
    return failure.exitcode != LOST_PEER


def _describe(failure) -> str:
    if failure.exitcode < 0:
        return f"was killed by {failure.signal_name()}"
    return f"exited with code {failure.exitcode}"


def report_unprinted_user_error(failures: dict) -> None:
    """Print a user error that only ranks which print nothing hit (not local rank 0 of this node).

    forge.errors.run_main prints on rank 0 and each node's local rank 0, then leaves the message in
    the worker's torchelastic error file, which torchrun reads into the failure. Local rank 0 printed
    if its file holds a message, whatever its exit code (torchrun may have stopped it just after).
    """
    user_errors = {rank: failure for rank, failure in failures.items() if failure.exitcode == USER_ERROR}
    if not user_errors or any(failure.local_rank == 0 and _recorded(failure) for failure in failures.values()):
        return  # none, or local rank 0 printed one
    rank, failure = min(user_errors.items(), key=lambda item: item[1].timestamp)
    message = failure.message if _recorded(failure) else "a user error it did not report (not run through run_main)"
    print(f"error: rank {rank}: {message}", file=sys.stderr, flush=True)


def _recorded(failure) -> bool:
    """The worker wrote its user error to its error file (forge.errors.record_for_launcher)."""
    return os.path.isfile(failure.error_file) and isinstance(failure.error_file_data.get("message"), str)


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    problem = check_arguments(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        return 2
    if not args.standalone and args.nnodes != "1":
        print(f"waiting for --nnodes={args.nnodes} node(s) to meet at {args.rdzv_endpoint or args.master_addr} "
              "(every node runs this launcher with the same --rdzv_endpoint; torchrun gives up after its "
              "rendezvous timeouts)", file=sys.stderr, flush=True)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropReportedFailures())
    check_before_launch(args)
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _local_processes(args.nproc_per_node)))
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT_S)
    # Restarted workers must not share the rendezvous TCPStore with the failed attempt: they would
    # read its stale addresses and fail to connect (pytorch/pytorch#135712). A fresh store per round.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        run(args)
    except ChildFailedError as exc:
        report_unprinted_user_error(exc.failures)
        codes = {failure.exitcode for failure in exc.failures.values()}
        for reported in (USER_ERROR, HUNG_PEER):  # the workers' own `error:` line says it all
            if reported in codes:
                return reported
        causes = {rank: failure for rank, failure in exc.failures.items() if _is_cause(failure)}
        rank, failure = min((causes or exc.failures).items(), key=lambda item: item[1].timestamp)
        restarts = f"after {args.max_restarts} restart(s)" if args.max_restarts else "(no restarts: --max_restarts=0)"
        print(
            f"error: worker rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) {_describe(failure)} "
            f"{restarts}; its output above says why",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except RendezvousError as exc:
        endpoint = args.rdzv_endpoint or f"{args.master_addr}:{args.master_port}"
        print(
            f"error: the nodes could not meet at {endpoint} (--nnodes={args.nnodes}): {first_line(exc)}; check "
            "that every node runs the launcher with the same --rdzv_endpoint/--rdzv_id and can reach that host:port",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except SignalException as exc:  # SIGTERM/SIGINT to the launcher: workers were told to save and stop
        logging.getLogger(__name__).warning("launcher received %s; workers were asked to stop", exc.sigval.name)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    run_main(lambda: sys.exit(main()))
