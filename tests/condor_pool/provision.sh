#!/usr/bin/env bash
# Build (once) a Debian trixie root holding HTCondor, for a personal pool used by the tests.
#
# Bookworm ships no HTCondor and the PyPI wheel has no daemons, so the daemons come from trixie's
# `minicondor` inside a debootstrap root.  The root lives at a fixed path outside any clone so it
# is built once per machine; a marker written last means a half-built root is rebuilt.
#
# Usage: provision.sh [ROOT]   (default: $DAGTRAIN_CONDOR_ROOT or /var/lib/dagtrain/condor-root)
# Exit codes: 0 ready, 2 not root, 3 no debootstrap, 4 no mirror, 5 build failed, 6 busy root.
set -euo pipefail

ROOT="${1:-${DAGTRAIN_CONDOR_ROOT:-/var/lib/dagtrain/condor-root}}"
SUITE=trixie
JOB_USER=condorjob
MARKER="$ROOT/.dagtrain-provisioned"
# Bump when the debootstrap step changes, so existing roots are rebuilt.
ROOT_VERSION="1 $SUITE minicondor python3 python3-cffi-backend"
# Added after the root's first version: debootstrap includes them in a new root, and
# install_extra_packages adds them to an existing one without a rebuild.
EXTRA_PACKAGES=(openssh-server)

die() {
    local code=$1
    shift
    echo "provision.sh: $*" >&2
    exit "$code"
}

# The Debian mirror this machine already uses (first non-security source); never hard-coded.
find_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -e $f ]] || continue
        awk '
            /^[[:space:]]*$/ { if (uri != "" && suites !~ /-security/) { print uri; exit }
                               uri = ""; suites = ""; next }
            tolower($1) == "uris:" { uri = $2 }
            tolower($1) == "suites:" { $1 = ""; suites = $0 }
            END { if (uri != "" && suites !~ /-security/) print uri }
        ' "$f" | head -n1
    done
    if [[ -e /etc/apt/sources.list ]]; then
        awk '$1 == "deb" && $0 !~ /-security/ {
                 for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
            /etc/apt/sources.list
    fi
}

# Refuse to delete a root that still has something mounted in it (e.g. a bind of the venv).
assert_unmounted() {
    local dir=$1
    if awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { found = 1 } END { exit !found }' \
        /proc/self/mountinfo; then
        die 6 "$dir has mounts (a pool is running?); stop it before rebuilding"
    fi
}

build_root() {
    command -v debootstrap >/dev/null || {
        echo "provision.sh: installing debootstrap" >&2
        { apt-get update && apt-get install -y debootstrap; } >&2 ||
            die 3 "debootstrap is missing and apt-get could not install it"
    }
    local mirror
    mirror=$(find_mirror | head -n1)
    [[ -n $mirror ]] || die 4 "no Debian mirror found in /etc/apt/sources.list{,.d}"

    local partial="$ROOT.partial"
    assert_unmounted "$partial"
    assert_unmounted "$ROOT"
    rm -rf --one-file-system "$partial" "$ROOT"
    mkdir -p "$(dirname "$ROOT")"
    echo "provision.sh: debootstrap $SUITE from $mirror into $partial" >&2
    # debootstrap resolves no virtual packages: python3-cryptography (needed by condor) depends
    # on python3-cffi-backend-api-*, which only python3-cffi-backend provides.
    local include
    include=$(IFS=,; echo "minicondor,python3,python3-cffi-backend,${EXTRA_PACKAGES[*]}")
    debootstrap --variant=minbase --include="$include" \
        "$SUITE" "$partial" "$mirror" >&2 ||
        die 5 "debootstrap failed (see $partial/debootstrap/debootstrap.log)"
    # dpkg leaves the package's conffiles as *.dpkg-new in a debootstrap root.
    local new
    while IFS= read -r -d '' new; do
        mv -f "$new" "${new%.dpkg-new}"
    done < <(find "$partial/etc/condor" -name '*.dpkg-new' -print0)
    mv "$partial" "$ROOT"
}

