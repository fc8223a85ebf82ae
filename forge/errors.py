"""Turn a user's mistake into one clear line and a non-zero exit, never a traceback."""
import argparse
import json
import os
import sys
import time


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data, corrupt checkpoint, ...).

    The message is one line that names the culprit and says what to do.
    """

    user_error = True
    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors, so run_main prints them as one `error:` line."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def is_user_error(exc: BaseException) -> bool:
    """UserError, or any exception class marked `user_error = True` (model.py's, which must not import forge)."""
    return bool(getattr(exc, "user_error", False))


def is_rank_zero() -> bool:
    """True outside torchrun and on global rank 0 inside it (readable before init_process_group)."""
    return os.environ.get("RANK", "0") == "0"


_TRANSLATORS = []


def register_error_translator(translate) -> None:
    """translate(exc) -> a user error to report instead of exc, or None (forge.distributed: collective timeouts)."""
    _TRANSLATORS.append(translate)


def run_main(main) -> None:
    """Call main(); a user error becomes `error: <message>` on stderr (rank 0 and each node's local
    rank 0 only) and exit code 2, Ctrl-C becomes `interrupted` and exit code 130: never a traceback."""
    try:
        main()
    except KeyboardInterrupt:  # a second Ctrl-C (the first one asks train.py to save and stop)
        if is_rank_zero():
            print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as raised:
        exc = next(filter(None, (translate(raised) for translate in _TRANSLATORS)), raised)
        if not is_user_error(exc):
            raise
        # Most errors are the same on every rank: rank 0 reports them, and the first rank of every other
        # node, whose output is often a separate log. Some (a rank that hung) only the other ranks see.
        if is_rank_zero() or os.environ.get("LOCAL_RANK") == "0" or getattr(exc, "report_on_every_rank", False):
            print(f"error: {exc}", file=sys.stderr, flush=True)
        record_for_launcher(str(exc))
        sys.exit(getattr(exc, "exit_code", 2))


def record_for_launcher(message: str) -> None:
    """Under torchrun, write message to this worker's error file (torchelastic's JSON format).

    torchrun reads the file into the failure it reports. forge.launch prints the message when only
    ranks that print nothing hit the error (a data file missing on one node's disk, say).
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    from forge.io import atomic_write  # forge.io imports this module

    record = {"message": message, "timestamp": int(time.time())}
    try:  # whole or absent: the agent reads it as soon as we exit, and a SIGTERM from it may end us mid-write
        atomic_write(path, lambda f: f.write(json.dumps(record).encode("utf-8")))
    except OSError:  # the report is a courtesy: never let it hide the error's exit code
        pass
