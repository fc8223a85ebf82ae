# The two commands of the README live here:
#   make run    install, prepare Tiny Shakespeare (characters), train, print a sample
#   make test   install the test dependencies and run the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN_OUT ?= out-shakespeare-char

.PHONY: run test install install-dev venv

$(PY):
	$(PYTHON) -m venv $(VENV)

venv: $(PY)

# torch: any version in pyproject's range. A torch already in the venv that fits it is kept; into an
# empty venv pip installs TORCH (default: the newest it finds). Pick one with e.g. TORCH=torch==2.11.0.
TORCH  ?= torch

install: $(PY)
	$(PY) -m pip install '$(TORCH)' -e '.[hf]'

install-dev: $(PY)
	$(PY) -m pip install '$(TORCH)' -e '.[dev]'

# The GPU baby GPT when CUDA is present, the small CPU configuration otherwise (train.py runs it as
# one process per physical core, one thread each: forge/cpulaunch.py).
# init_from=auto: running `make run` again resumes (or just samples) instead of starting over.
run: install
	$(PY) data/shakespeare_char/prepare.py
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; \
	  then cfg=config/shakespeare_char.py; else cfg=config/shakespeare_char_cpu.py; fi; \
	  echo "training with $$cfg"; \
	  $(PY) train.py $$cfg --out_dir=$(RUN_OUT) --init_from=auto
	$(PY) sample.py --out_dir=$(RUN_OUT) --num_samples=1 --max_new_tokens=500

test: install-dev
	$(PY) -m pytest -q
