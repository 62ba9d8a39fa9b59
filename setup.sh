#!/bin/sh
# pmfs set-up: installs what a fresh Debian machine lacks (as root), then
#   ./setup.sh mount   formats a default image on first use and mounts it
#   ./setup.sh test    runs the full test suite
#   ./setup.sh install only installs
# Environment: PMFS_IMAGE (default /var/lib/pmfs/default.img), PMFS_SIZE
# (default 1G, used when the image is created), PMFS_MOUNTPOINT (default
# /mnt/pmfs), PMFS_MOUNT_OPTIONS (extra -o options).
set -eu
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
cmd=${1:-mount}
[ $# -gt 0 ] && shift

say() { printf '%s\n' "setup: $*" >&2; }

APT_PACKAGES="fuse3 libfuse3-dev pkg-config libpmem1 fio attr acl rsync sqlite3 git \
python3 python3-venv python3-dev gcc util-linux"

install_apt() {
    missing=""
    for p in $APT_PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        if [ "$(id -u)" -ne 0 ]; then
            say "missing Debian packages:$missing (run as root to install them)"; exit 1
        fi
        say "installing Debian packages:$missing"
        export DEBIAN_FRONTEND=noninteractive
        # wait for another apt/dpkg run (e.g. unattended upgrades) to finish
        apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
        # shellcheck disable=SC2086
        apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
            $missing >/dev/null
    fi
}

install_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating the virtual environment in $VENV"
        python3 -m venv "$VENV"
    fi
    stamp="$VENV/.pmfs-installed"
    # (again when the build inputs changed, or the C module built in place is gone)
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
        || [ pmfs/_accel.c -nt "$stamp" ] || ! ls pmfs/_accel.*.so >/dev/null 2>&1; then
        say "installing pmfs and its dependencies into $VENV (compiles pmfs/_accel.c)"
        "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
        # (its output only on failure: an editable install of a package with
        # a C extension always warns about folders shadowing the package)
        if ! "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]" \
                >"$VENV/pip-install.log" 2>&1; then
            cat "$VENV/pip-install.log" >&2
            say "pip install failed (log: $VENV/pip-install.log)"; exit 1
        fi
        touch "$stamp"
    fi
    # the programs, where mount(8), mount.fuse3, mkfs(8) and fsck(8) look for them
    if [ "$(id -u)" -eq 0 ]; then
        for prog in mkfs.pmfs fsck.pmfs mount.pmfs pmfs pmfs-inspect; do
            ln -sf "$VENV/bin/$prog" "/usr/local/sbin/$prog"
        done
        for prog in mkfs.pmfs fsck.pmfs mount.pmfs; do
            [ -e "/sbin/$prog" ] && [ ! -L "/sbin/$prog" ] || ln -sf "$VENV/bin/$prog" "/sbin/$prog"
        done
    fi
}

do_mount() {
    image=${PMFS_IMAGE:-/var/lib/pmfs/default.img}
    mnt=${PMFS_MOUNTPOINT:-/mnt/pmfs}
    size=${PMFS_SIZE:-1G}
    mkdir -p "$(dirname "$image")" "$mnt"
    if [ ! -e "$image" ]; then
        say "formatting $image ($size)"
        "$VENV/bin/mkfs.pmfs" -q -L default "$image" "$size"
    fi
    if grep -qs " $mnt fuse.pmfs " /proc/mounts; then
        say "already mounted"
    else
        opts=${PMFS_MOUNT_OPTIONS:-}
        if [ -n "$opts" ]; then
            "$VENV/bin/mount.pmfs" "$image" "$mnt" -o "$opts"
        else
            "$VENV/bin/mount.pmfs" "$image" "$mnt"
        fi
    fi
    echo "pmfs: $image mounted at $mnt"
    echo "unmount with: fusermount3 -u $mnt"
}

do_test() {
    exec "$VENV/bin/python" -m pytest -q "$@"
}

case "$cmd" in
    install) install_apt; install_venv ;;
    mount) install_apt; install_venv; do_mount ;;
    test) install_apt; install_venv; do_test "$@" ;;
    *) echo "usage: $0 [mount|test|install] [pytest args]" >&2; exit 2 ;;
esac
