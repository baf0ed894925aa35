# The README's two commands:
#   make run    set up a virtualenv and run the daemon in the foreground on
#               etc/memdefragd.yaml (CONFIG=FILE for another), until Ctrl-C
#   (make demo  the same setup, then `memdefragd demo`: what it buys, in under a minute)
#   make test   set up and run the whole test suite (ruff, mypy, unit, real-kernel, end-to-end),
#               then the real-kernel tests again in QEMU guests of Debian's 5.10, 6.1 and 6.12
#               (about 35 minutes more; `make check` is everything but the guests)
# Both install what they need: Debian packages when run as root (or with sudo), then a
# virtualenv in .venv with the package and its dependencies.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= etc/memdefragd.yaml
PYTEST_ARGS ?=
APT_PACKAGES := python3-venv python3-dev gcc pkg-config libsystemd-dev util-linux \
	systemd-container debootstrap podman runc slirp4netns
# (systemd-container and debootstrap: the end-to-end test of the systemd unit boots a
# container with systemd-nspawn, in tests/deploy/; podman, runc and slirp4netns: the
# container image test builds the Dockerfile and runs the image, tests/deploy/podman.py)

.PHONY: run demo test check lint typecheck setup system-deps promtool clean install uninstall vm-deps vm-fetch vm-test

run: setup
	$(BIN)/memdefragd run --config $(CONFIG)

demo: setup
	$(BIN)/memdefragd demo

test: check vm-test

check: setup lint typecheck promtool
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy --strict over the package ([tool.mypy] in pyproject.toml), which includes the proof
# that both backends satisfy the backend protocol.
typecheck: setup
	$(BIN)/mypy

# etc/grafana/memdefragd.json is generated: edit tools/dashboard.py, then this.
.PHONY: dashboard
dashboard: setup
	$(BIN)/python -m tools.dashboard

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

# promtool and the Prometheus server (for the dashboard and alert-rule tests, and the real
# server of tests/deploy/test_prometheus.py), and Alertmanager (that test sends its alerts
# through it): taken out of Debian's `prometheus` and `prometheus-alertmanager` .debs
# (`apt-get download` + `dpkg-deb`), never installed (their postinst would start servers).
# Debian's Alertmanager reads its templates from /usr/share/prometheus/alertmanager/: they
# go to $(PROMTOOL_DIR)/share/, and the test lays them over /usr/share in a mount namespace
# of Alertmanager's own. Each file is skipped when already there; on failure a note, and
# the tests that need it skip (or fail under MEMDEFRAGD_REQUIRE_KERNEL=1). PROMTOOL,
# PROMETHEUS and ALERTMANAGER=path in the environment override them in the tests.
PROMTOOL_DIR := .cache/promtool
# package:path under usr/ in its .deb; bin/NAME goes to $(PROMTOOL_DIR)/NAME, the rest to
# $(PROMTOOL_DIR)/path
PROMTOOL_FILES := prometheus:bin/promtool prometheus:bin/prometheus \
	prometheus-alertmanager:bin/prometheus-alertmanager \
	prometheus-alertmanager:share/prometheus/alertmanager

