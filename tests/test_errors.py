"""forge.errors.run_main: user errors and Ctrl-C are one line, real bugs keep their traceback."""
import pytest

from tests.util import assert_clean_error, run_py

SCRIPT = """
import sys
from forge.errors import UserError, run_main

def main():
    kind = sys.argv[1]
    if kind == "user":
        raise UserError("data/x/train.bin not found: run python data/x/prepare.py")
    if kind == "model":  # model.py marks its own exceptions instead of importing forge
        class ModelError(ValueError):
            user_error = True
        raise ModelError("n_embd=10 is not divisible by n_head=3")
    if kind == "interrupt":
        raise KeyboardInterrupt
    raise RuntimeError("a bug")

run_main(main)
"""


@pytest.mark.parametrize("kind, needle", [("user", "train.bin not found"), ("model", "n_embd=10")])
def test_user_errors_are_one_line(kind, needle):
    proc = run_py("-c", SCRIPT, kind)
    assert proc.returncode == 2
    assert_clean_error(proc, needle)


def test_ctrl_c_is_one_line_and_exit_130():
    proc = run_py("-c", SCRIPT, "interrupt")
    assert proc.returncode == 130 and proc.stderr.strip() == "interrupted"


def test_bugs_keep_their_traceback():
    proc = run_py("-c", SCRIPT, "bug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "RuntimeError: a bug" in proc.stderr
