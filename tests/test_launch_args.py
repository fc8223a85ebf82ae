"""forge.launch.check_arguments: launcher options that cannot work are one line before torchrun starts."""
import pytest

from forge.launch import check_arguments, main


def _check(*options):
    from torch.distributed.run import parse_args

    return check_arguments(parse_args([*options, "train.py"]))


@pytest.mark.parametrize("options, needle", [
    (["--nproc_per_node=08"], "nproc_per_node=08"),
    (["--nproc_per_node=0"], "nproc_per_node=0"),
    (["--nproc_per_node=-1"], "nproc_per_node=-1"),
    (["--nnodes=0"], "nnodes=0"),
    (["--nnodes=3:2"], "MIN must not exceed MAX"),
    (["--nnodes=2", "--rdzv_endpoint=node0:70000"], "1..65535"),
    (["--nnodes=2", "--rdzv_endpoint=node0:0"], "1..65535"),
    (["--master_port=99999"], "1..65535"),
    (["--nnodes=2", "--rdzv_endpoint=no-such-host.invalid:29500"], "cannot be resolved"),
])
def test_impossible_launcher_options_are_named(options, needle):
    assert needle in _check(*options)


@pytest.mark.parametrize("options", [["--standalone", "--nproc_per_node=2"], ["--nproc_per_node=gpu"],
                                     ["--nnodes=1:4", "--rdzv_endpoint=localhost:29500"],
                                     ["--nnodes=2", "--rdzv_endpoint=127.0.0.1"]])
def test_workable_launcher_options_pass(options):
    assert _check(*options) is None


def test_main_refuses_with_one_line_and_exit_2(capsys):
    assert main(["--nproc_per_node=08", "train.py"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --nproc_per_node=08") and len(err.strip().splitlines()) == 1
