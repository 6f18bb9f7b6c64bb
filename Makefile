# tdmpc_jax: `make install`, `make test`, `make distill`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export MUJOCO_GL ?= disable
export XLA_FLAGS ?= --xla_force_host_platform_device_count=2

.PHONY: install test distill clean

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'

$(BIN)/python:
	$(PY) -m venv $(VENV)

test:
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) build *.egg-info
