# dermaclass: `make app` and `make test` work on a fresh machine with Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DATA   ?= ../shared/data/ham10000

.PHONY: install app test bench clean

# The venv is (re)built when pyproject.toml changes; torch comes from this machine's disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -e '.[test,bench,openvino]'
	touch $@

install: $(STAMP)

## The main job: the Gradio app on the bundled model (http://127.0.0.1:7860).
app: $(STAMP)
	$(BIN)/python app.py

## The whole test suite (CI runs exactly this): lint, import order and format first, then pytest.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

## The benchmarks (most of a day on 2 cores; `make bench QUICK=--quick` for a smoke run; benchmarks/README.md).
## Each prints a table and writes benchmarks/results/*.json; none is a test.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_decode_cache.py $(QUICK)
	$(BIN)/python benchmarks/bench_inference.py $(QUICK)
	$(BIN)/python benchmarks/bench_int8.py $(QUICK)
	$(BIN)/python benchmarks/bench_refer.py $(QUICK)
	$(BIN)/python benchmarks/bench_decision.py $(QUICK)
	$(BIN)/python benchmarks/bench_throughput.py $(QUICK)
	$(BIN)/python benchmarks/bench_app.py $(QUICK)
	$(BIN)/python benchmarks/bench_recipes.py $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever lr $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever colour $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever ema $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever regularise $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever smoothing $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever resize $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever backbone $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever loss $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever imbalance $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever lr-rule $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever budget $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever augment $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever mix $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever sam $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever histo $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever average $(QUICK)
	$(BIN)/python benchmarks/bench_levers.py --lever average-in-stage $(QUICK)
	$(BIN)/python benchmarks/bench_prior.py $(QUICK)
	$(BIN)/python benchmarks/bench_tta.py $(QUICK)
	$(BIN)/python benchmarks/bench_precision.py $(QUICK)
	$(BIN)/python benchmarks/bench_ensemble.py $(QUICK)
	test -n "$(QUICK)" || $(BIN)/python benchmarks/bench_ph2.py
	$(BIN)/python benchmarks/bench_tune.py $(QUICK)
	test -n "$(QUICK)" || $(BIN)/python benchmarks/tables.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