# Installs the EXTRA_PACKAGES a root lacks (roots built before they were added); no-op otherwise.
install_extra_packages() {
    local missing=() pkg
    for pkg in "${EXTRA_PACKAGES[@]}"; do
        chroot "$ROOT" dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' ||
            missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    echo "provision.sh: installing ${missing[*]} into $ROOT" >&2
    # No service may start inside the root (sshd is started by the tests, in the pool's namespace).
    printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
    chmod 755 "$ROOT/usr/sbin/policy-rc.d"
    {
        chroot "$ROOT" apt-get update &&
            chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y --no-install-recommends "${missing[@]}"
    } >&2 || die 5 "installing ${missing[*]} into $ROOT failed"
    rm -f "$ROOT/usr/sbin/policy-rc.d"
}

# $1: the job user's home as seen inside the root.
write_personal_config() {
    local home=$1
    mkdir -p "$ROOT$home"/condor/{log,spool,execute,lock,run}
    cat >"$ROOT$home/condor_config" <<EOF
# Personal pool for the dagtrain tests (written by tests/condor_pool/provision.sh).
include : /etc/condor/condor_config
# This file alone defines the pool: the package's config.d (minicondor) expects daemons running
# as user condor with required authentication, which an unprivileged personal pool cannot meet.
LOCAL_CONFIG_DIR =
LOCAL_CONFIG_FILE =

LOCAL_DIR = $home/condor
LOG = \$(LOCAL_DIR)/log
SPOOL = \$(LOCAL_DIR)/spool
EXECUTE = \$(LOCAL_DIR)/execute
LOCK = \$(LOCAL_DIR)/lock
RUN = \$(LOCAL_DIR)/run

use ROLE : Personal
CONDOR_HOST = 127.0.0.1
NETWORK_INTERFACE = 127.0.0.1
NUM_CPUS = 4

# Host-based security: only loopback may talk to the daemons.
use SECURITY : HOST_BASED
ALLOW_READ = 127.0.0.1
ALLOW_WRITE = 127.0.0.1
ALLOW_ADMINISTRATOR = 127.0.0.1
ALLOW_NEGOTIATOR = 127.0.0.1
ALLOW_DAEMON = 127.0.0.1
SEC_DEFAULT_AUTHENTICATION = OPTIONAL
SEC_DEFAULT_AUTHENTICATION_METHODS = FS
# The host venv's htcondor2 wheel (newer than these 23.9 daemons) expects FS authentication
# to bind the server's address into the directory name, which 23.9 servers do not do.
SEC_FS_ENFORCE_CHANNEL_BINDING = False

# Short cycles: tests wait on the pool, not on production-sized intervals.
UPDATE_INTERVAL = 2
SCHEDD_INTERVAL = 2
SCHEDD_MIN_INTERVAL = 1
NEGOTIATOR_INTERVAL = 2
NEGOTIATOR_MIN_INTERVAL = 1
NEGOTIATOR_CYCLE_DELAY = 1
PERIODIC_EXPR_INTERVAL = 2
STARTER_UPDATE_INTERVAL = 2
DAGMAN_USER_LOG_SCAN_INTERVAL = 1
EOF
}

main() {
    [[ $(id -u) -eq 0 ]] || die 2 "must run as root (debootstrap, chroot and mounts need it)"
    if [[ ! -f $MARKER || $(cat "$MARKER") != "$ROOT_VERSION" ]]; then
        build_root
    fi
    install_extra_packages
    chroot "$ROOT" id -u "$JOB_USER" >/dev/null 2>&1 ||
        chroot "$ROOT" useradd --create-home --shell /bin/sh "$JOB_USER"
    # Host paths under /root (e.g. pyenv) are bind-mounted at the same path: the job user must
    # be able to traverse the root's own /root.
    chmod 755 "$ROOT/root"
    local home
    home=$(chroot "$ROOT" getent passwd "$JOB_USER" | cut -d: -f6)
    write_personal_config "$home"
    chroot "$ROOT" chown -R "$JOB_USER:$JOB_USER" "$home"
    echo "$ROOT_VERSION" >"$MARKER"
    echo "provision.sh: condor root ready at $ROOT" >&2
}

main "$@"
