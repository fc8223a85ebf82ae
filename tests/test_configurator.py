"""configurator.py: config files, --key=value overrides, types, typos, --help, generic dataclasses."""
import json
from dataclasses import dataclass
from typing import Literal, Optional

import pytest

import configurator
from configurator import ConfigError, TrainConfig, field_comments, load_config
from forge.errors import UserError
from tests.util import REPO


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_files_in_order_then_overrides(tmp_path):
    a = write(tmp_path, "a.py", "n_layer = 4\nlearning_rate = 1e-3\nout_dir = 'a'\n")
    b = write(tmp_path, "b.py", "n_layer = 6\n")
    cfg = load_config([a, b, "--out_dir=c", "--dropout=0.1"])
    assert (cfg.n_layer, cfg.learning_rate, cfg.out_dir, cfg.dropout) == (6, 1e-3, "c", 0.1)
    assert cfg.batch_size == TrainConfig().batch_size
    assert load_config([b, a]).n_layer == 4  # the later file wins


def test_override_values():
    cfg = load_config(["--max_iters=10", "--learning_rate=1", "--compile=False", "--init_from=resume",
                       "--out_dir=runs/x=1,y=2", "--wandb_run_name=1e3", "--wandb_project='quoted'"])
    assert cfg.max_iters == 10
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)  # int accepted for a float
    assert cfg.compile is False and cfg.init_from == "resume"
    assert cfg.out_dir == "runs/x=1,y=2"  # values may contain '='
    assert cfg.wandb_run_name == "1e3" and cfg.wandb_project == "quoted"


@pytest.mark.parametrize("argv, message", [
    (["--n_layr=3"], "unknown config key 'n_layr' in '--n_layr=3'; did you mean 'n_layer'?"),
    (["--zzzz=3"], "unknown config key 'zzzz'.*--help"),
    (["--max_iters=1.5"], "max_iters must be int, got 1.5"),
    (["--max_iters=ten"], "max_iters must be int, got 'ten'"),
    (["--compile=1"], "compile must be True or False, got 1"),
    (["--compile=true"], "compile must be True or False, got 'true'"),
    (["--learning_rate=fast"], "learning_rate must be float"),
    (["--dtype=fp16"], "dtype must be 'auto' or 'float32' or 'bfloat16' or 'float16', got 'fp16'"),
    (["--compile"], "override '--compile' needs a value"),
    (["-x"], "unrecognised option '-x'"),
    (["--n_head=5"], "n_embd=768 is not divisible by n_head=5"),  # GPTConfig checks the model keys
    (["--batch_size=0"], "batch_size=0 must be at least 1"),
    (["--dropout=1.0"], r"dropout=1.0 must be in \[0, 1\)"),
    (["missing.py"], "config file missing.py not found"),
])
def test_bad_overrides_are_config_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)
    assert issubclass(ConfigError, UserError)


def test_config_file_errors_name_the_file(tmp_path):
    typo = write(tmp_path, "typo.py", "batch_size = 8\nlearnign_rate = 1e-3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'learnign_rate' in .*typo.py; did you mean 'learning_rate'"):
        load_config([typo])
    wrong = write(tmp_path, "wrong.py", "max_iters = '100'\n")
    with pytest.raises(ConfigError, match="max_iters must be int, got '100'"):
        load_config([wrong])
    syntax = write(tmp_path, "syntax.py", "n_layer = = 3\n")
    with pytest.raises(ConfigError, match="syntax.py line 1 is not valid Python"):
        load_config([syntax])
    crash = write(tmp_path, "crash.py", "n_layer = 1 // 0\n")
    with pytest.raises(ConfigError, match="crash.py failed: ZeroDivisionError"):
        load_config([crash])


def test_config_files_run_in_a_private_namespace(tmp_path):
    path = write(tmp_path, "helpers.py", "import math\nfrom os import path as _p\n_width = 64\n"
                 "def double(x):\n    return 2 * x\n"
                 "n_embd = double(_width)\nn_head = int(math.sqrt(16))\n")
    cfg = load_config([path])
    assert (cfg.n_embd, cfg.n_head) == (128, 4)
    peek = write(tmp_path, "peek.py", "n_layer = len(TrainConfig.__name__)\n")  # the module's globals are not visible
    with pytest.raises(ConfigError, match="peek.py failed: NameError"):
        load_config([peek])
    other = write(tmp_path, "other.py", "n_layer = n_embd\n")  # names from earlier files are not visible
    with pytest.raises(ConfigError, match="other.py failed: NameError"):
        load_config([path, other])


@dataclass
class SampleConfig:
    out_dir: str = "out"  # where the checkpoint is
    top_k: Optional[int] = None  # keep only the top k tokens
    temperature: float = 1.0  # sampling temperature
    mode: Literal["text", "ids"] = "text"  # what to print


def test_generic_over_any_dataclass():
    cfg = load_config(["--top_k=50", "--temperature=0", "--mode=ids"], SampleConfig)
    assert (cfg.top_k, cfg.temperature, cfg.mode) == (50, 0.0, "ids")
    assert load_config(["--top_k=None"], SampleConfig).top_k is None
    with pytest.raises(ConfigError, match="top_k must be int or None, got 'many'"):
        load_config(["--top_k=many"], SampleConfig)
    with pytest.raises(ConfigError, match="did you mean 'top_k'"):
        load_config(["--topk=3"], SampleConfig)
    assert field_comments(SampleConfig) == {"out_dir": "where the checkpoint is", "top_k": "keep only the top k tokens",
                                            "temperature": "sampling temperature", "mode": "what to print"}


def test_help_lists_every_key_with_default_and_comment(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config(["--help"], prog="train.py")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    comments = field_comments(TrainConfig)
    for name, field in TrainConfig.__dataclass_fields__.items():
        assert comments.get(name), f"{name} has no one-line comment"
        line = next(line for line in out.splitlines() if line.strip().startswith(f"--{name}="))
        assert repr(field.default) in line and comments[name] in line


def test_every_shipped_config_file_loads():
    files = sorted((REPO / "config").glob("*.py"))
    assert {f.name for f in files} >= {"shakespeare_char.py", "shakespeare_char_cpu.py", "owt.py",
                                        "finetune_shakespeare.py", "eval_gpt2.py", "eval_gpt2_medium.py",
                                        "eval_gpt2_large.py", "eval_gpt2_xl.py", "shakespeare_bigram.py"}
    for file in files:
        load_config([str(file)])
    owt = load_config([str(REPO / "config" / "owt.py")])
    assert owt.batch_size * owt.block_size * owt.gradient_accumulation_steps == 491_520


def test_resolved_config_is_json(tmp_path):
    cfg = load_config([])
    assert json.loads(json.dumps(configurator.config_dict(cfg)))["n_layer"] == cfg.n_layer


def test_base_values_go_under_the_command_line_and_are_validated_together():
    """train.py's resume: the run's stored values are the base; the command's keys win; then the whole is checked."""
    seen = []
    base = {"n_head": 4, "n_embd": 32, "max_iters": 7, "dataset": "shakespeare_char"}
    cfg = load_config(["--n_embd=64", "--out_dir=run"], base=lambda values: seen.append(values) or base)
    assert seen == [{"n_embd": 64, "out_dir": "run"}]  # base sees what the command set
    assert (cfg.n_head, cfg.n_embd, cfg.max_iters, cfg.dataset) == (4, 64, 7, "shakespeare_char")  # 64 % 12 != 0
    with pytest.raises(ConfigError, match="n_embd=48 is not divisible by n_head=5"):
        load_config(["--n_embd=48"], base=lambda values: {"n_head": 5})