promtool:
	@dest() { case $$1 in bin/*) echo $(PROMTOOL_DIR)/$${1#bin/};; *) echo $(PROMTOOL_DIR)/$$1;; esac; }; \
	missing=; for pf in $(PROMTOOL_FILES); do \
	  [ -e "$$(dest $${pf#*:})" ] || missing="$$missing $$pf"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	skip="its tests will skip (fail under MEMDEFRAGD_REQUIRE_KERNEL=1)"; \
	if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then \
	  echo "note: no apt-get/dpkg-deb:$$missing not fetched: $$skip"; exit 0; fi; \
	dl=$(PROMTOOL_DIR)/download; rm -rf $$dl; mkdir -p $$dl; chmod 755 .cache $(PROMTOOL_DIR) $$dl; \
	fetch() { (cd $$dl && apt-get download -q $$1) >>$$dl/apt.log 2>&1; }; \
	updated=; kept=; \
	for pkg in $$(for pf in $$missing; do echo $${pf%%:*}; done | sort -u); do \
	  if ! fetch $$pkg && [ "$$(id -u)" = 0 ] && [ -z "$$updated" ]; then \
	    updated=1; apt-get update -q >/dev/null 2>&1; fetch $$pkg; fi; done; \
	for pf in $$missing; do pkg=$${pf%%:*}; f=$${pf#*:}; to=$$(dest $$f); \
	  deb=$$(ls $$dl/$${pkg}_*.deb 2>/dev/null | head -n1); \
	  if [ -z "$$deb" ]; then kept=1; \
	    echo "note: apt-get download $$pkg failed (see $$dl/apt.log): usr/$$f not fetched: $$skip"; \
	  elif dpkg-deb --fsys-tarfile $$deb | tar -x -C $$dl ./usr/$$f \
	    && mkdir -p $$(dirname $$to) && chmod 755 $$(dirname $$to) && mv $$dl/usr/$$f $$to; then \
	    case $$f in bin/*) echo "$${f#bin/}: $$($$to --version 2>&1 | head -n1)";; esac; \
	  else kept=1; echo "note: could not extract usr/$$f from $$deb: $$skip"; fi; \
	done; \
	if [ -z "$$kept" ]; then rm -rf $$dl; fi

# ---------------------------------------------------------------- kernels in guests
# make vm-test [KERNELS="6.1 6.12"] [VM_TESTS=tests/kernel/...] [VM_ARGS=...]: the real-kernel
# tests in QEMU guests (software emulation) of Debian's own kernels, the host root read-only
# over 9p (tests/vm/, README "Kernels"). By default the matrix of tests/vm/harness.py
# (5.10, 6.1, 6.12, each with its own selection). The kernels and busybox-static come from
# apt (`apt-get download`, checked against the SHA256 that apt's signed index gives; 5.10
# through a private apt configuration for Debian 11 in the cache) into $(VM_CACHE), outside
# the checkout; `make vm-fetch` only downloads and builds the initramfs.
VM_APT_PACKAGES := qemu-system-x86
KERNELS ?=
VM_TESTS ?=
VM_CACHE ?= /var/cache/memdefragd-vm
VM_ARGS ?=

vm-deps:
	@$(MAKE) --no-print-directory system-deps APT_PACKAGES='$(VM_APT_PACKAGES)'

vm-fetch: setup vm-deps
	$(BIN)/python -m tests.vm fetch --cache $(VM_CACHE) $(KERNELS)

vm-test: vm-fetch
	$(BIN)/python -m tests.vm run --cache $(VM_CACHE) $(VM_ARGS) $(KERNELS) $(if $(VM_TESTS),-- $(VM_TESTS))

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info

# ---------------------------------------------------------------- install / uninstall
# make install [PREFIX=/usr/local] [DESTDIR=/staging/root]: the package and its pinned
# dependencies (constraints.txt) in a virtualenv of its own, $(PKGLIBDIR), run by the
# system's Python $(INSTALL_PYTHON) (not a pyenv or the dev .venv: the service must not
# depend on a user's home); the command as $(BINDIR)/memdefragd; the systemd unit, its
# paths set to these; /etc/memdefragd/memdefragd.yaml from etc/memdefragd.yaml unless that
# file exists (an existing one is never replaced); the Grafana dashboard, its provisioning
# file, the alert rules and the example config under $(DATADIR); the README in $(DOCDIR).
# It builds from a clean copy of the sources (no stale build/ of an earlier in-tree build).
# pip fetches the dependencies from the package index (or its cache). DESTDIR stages the
# tree for packaging: nothing in it refers to DESTDIR. Run as root, it also runs
# `systemctl daemon-reload` when systemd is running. `make uninstall` (same variables)
# stops and disables the service and removes all of it, except a config you changed.
PREFIX ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc
BINDIR ?= $(PREFIX)/bin
PKGLIBDIR ?= $(PREFIX)/lib/memdefragd
DATADIR ?= $(PREFIX)/share/memdefragd
DOCDIR ?= $(PREFIX)/share/doc/memdefragd
UNITDIR ?= $(PREFIX)/lib/systemd/system
INSTALL_PYTHON ?= /usr/bin/python3
INSTALL_EXTRAS ?= systemd
INSTALL_APT_PACKAGES := python3-venv python3-dev gcc pkg-config libsystemd-dev
# where the unit (systemd/memdefragd.service) expects things, replaced on install
UNIT_BIN := /usr/local/bin/memdefragd
UNIT_DOC := /usr/local/share/doc/memdefragd
UNIT_ETC := /etc/memdefragd

install:
	@$(MAKE) --no-print-directory system-deps APT_PACKAGES='$(INSTALL_APT_PACKAGES)'
	@set -eu; \
	case "$(PKGLIBDIR)" in /*/memdefragd) ;; *) echo "PKGLIBDIR must be an absolute path ending in /memdefragd, not '$(PKGLIBDIR)'" >&2; exit 2;; esac; \
	for d in "$(PREFIX)" "$(BINDIR)" "$(DATADIR)" "$(DOCDIR)" "$(UNITDIR)" "$(SYSCONFDIR)"; do \
	  case "$$d" in /*) ;; *) echo "install paths must be absolute, not '$$d'" >&2; exit 2;; esac; done; \
	$(INSTALL_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "$(INSTALL_PYTHON) is older than Python 3.11 (or missing): set INSTALL_PYTHON" >&2; exit 2; }; \
	root='$(DESTDIR)'; lib="$$root$(PKGLIBDIR)"; new="$$lib.new"; \
	rm -rf "$$new"; \
	echo "install: virtualenv $(PKGLIBDIR) on $$($(INSTALL_PYTHON) -c 'import sys; print(sys.executable, sys.version.split()[0])')"; \
	$(INSTALL_PYTHON) -m venv "$$new"; \
	src=$$(mktemp -d); trap 'rm -rf "$$src"' EXIT; \
	cp -R pyproject.toml README.md memdefragd "$$src/"; \
	find "$$src" -name __pycache__ -prune -exec rm -rf {} +; \
	pip="$$new/bin/python -m pip --quiet --disable-pip-version-check --no-input"; \
	if [ -n '$(INSTALL_EXTRAS)' ] && $$pip install --constraint constraints.txt "$$src[$(INSTALL_EXTRAS)]" 2>"$$src/pip.log"; then :; \
	elif [ -n '$(INSTALL_EXTRAS)' ]; then \
	  echo "note: extras [$(INSTALL_EXTRAS)] did not install (systemd-python needs libsystemd-dev, pkg-config, gcc and python3-dev): installing without; memdefragd then logs plain lines to stderr, which the journal keeps all the same"; \
	  $$pip install --constraint constraints.txt "$$src"; \
	else $$pip install --constraint constraints.txt "$$src"; fi; \
	$$pip uninstall --yes pip setuptools; \
	find "$$new/bin" -maxdepth 1 -type f -delete; \
	"$$new/bin/python" -m compileall -q -f -j 0 -s "$$new" -p "$(PKGLIBDIR)" "$$new/lib" >/dev/null; \
	sed -i '/^command = /d' "$$new/pyvenv.cfg"; \
	printf '%s\n' '#!$(PKGLIBDIR)/bin/python3 -I' '# memdefragd, installed by `make install` (its own virtualenv, isolated mode)' \
	  'import sys' '' 'from memdefragd.cli import main' '' 'sys.exit(main())' >"$$new/bin/memdefragd"; \
	chmod 0755 "$$new/bin/memdefragd"; \
	if grep -rlF "$$new" "$$new" >/dev/null 2>&1; then \
	  echo "install: these files still name the staging path $$new:" >&2; grep -rlF "$$new" "$$new" | head >&2; exit 1; fi; \
	rm -rf "$$lib"; mv "$$new" "$$lib"; \
	install -d -m 0755 "$$root$(BINDIR)" "$$root$(UNITDIR)" "$$root$(DATADIR)/grafana" \
	  "$$root$(DATADIR)/prometheus" "$$root$(DOCDIR)" "$$root$(SYSCONFDIR)/memdefragd"; \
	ln -sfr "$$lib/bin/memdefragd" "$$root$(BINDIR)/memdefragd"; \
	sed -e 's|$(UNIT_BIN)|$(BINDIR)/memdefragd|g' -e 's|$(UNIT_DOC)|$(DOCDIR)|g' \
	  -e 's|$(UNIT_ETC)/|$(SYSCONFDIR)/memdefragd/|g' systemd/memdefragd.service >"$$root$(UNITDIR)/memdefragd.service"; \
	chmod 0644 "$$root$(UNITDIR)/memdefragd.service"; \
	install -m 0644 etc/grafana/memdefragd.json etc/grafana/provisioning.yaml "$$root$(DATADIR)/grafana/"; \
	install -m 0644 etc/prometheus/memdefragd.rules.yml "$$root$(DATADIR)/prometheus/"; \
	install -m 0644 etc/memdefragd.yaml "$$root$(DATADIR)/memdefragd.yaml.example"; \
	install -m 0644 README.md "$$root$(DOCDIR)/"; \
	conf="$$root$(SYSCONFDIR)/memdefragd/memdefragd.yaml"; \
	if [ -e "$$conf" ] || [ -L "$$conf" ]; then \
	  echo "install: kept the existing $(SYSCONFDIR)/memdefragd/memdefragd.yaml (the new example is $(DATADIR)/memdefragd.yaml.example)"; \
	else install -m 0644 etc/memdefragd.yaml "$$conf"; fi; \
	if [ -z "$$root" ] && [ -d /run/systemd/system ] && [ "$$(id -u)" = 0 ]; then \
	  systemctl daemon-reload; \
	  if systemctl is-active --quiet memdefragd.service; then \
	    echo "install: memdefragd is running the previous version: systemctl restart memdefragd"; fi; fi; \
	echo "install: done; now: systemctl enable --now memdefragd"

uninstall:
	@set -eu; \
	case "$(PKGLIBDIR)" in /*/memdefragd) ;; *) echo "PKGLIBDIR must be an absolute path ending in /memdefragd, not '$(PKGLIBDIR)'" >&2; exit 2;; esac; \
	root='$(DESTDIR)'; \
	if [ -z "$$root" ] && [ -d /run/systemd/system ] && [ "$$(id -u)" = 0 ]; then \
	  systemctl disable --now memdefragd.service 2>/dev/null || true; fi; \
	conf="$$root$(SYSCONFDIR)/memdefragd/memdefragd.yaml"; \
	if [ -f "$$conf" ] && cmp -s "$$conf" "$$root$(DATADIR)/memdefragd.yaml.example"; then rm -f "$$conf"; \
	elif [ -e "$$conf" ]; then echo "uninstall: kept $(SYSCONFDIR)/memdefragd/memdefragd.yaml: it differs from the example installed (remove it yourself)"; fi; \
	rmdir "$$root$(SYSCONFDIR)/memdefragd" 2>/dev/null || true; \
	rm -f "$$root$(UNITDIR)/memdefragd.service"; \
	if [ -L "$$root$(BINDIR)/memdefragd" ]; then rm -f "$$root$(BINDIR)/memdefragd"; fi; \
	rm -rf "$$root$(PKGLIBDIR)" "$$root$(PKGLIBDIR).new" "$$root$(DATADIR)" "$$root$(DOCDIR)"; \
	if [ -z "$$root" ] && [ -d /run/systemd/system ] && [ "$$(id -u)" = 0 ]; then systemctl daemon-reload; fi; \
	echo "uninstall: done"
