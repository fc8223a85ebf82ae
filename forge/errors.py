"""Turn a user's mistake into one clear line and a non-zero exit, never a traceback."""
import os
import sys


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data, corrupt checkpoint, ...).

    The message is one line that names the culprit and says what to do.
    """

    user_error = True
    exit_code = 2


def is_user_error(exc: BaseException) -> bool:
    """UserError, or any exception class marked `user_error = True` (model.py's, which must not import forge)."""
    return bool(getattr(exc, "user_error", False))


def is_rank_zero() -> bool:
    """True outside torchrun and on global rank 0 inside it (readable before init_process_group)."""
    return os.environ.get("RANK", "0") == "0"


def run_main(main) -> None:
    """Call main(); a user error becomes `error: <message>` on stderr (rank 0 only) and exit code 2."""
    try:
        main()
    except Exception as exc:
        if not is_user_error(exc):
            raise
        if is_rank_zero():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(getattr(exc, "exit_code", 2))
