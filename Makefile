# The two commands (README): `make run` and `make test`. Both set the machine
# up first (deploy/setup.sh: Debian packages, kernel headers, tracefs, venv)
# and are safe to run again.

VENV ?= $(CURDIR)/.venv
EBPFMON := $(VENV)/bin/ebpfmon
# test servers and tools the tests talk to
TEST_PACKAGES := procps util-linux socat netcat-openbsd iputils-ping openssh-client openssh-server prometheus-alertmanager rsyslog nats-server openssl systemd shellcheck vagrant gcc liburing-dev bpftool podman runc docker.io

# what bench/compare.py runs side by side with ebpfmon, and the plot
BENCH_PACKAGES := $(TEST_PACKAGES) gcc bpftrace auditd bpfcc-tools python3-matplotlib valgrind

.PHONY: setup setup-test run test test-unit doctor bench clean

setup:
	VENV=$(VENV) sh deploy/setup.sh

setup-test:
	VENV=$(VENV) PIP_EXTRAS='[test]' EXTRA_PACKAGES='$(TEST_PACKAGES)' sh deploy/setup.sh

run: setup
	$(EBPFMON) run

test: setup-test
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# the fast tier alone (tests/unit: no BPF programs, no daemon), in seconds
test-unit: setup-test
	$(VENV)/bin/pytest -m unit $(PYTEST_ARGS)

doctor: setup
	$(EBPFMON) doctor

# every benchmark (bench/all.py, ~7 min on a 2-core VM), results in bench/RESULTS.md; not part of the tests
bench:
	VENV=$(VENV) PIP_EXTRAS='[test]' EXTRA_PACKAGES='$(BENCH_PACKAGES)' sh deploy/setup.sh
	$(VENV)/bin/python bench/all.py

clean:
	rm -rf $(VENV) build *.egg-info
	find ebpfmon -name "*.so" -delete  # the C parts pip built in place (editable venv)

# ---- on a host: the service (see README, "Running it as a service") ----
PREFIX ?= /opt/ebpfmon
# systemd's unit directory: only a unit there is enabled and started (elsewhere: a staged install)
UNIT_DIR ?= /etc/systemd/system
CONFIG_DIR ?= /etc/ebpfmon

.PHONY: install uninstall

install:
	VENV=$(PREFIX)/venv PIP_MODE=install sh deploy/setup.sh
	install -d -m 0755 $(CONFIG_DIR) $(UNIT_DIR)/ebpfmon.service.d
	[ -e $(CONFIG_DIR)/config.yaml ] || install -m 0600 deploy/config.example.yaml $(CONFIG_DIR)/config.yaml
	sed -e 's#/opt/ebpfmon/venv#$(PREFIX)/venv#' -e 's#/etc/ebpfmon/config.yaml#$(CONFIG_DIR)/config.yaml#' \
		deploy/ebpfmon.service > $(UNIT_DIR)/ebpfmon.service
	install -m 0644 deploy/systemd/ebpfmon.service.d/limits.conf $(UNIT_DIR)/ebpfmon.service.d/limits.conf
	install -d -m 0755 $(CONFIG_DIR)/slurm
	for f in prolog.sh epilog.sh; do sed -e 's#/opt/ebpfmon/venv#$(PREFIX)/venv#' deploy/slurm/$$f > $(CONFIG_DIR)/slurm/$$f; \
		chmod 0755 $(CONFIG_DIR)/slurm/$$f; done
	if [ "$(UNIT_DIR)" != /etc/systemd/system ]; then echo "install: unit written to $(UNIT_DIR), not systemd's: not enabled"; \
	elif [ -d /run/systemd/system ]; then systemctl daemon-reload && systemctl enable --now ebpfmon; \
	else echo "install: systemd is not running here: unit installed, not started"; fi

uninstall:
	if [ "$(UNIT_DIR)" = /etc/systemd/system ] && [ -d /run/systemd/system ]; then systemctl disable --now ebpfmon || true; fi
	rm -f $(UNIT_DIR)/ebpfmon.service
	rm -rf $(UNIT_DIR)/ebpfmon.service.d $(PREFIX)/venv
	@echo "uninstall: $(CONFIG_DIR) and /var/lib/ebpfmon (quarantine records, spool, audit) are kept"
