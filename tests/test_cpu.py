"""forge/cpu.py: freed memory stays in the process, so training steps re-use it without page faults."""
import platform

import pytest

from tests.util import run_py

# Training steps of config/shakespeare_char_cpu.py's model (forward, backward, AdamW, gradients freed);
# prints the minor page faults per step after five warm-up steps.
FAULTS_PER_STEP = """
import resource, sys
import torch
from forge.cpu import retain_freed_memory
from forge.precision import set_matmul_precision
from model import GPT, GPTConfig
if sys.argv[1] == "retain":
    assert retain_freed_memory()
set_matmul_precision("medium", "cpu")  # bf16 products where the CPU has them: oneDNN's scratch buffers too
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 65, (12, 64))
def step():
    model(x, x)[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(25):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 25)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_training_steps_reuse_retained_memory_without_page_faults():
    faults = {mode: float(run_py("-c", FAULTS_PER_STEP, mode, env={"OMP_NUM_THREADS": "1"}, check=True).stdout)
              for mode in ("default", "retain")}
    assert faults["default"] > 50, faults  # glibc returns the freed heap to the kernel, then faults it in again
    assert faults["retain"] < 0.1 * faults["default"], faults
