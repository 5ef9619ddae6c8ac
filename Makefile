# pfleet developer entry points. Every target that needs the toolchain depends on
# `bootstrap` (scripts/bootstrap.sh: apt packages when missing, .venv, pip install -e).
SHELL := /bin/bash
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

VENV := .venv
PYTHON := $(VENV)/bin/python
RUFF := $(VENV)/bin/ruff
STATE := $(CURDIR)/.pfleet
# Extra arguments for pytest, e.g. make test PYTEST_ARGS='-k engines -x'
PYTEST_ARGS ?=

.PHONY: help bootstrap run test lint bench clean clean-all

help: ## list the targets
	@echo "usage: make TARGET"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "} {printf "  %-10s %s\n", $$1, $$2}'

bootstrap: ## install system packages (root, when missing) and the .venv
	@scripts/bootstrap.sh

run: bootstrap ## run the controller with a local agent (starts dockerd if none answers)
	@scripts/ensure-docker.sh
	@mkdir -p $(STATE)/state $(STATE)/storeBase
	PFLEET_STATE_DIR=$(STATE)/state \
	STOREBASE_MOUNT=$(STATE)/storeBase \
	STOREBASE=$(STATE)/storeBase \
	COMPUTE_VOLUME_TYPE=host \
	exec $(VENV)/bin/pfleet-controller --dev --local-agent

test: bootstrap ## ruff check + the whole test suite (real docker and podman engines)
	$(RUFF) check .
	$(PYTHON) -m pytest -p no:cacheprovider tests $(PYTEST_ARGS)

lint: bootstrap ## ruff check + ruff format --check
	$(RUFF) check .
	$(RUFF) format --check .

bench: bootstrap ## benchmarks (tests/bench, marker bench)
	@if [ ! -d tests/bench ]; then echo "no tests/bench yet"; exit 0; fi; \
	rc=0; $(PYTHON) -m pytest -p no:cacheprovider tests/bench -m bench -s $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc = 5 ]; then echo "no benchmarks collected"; rc=0; fi; \
	exit $$rc

clean: ## remove run state in .pfleet/ (keeps the test engines and their image cache)
	@if [ -d .pfleet ]; then \
		find .pfleet -mindepth 1 -maxdepth 1 ! -name images ! -name test-engine \
			-exec rm -rf {} +; \
	fi

clean-all: clean ## also remove the test engines' storage and the image cache
	@for l in .pfleet/test-engine/*/lock; do \
		[ -e "$$l" ] || continue; \
		flock -n "$$l" true || { echo "a test session is using $$(dirname $$l); not removing" >&2; exit 1; }; \
	done
	@awk -v p="$(STATE)/" 'index($$2, p) == 1 {print $$2}' /proc/mounts | sort -r | \
		while read -r m; do umount "$$m" || umount -l "$$m"; done
	@h=$$(printf %s "$(STATE)/test-engine/podman/root" | sha256sum | cut -c1-12); \
		rm -rf "/run/pfleet-test/$$h"
	rm -rf .pfleet
