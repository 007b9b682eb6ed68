# Everything a fresh clone needs: Python 3.11 + pip. `make test` creates .venv,
# installs the project with every CPU extra, then runs ruff, mypy and pytest.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: a bare requirement may pull a multi-GB CUDA build.
TORCH := torch==2.13.0
TRT_STUBS := tensorrt-stubs==10.13.0.35.1
EXTRAS := cpu,openvino,train,serve,dev,int8,dicom,scanner,anatomy,ray
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck pytest demo bench-cpu clean

$(STAMP): pyproject.toml Makefile tests/trt_stubs.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[$(EXTRAS)]"
	# The stubs' metadata requires the real TensorRT wheel (CUDA only): install them alone.
	$(BIN)/python -m pip install --quiet --no-deps "$(TRT_STUBS)"
	# ... and they need a few syntax repairs before mypy can read them (see tests/trt_stubs.py).
	$(BIN)/python tests/trt_stubs.py $(VENV)/trt-typings
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# pytest exits 5 when it collects no test: that is a failure for us too, with a message.
pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc

test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/dunet-demo --out demo

bench-cpu: $(STAMP)
	bash benchmarks/cpu.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
