# The two commands of the README: `make run` (the embedded default, end to end) and `make test`.
VENV ?= .venv
PYTHON ?= python3
CORES ?= all
# torch and torchvision first, pinned, so pip takes the builds this machine (and CI) has on disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Every direct dependency at its exact version: the same pins as envs/*.yaml (python envs/generate.py).
PINS ?= envs/pins.txt
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run test dry-run report figures clean venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(PINS)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -c $(PINS) --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c $(PINS) $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install --quiet -c $(PINS) -e '.[test]'
	touch $@

run: venv
	snakemake --cores $(CORES)

dry-run: venv
	snakemake --cores $(CORES) --dry-run

# Figures and summary tables from the cached metric and utility tables alone: never retrains or re-embeds.
FIGURE_RULES := figures_point figures_qualitative summary seeds figures_sweep ssl_figure_accuracy ssl_figure_qualitative ssl_agreement \
	ssl_summary figures
figures: venv
	snakemake --cores $(CORES) figures --forcerun $(FIGURE_RULES) --allowed-rules $(FIGURE_RULES)

report: venv
	snakemake --cores $(CORES) --report report.html

test: venv
	python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf results/* .snakemake
