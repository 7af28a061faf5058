#!/bin/sh
# Installs what ebpfmon needs on a Debian or Ubuntu host, as root, and makes
# the venv. Safe to run again: it only does what is missing.
#
#   deploy/setup.sh            system packages, kernel headers, tracefs, venv
#   VENV=/opt/ebpfmon/venv deploy/setup.sh
#
# Extra Debian packages (test servers...) can be asked for in EXTRA_PACKAGES.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PIP_EXTRAS=${PIP_EXTRAS:-}
# editable: the venv runs the checkout (development); install: a copy (make install)
PIP_MODE=${PIP_MODE:-editable}
# gcc, libc6-dev and python3-dev build ebpfmon's C parts (the decoder's and the ring buffer reader's)
PACKAGES="python3 python3-venv python3-pip python3-dev gcc libc6-dev python3-bpfcc iproute2 ${EXTRA_PACKAGES:-}"

say() { echo "setup: $*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (it installs Debian packages and kernel headers)." >&2
    exit 1
fi

# dpkg-query prints nothing useful for unknown packages: treat as missing
missing=""
for pkg in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed"; then
        missing="$missing $pkg"
    fi
done
apt_updated=""
apt_install() {
    if [ -z "$apt_updated" ]; then
        apt-get update -qq
        apt_updated=1
    fi
    # servers installed for the tests (sshd, alertmanager) must not start as
    # host services: the tests start their own, on loopback and in netns
    guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        guard=1
    fi
    status=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" || status=$?
    if [ -n "$guard" ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    return $status
}
if [ -n "$missing" ]; then
    say "installing Debian packages:$missing"
    # word splitting wanted: one argument per package
    # shellcheck disable=SC2086
    apt_install $missing
fi

# bcc compiles probes against a kernel header tree. The probes read no kernel
# structs (docs/architecture.md), so when the distribution has no headers for
# the running kernel, another version's headers serve: link them and say so.
release=$(uname -r)
modules=/lib/modules/$release
if [ ! -d "$modules/build/include" ]; then
    if apt_install "linux-headers-$release" >/dev/null 2>&1; then
        say "installed linux-headers-$release"
    else
        arch=$(dpkg --print-architecture)
        apt_install "linux-headers-$arch" >/dev/null 2>&1 || apt_install linux-headers-generic
        other=""
        for build in /lib/modules/*/build; do
            case "$build" in
                "/lib/modules/$release/build") ;;
                *) [ -d "$build" ] && other=$(printf '%s\n%s\n' "$other" "$build" | sort -V | tail -n 1) ;;
            esac
        done
        if [ -z "$other" ]; then
            echo "setup: no kernel headers could be installed for $release, nor any other version." >&2
            exit 1
        fi
        other=$(dirname "$other")
        mkdir -p "$modules"
        ln -sfn "$(readlink -f "$other/build")" "$modules/build"
        if [ -e "$other/source" ]; then
            ln -sfn "$(readlink -f "$other/source")" "$modules/source"
        fi
        say "no headers packaged for $release: linked $modules/build -> $(readlink -f "$other/build")"
        say "(fallback: ebpfmon's probes touch no kernel structs; 'ebpfmon doctor' shows this as a warning)"
    fi
fi

# tracepoints are found through tracefs
if [ ! -d /sys/kernel/tracing/events ]; then
    mount -t tracefs tracefs /sys/kernel/tracing
    say "mounted tracefs at /sys/kernel/tracing"
fi

# the venv sees Debian's bcc through the system site packages; PyPI's "bcc"
# is an unrelated project and is never installed
if [ ! -x "$VENV/bin/python" ]; then
    say "creating venv $VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.ebpfmon-installed"
# reinstalled when the project file or the C it builds changes (an editable venv runs the
# checkout's Python but a built copy of its C)
want=$(find "$ROOT/ebpfmon" -name '*.c' | sort | xargs cat "$ROOT/pyproject.toml" "$ROOT/probes/events.h" | sha256sum | cut -d' ' -f1)"$PIP_EXTRAS$PIP_MODE"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing ebpfmon into $VENV"
    if [ "$PIP_MODE" = install ]; then
        "$VENV/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$ROOT"
        "$VENV/bin/pip" install -q --disable-pip-version-check "$ROOT$PIP_EXTRAS"
    else
        "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT$PIP_EXTRAS"
    fi
    echo "$want" > "$stamp"
fi
say "ready ($VENV/bin/ebpfmon)"
