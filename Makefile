# The two commands (README): `make run` and `make test`. Both set the machine
# up first (deploy/setup.sh: Debian packages, kernel headers, tracefs, venv)
# and are safe to run again.

VENV ?= $(CURDIR)/.venv
EBPFMON := $(VENV)/bin/ebpfmon
# test servers and tools the tests talk to
TEST_PACKAGES := procps util-linux openssh-client openssh-server prometheus-alertmanager systemd

.PHONY: setup setup-test run test doctor clean

setup:
	VENV=$(VENV) sh deploy/setup.sh

setup-test:
	VENV=$(VENV) PIP_EXTRAS='[test]' EXTRA_PACKAGES='$(TEST_PACKAGES)' sh deploy/setup.sh

run: setup
	$(EBPFMON) run

test: setup-test
	$(VENV)/bin/pytest $(PYTEST_ARGS)

doctor: setup
	$(EBPFMON) doctor

clean:
	rm -rf $(VENV) build *.egg-info
