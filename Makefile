# bdserver: `make demo` and `make test` work on a fresh Debian 12 machine as root.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
# Expensive fixtures (debootstrap rootfs, lab kernel) are built once and shared.
export BDSERVER_FIXTURES ?= $(CURDIR)/.cache/fixtures

.PHONY: setup packages venv proto demo test test-host test-lab lab lab-kernel bench fuzz clean

setup: packages venv proto ## idempotent: Debian packages + .venv with the CLI at .venv/bin/bdserver

packages:
	kernel-setup/install-packages

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lab]'
	touch $@

venv: $(VENV)/.installed

# containerd's gRPC API, generated from the protos of Debian's golang-github-containerd-containerd-dev
# into bdserver/runtime/containerd/_gen (git-ignored; also generated on first use if missing).
proto: venv
	$(PY) -m bdserver.runtime.containerd.api >/dev/null

lab-kernel: setup
	kernel-setup/lab-kernel

demo: setup
	scripts/demo

test: setup lab-kernel
	scripts/test-all

test-host: setup
	$(PYTEST) -m 'not lab' tests

test-lab: setup lab-kernel
	vagrant/lab -- $(PYTEST) -m lab tests

lab: setup lab-kernel
	vagrant/lab

# Coverage-guided fuzzing (atheris) of every parser of untrusted bytes, FUZZ_SECONDS per target; new
# corpus entries go to .cache/fuzz/<target>, crashes to .cache/fuzz/crash-<target>-*. `make test` runs
# each target briefly (tests/fuzz/test_fuzz.py).
FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?= tar chunkindex erofs manifest cdb
fuzz: setup
	@mkdir -p .cache/fuzz
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p .cache/fuzz/$$t; \
	  echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
	  $(PY) -m tests.fuzz.run $$t -max_total_time=$(FUZZ_SECONDS) -corpus_dir=.cache/fuzz/$$t \
	    -artifact_prefix=.cache/fuzz/crash-$$t- -print_final_stats=1 || exit 1; \
	done

bench: setup
	$(PY) bench/convert.py
	$(PY) bench/read.py

clean:
	rm -rf $(VENV) .cache
