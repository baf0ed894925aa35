# The README's two commands:
#   make run    set up a virtualenv and run the daemon in the foreground on
#               etc/memdefragd.yaml (CONFIG=FILE for another), until Ctrl-C
#   make test   set up and run the whole test suite (ruff, unit, real-kernel, end-to-end)
# Both install what they need: Debian packages when run as root (or with sudo), then a
# virtualenv in .venv with the package and its dependencies.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= etc/memdefragd.yaml
PYTEST_ARGS ?=
APT_PACKAGES := python3-venv python3-dev gcc pkg-config libsystemd-dev util-linux

.PHONY: run test lint setup system-deps promtool clean

run: setup
	$(BIN)/memdefragd run --config $(CONFIG)

test: setup lint promtool
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@$(BIN)/python -m pip install --quiet -e '.[test,systemd]' \
	  || echo "note: systemd-python (optional) did not build: it needs libsystemd-dev and pkg-config; memdefragd logs to stderr without it"
	touch $@

# Debian packages: installed only when missing, and only where we may (root or sudo -n).
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ] || ! command -v apt-get >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "note: not root, cannot install: $$missing"; exit 0; fi; \
	echo "installing Debian packages: $$missing"; \
	$$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q $$missing

# promtool, for the dashboard and alert-rule tests: taken out of Debian's `prometheus` .deb
# (`apt-get download` + `dpkg-deb`), never installed (its postinst would start a server).
# Skipped when already there; on failure a note, and those tests skip (or fail under
# MEMDEFRAGD_REQUIRE_KERNEL=1). PROMTOOL=path in the environment overrides it in the tests.
PROMTOOL_DIR := .cache/promtool

promtool:
	@if [ -x $(PROMTOOL_DIR)/promtool ]; then exit 0; fi; \
	dl=$(PROMTOOL_DIR)/download; rm -rf $$dl; mkdir -p $$dl; chmod 755 .cache $(PROMTOOL_DIR) $$dl; \
	fetch() { (cd $$dl && apt-get download -q prometheus) >$$dl/apt.log 2>&1; }; \
	if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then \
	  echo "note: no apt-get/dpkg-deb: promtool not fetched: its tests will skip (fail under MEMDEFRAGD_REQUIRE_KERNEL=1)"; exit 0; fi; \
	if ! fetch && [ "$$(id -u)" = 0 ]; then apt-get update -q >/dev/null 2>&1; fetch; fi; \
	deb=$$(ls $$dl/prometheus_*.deb 2>/dev/null | head -n1); \
	if [ -z "$$deb" ]; then \
	  echo "note: apt-get download prometheus failed (see $$dl/apt.log): promtool not fetched: its tests will skip (fail under MEMDEFRAGD_REQUIRE_KERNEL=1)"; \
	  exit 0; fi; \
	if dpkg-deb --fsys-tarfile $$deb | tar -x -C $$dl ./usr/bin/promtool \
	  && mv $$dl/usr/bin/promtool $(PROMTOOL_DIR)/promtool; then \
	  rm -rf $$dl; echo "promtool: $$($(PROMTOOL_DIR)/promtool --version 2>&1 | head -n1)"; \
	else echo "note: could not extract usr/bin/promtool from $$deb: its tests will skip (fail under MEMDEFRAGD_REQUIRE_KERNEL=1)"; fi

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info
