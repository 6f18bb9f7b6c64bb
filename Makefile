# tdmpc_jax: `make install`, `make test`, `make distill`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export MUJOCO_GL ?= disable

# make distill [TEACHER=ckpt.pt DATA=dataset_dir SIZE=1 STEPS=1000000 EPISODES=10 OUT=runs/distill]
TEACHER ?=
DATA ?=
SIZE ?=
STEPS ?=
EPISODES ?=
OUT ?=
DISTILL_FLAGS = $(if $(TEACHER),--teacher=$(TEACHER)) $(if $(DATA),--data=$(DATA)) \
	$(if $(SIZE),--student_size=$(SIZE)) $(if $(STEPS),--steps=$(STEPS)) \
	$(if $(EPISODES),--episodes=$(EPISODES)) $(if $(OUT),--output=$(OUT))

.PHONY: install test distill bench clean

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'

$(BIN)/python:
	$(PY) -m venv $(VENV)

test:
	$(BIN)/python -m pytest tests

distill:
	$(BIN)/python experiments/pipeline.py $(DISTILL_FLAGS)

bench:
	$(BIN)/python benchmarks/plan_latency.py --cores=1
	$(BIN)/python benchmarks/train_step.py --cores=1
	$(BIN)/python benchmarks/env_steps.py

clean:
	rm -rf $(VENV) build *.egg-info
