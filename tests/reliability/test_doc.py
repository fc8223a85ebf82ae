"""docs/RELIABILITY.md stays true: one row per test of this suite, each with the count the test uses."""
import importlib
import re
from pathlib import Path

from tests.reliability import test_bad_inputs, test_crash, test_data_prep, test_numerics
from tests.util import REPO

DOC = REPO / "docs" / "RELIABILITY.md"
SUITE = Path(__file__).parent

# Counts that come from constants of the tests; any other test's count is its number of parametrised
# cases (1 when it is not parametrised).
COUNTS = {
    "test_kill_9_at_random_moments_then_resume_equals_uninterrupted":
        f"≥ {test_crash.MIN_KILLS} (seed {test_crash.KILL_SEED})",
    "test_sigterm_at_random_moments_saves_within_one_step_and_exits_0": f"{test_crash.TERMS} (seed {test_crash.TERM_SEED})",
    "test_prepare_killed_at_random_moments_never_leaves_a_complete_looking_folder":
        f"≥ {test_data_prep.MIN_KILLS} per script, {len(test_data_prep.SCRIPTS)} scripts (seed {test_data_prep.KILL_SEED})",
    "test_float16_overflowing_steps_are_skipped_not_applied": f"{len(test_numerics.POISONED_STEPS)} poisoned steps",
    "test_bad_input_is_one_clear_error_and_changes_nothing": str(len(test_bad_inputs.CASES)),
}


def suite_tests() -> dict:
    """{'file.py::test_name': number of parametrised cases} for every test function of this suite."""
    tests = {}
    for path in sorted(SUITE.glob("test_*.py")):
        module = importlib.import_module(f"tests.reliability.{path.stem}")
        for name, function in vars(module).items():
            if name.startswith("test_") and callable(function):
                cases = 1
                for mark in getattr(function, "pytestmark", []):
                    if mark.name == "parametrize":
                        cases *= len(mark.args[1])
                tests[f"{path.name}::{name}"] = cases
    return tests


def test_reliability_table_is_true():
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and (match := re.fullmatch(r"`(test_\w+\.py::test_\w+)`", cells[3])):
            assert match.group(1) not in rows, f"two rows for {match.group(1)}"
            rows[match.group(1)] = cells[1]
    tests = suite_tests()
    assert set(rows) == set(tests), f"rows without a test: {set(rows) - set(tests)}; tests without a row: " \
                                    f"{set(tests) - set(rows)}"
    for name, count in rows.items():
        expected = COUNTS.get(name.split("::")[1], str(tests[name]))
        assert count == expected, f"{name}: the table says {count!r}, the test uses {expected!r}"
