# bdserver: `make demo` and `make test` work on a fresh Debian 12 machine as root.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
# Expensive fixtures (debootstrap rootfs, lab kernel) are built once and shared.
export BDSERVER_FIXTURES ?= $(CURDIR)/.cache/fixtures

.PHONY: setup packages venv proto demo test test-host test-lab lab lab-kernel bench clean

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

bench: setup
	$(PY) bench/convert.py
	$(PY) bench/read.py

clean:
	rm -rf $(VENV) .cache
