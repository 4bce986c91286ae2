# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv when it is missing and install what they need; both are idempotent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ssl_distill_installed
# The tested PyTorch set; newer compatible releases work too.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

# `make gpu-wheels`: the wheels the GPU machine lacks (Python 3.12, torch 2.11 + CUDA 13, no network), for
# benchmarks/gpu_check.sh, which installs them into a temporary --target there (pass `.gpu-wheels` to the device tool's
# carry). All pure Python: omegaconf 2.4 vendors its ANTLR runtime (antlr4-python3-runtime 4.9.3, which omegaconf 2.3
# needs, exists only as an sdist); lightly's modules that the baseline imports need none of lightly's requirements
# (hydra-core, pytorch_lightning), and the GPU machine has timm. fvcore is imported only by `ssl-distill
# models --flops`, which the check does not run. Optional, tried by the check and
# used only if it runs there: xFormers 0.0.35, the one release for torch >= 2.10 (stable ABI); its kernels are built
# for CUDA 12 (libcudart.so.12), so on torch's CUDA 13 build it may fall back to PyTorch's kernels or not run.
GPU_WHEELS ?= omegaconf==2.4.0 submitit==1.5.4 lightly==1.6.0
GPU_OPTIONAL_WHEELS ?= xformers==0.0.35
GPU_WHEEL_DIR ?= .gpu-wheels
GPU_PIP := -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

.PHONY: demo test install lint clean gpu-wheels

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py | $(PY)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ssl-distill demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check ssl_distill tests tools benchmarks

gpu-wheels:
	rm -rf $(GPU_WHEEL_DIR)
	$(PYTHON) $(GPU_PIP) -d $(GPU_WHEEL_DIR) $(GPU_WHEELS)
	$(PYTHON) $(GPU_PIP) -d $(GPU_WHEEL_DIR)/optional $(GPU_OPTIONAL_WHEELS)
	@du -ah $(GPU_WHEEL_DIR) | sort -k2

clean:
	rm -rf $(VENV) build *.egg-info
