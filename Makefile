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

.PHONY: install test distill study study-report study-diagnose study-novelty bench clean

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'

$(BIN)/python:
	$(PY) -m venv $(VENV)

# two pytest workers (pytest-xdist), one test file per worker at a time: module fixtures are built once,
# and the 2-core CI machine runs the suite in ~31 min (README, Development; TEST_WORKERS=0: one process, slower). Files are
# handed out longest first (tests/conftest.py: FILE_SECONDS; --no-loadscope-reorder keeps that order);
# the log ends with the 25 slowest tests, so that a CI run shows where its time goes
TEST_WORKERS ?= 2
test:
	$(BIN)/python -m pytest tests --durations=25 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

distill:
	$(BIN)/python experiments/pipeline.py $(DISTILL_FLAGS)

# the MT30 distillation study (resumable: rerun to continue; STAGE=2 for sizes/control/ablation, STAGE=3 for
# make distill's planner-objective recipe, STAGE=4 on the teacher's MPPI data, STAGE=5 on one DAgger round,
# STAGE=6 on a second)
STAGE ?= 1
# units side by side (JOBS processes) and updates per jitted call (BLOCK): for a GPU machine, e.g. JOBS=4 BLOCK=50
JOBS ?= 1
BLOCK ?= 1
study:
	$(BIN)/python experiments/study.py --stage=$(STAGE) --jobs=$(JOBS) --block=$(BLOCK)
	$(BIN)/python experiments/study.py --report

study-report:
	$(BIN)/python experiments/study.py --report

# what limits the students: data coverage, reward and policy fit on the study's dataset (docs/results/study/diagnosis.*)
study-diagnose:
	$(BIN)/python experiments/study.py --diagnose

# how new the DAgger rounds' states are to the data they join (docs/results/study/novelty.*; seconds)
study-novelty:
	$(BIN)/python experiments/study.py --novelty

# train_step.py prints the update's ms, XLA FLOPs, the same-run matmul peak and both roofline multiples
# (one core; a GPU line, `GPU: pending` without one) with the plain update as same-run baseline.
bench:
	$(BIN)/python benchmarks/plan_latency.py --cores=1
	$(BIN)/python benchmarks/train_step.py --cores=1
	$(BIN)/python benchmarks/env_steps.py
	$(BIN)/python benchmarks/runtime_latency.py --cores=1

clean:
	rm -rf $(VENV) build *.egg-info
