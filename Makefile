# The two commands of the README: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is a local CPU wheel here.
TORCH  := torch==2.13.0
EXTRAS := test,bench,hf,study,triton,lightning,deepspeed,cli
STAMP  := $(VENV)/.installed
# `make demo` installs torch and the `cli` extra only (no DeepSpeed, Lightning, Triton or
# test tools): a fresh clone's demo takes minutes, most of it the download.
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: demo test bench clean lint

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# DeepSpeed JIT-compiles its CPU shared-memory communication op on first use (g++,
	# about a minute): build it once here, not inside a test's time limit.
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
	# GRU's CPU kernels (gru_optim/kernels/_native.py) compile on first use (g++, about 15 s):
	# built and cached here too.
	$(BIN)/python -c "from gru_optim.kernels import build; build()"
	touch $@

$(DEMO_STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[cli]"
	touch $@

# gru-unlearn's embedded default: the study's tiny model and corpus, GRU and the plain
# baseline side by side (docs/guides/cli.md); one run of each shows what the command does,
# not which is better: the last lines are the published study's verdict, the sentence the
# README's Results open with, generated from the same per-run records (the study itself:
# python -m gru_optim.demo).
STUDIES := docs/results/study_full/summary.json docs/results/study_large/summary.json
demo: $(DEMO_STAMP)
	$(BIN)/gru-unlearn --output results/gru-unlearn-demo --overwrite
	@echo
	@echo "One run of each arm, one seed: what gru-unlearn does, not evidence that GRU is better."
	@echo "What the published study shows (README, Results; re-derived from its per-run records):"
	@$(BIN)/python -m gru_optim.study.rederive --brief $(STUDIES)

test: $(STAMP)
	$(BIN)/python -m pytest -W error -q

# The documentation site (mkdocs.yml): built with warnings as errors into site/.
DOCS_STAMP := $(VENV)/.installed-docs
.PHONY: docs docs-serve

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $@

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	$(BIN)/python docs/check_render.py site

docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# Lint and type check (ruff, mypy: configuration in pyproject.toml), as .ci/run and the
# pre-commit hooks run them.
LINT_STAMP := $(VENV)/.installed-lint
$(LINT_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[lint]"
	touch $@

lint: $(LINT_STAMP)
	$(BIN)/ruff check gru_optim tests benchmarks docs
	$(BIN)/ruff format --check gru_optim tests benchmarks docs
	$(BIN)/mypy

# The Hugging Face tests against the oldest transformers the `hf` extra allows (4.45, the
# release open-unlearning pins), in a second, smaller environment: torch pinned as above,
# the floor versions in .ci/hf-floor-constraints.txt, the package from this checkout.
FLOOR       := .venv-hf-floor
FLOOR_STAMP := $(FLOOR)/.installed
HF_TESTS    := tests/test_hf.py tests/test_hf_mixin.py tests/test_docs_open_unlearning.py
# DeepSpeed's JIT-built op is keyed on its include paths (the venv's): a cache of the floor's
# own, so that the two environments do not rebuild each other's.
FLOOR_ENV   := DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$(CURDIR)/$(FLOOR)/torch_extensions
.PHONY: test-hf-floor

$(FLOOR_STAMP): setup.cfg pyproject.toml Makefile .ci/hf-floor-constraints.txt
	test -x $(FLOOR)/bin/python || $(PYTHON) -m venv $(FLOOR)
	$(FLOOR)/bin/python -m pip install -q --upgrade pip
	$(FLOOR)/bin/python -m pip install -q -c .ci/hf-floor-constraints.txt -e ".[test,hf,deepspeed]"
	$(FLOOR_ENV) $(FLOOR)/bin/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
	$(FLOOR)/bin/python -c "from gru_optim.kernels import build; build()"
	touch $@

test-hf-floor: $(FLOOR_STAMP)
	$(FLOOR)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(FLOOR_ENV) $(FLOOR)/bin/python -m pytest -W error -q $(HF_TESTS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(FLOOR) build site *.egg-info .pytest_cache .hypothesis
