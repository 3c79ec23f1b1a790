#!/usr/bin/env bash
# Install everything the test suites need (docs/DEVLAYOUT.md). Idempotent; a cached run takes seconds.
#   - bookworm packages (runc, docker-registry, busybox-static) installed with apt-get;
#   - trixie/sid .debs fetched with a PRIVATE apt state and `dpkg -x`-ed under $PYSNAP_CACHE;
#   - the repo venv (.venv) with `pip install -e .[dev]`;
#   - $PYSNAP_CACHE/toolchain.env (export lines), written after every path has been checked.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${PYSNAP_CACHE:-/var/cache/pysnap-dev}
[[ -f $REPO/pyproject.toml ]] || { echo "provision: $REPO is not the pysnap repo" >&2; exit 1; }
STAMPS=$CACHE/stamps
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
mkdir -p "$STAMPS"
exec 9>"$CACHE/.lock"
flock 9 # one provision at a time per cache

say() { printf 'provision: %s\n' "$*" >&2; }
die() { printf 'provision: ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- bookworm system packages
SYSTEM_PKGS=(runc docker-registry busybox-static)
SYSTEM_PKGS+=(systemd) # systemd-analyze verify / systemctl --root for the unit tests (systemd need not run)
missing=()
for p in "${SYSTEM_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    say "apt-get install ${missing[*]}"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install failed for: ${missing[*]}"
fi

# ---------------------------------------------------------------- python venv
PYTHON=${PYSNAP_PYTHON:-python3}
if [[ ! -x $REPO/.venv/bin/python ]]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than 3.11"
    say "creating $REPO/.venv"
    "$PYTHON" -m venv "$REPO/.venv"
fi
pyhash=$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)
pystamp=$REPO/.venv/.pyproject.sha256
if [[ ! -f $pystamp || $(<"$pystamp") != "$pyhash" ]]; then
    say "pip install -e .[dev]"
    "$REPO/.venv/bin/pip" install -q --disable-pip-version-check -e "$REPO[dev]" || die "pip install failed"
    echo "$pyhash" >"$pystamp"
fi

# ---------------------------------------------------------------- private apt state (trixie, sid)
MIRROR=$(awk '$1 == "URIs:" { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
[[ -n $MIRROR ]] || die "no URIs: line in /etc/apt/sources.list.d/debian.sources"
declare -A UPDATED=()

papt() { # papt SUITE apt-get|apt-cache ARGS...  (never touches the system's apt state)
    local d=$CACHE/apt/$1 tool=$2
    shift 2
    "$tool" -o Dir::Etc::SourceList="$d/sources.list" -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$d/lists" -o Dir::Cache="$d/cache" -o Dir::State::Status=/dev/null \
        -o APT::Sandbox::User=root "$@"
}

papt_update() { # once per run, only when something must be downloaded
    local suite=$1 d=$CACHE/apt/$1
    [[ -n ${UPDATED[$suite]:-} ]] && return 0
    mkdir -p "$d/lists/partial" "$d/cache/archives/partial"
    echo "deb [signed-by=$KEYRING] $MIRROR $suite main" >"$d/sources.list"
    say "apt-get update ($suite, private state)"
    papt "$suite" apt-get -qq update || die "apt-get update of $suite failed (mirror $MIRROR)"
    UPDATED[$suite]=1
}

candidate() { # candidate SUITE PKG -> version the archive serves
    papt "$1" apt-cache show --no-all-versions "$2" 2>/dev/null | awk '$1 == "Version:" { print $2; exit }'
}

pin() { # pin SUITE PKG UPSTREAM -> PKG=VERSION, dies unless the archive serves UPSTREAM
    local v
    v=$(candidate "$1" "$2")
    [[ -n $v ]] || die "package $2 not found in $1"
    [[ $v == "$3" || $v == "$3"[~+-]* ]] || die "package $2: $1 serves $v, expected $3"
    echo "$2=$v"
}

download() { # download SUITE DIR PKG[=VER]...
    local suite=$1 dir=$2 p
    shift 2
    mkdir -p "$dir"
    (cd "$dir" && papt "$suite" apt-get -qq download "$@" >/dev/null 2>&1) && return 0
    for p in "$@"; do # find out which package failed, to name it
        (cd "$dir" && papt "$suite" apt-get -qq download "$p") || die "download of package $p ($suite) failed"
    done
}

# component NAME SPEC SUITE PKG... : download PKGs (resolved when needed) and dpkg -x them into $CACHE/NAME.
# SPEC identifies the wanted content; the component is rebuilt when SPEC changes. The PKG list may be given
# by a function: `component NAME SPEC SUITE @fn` calls fn to print the package list.
component() {
    local name=$1 spec=$2 suite=$3
    shift 3
    local stamp=$STAMPS/$name
    if [[ -f $stamp && $(<"$stamp") == "$spec" && -d $CACHE/$name ]]; then return 0; fi
    papt_update "$suite"
    local pkgs=("$@") list
    if [[ $1 == @* ]]; then
        list=$("${1#@}") || exit 1
        mapfile -t pkgs <<<"$list"
    fi
    say "fetching $name (${#pkgs[@]} packages from $suite)"
    rm -rf "${CACHE:?}/$name" "$CACHE/debs/$name"
    download "$suite" "$CACHE/debs/$name" "${pkgs[@]}"
    mkdir -p "$CACHE/$name"
    local deb
    for deb in "$CACHE/debs/$name"/*.deb; do dpkg -x "$deb" "$CACHE/$name" || die "dpkg -x $deb failed"; done
    (cd "$CACHE/debs/$name" && ls) >"$STAMPS/$name.debs" # what was extracted, for the record
    rm -rf "${CACHE:?}/debs/$name"
    echo "$spec" >"$stamp"
}

# Pinned upstream versions (the archive must serve exactly these).
C17=1.7.24 C21=2.1.9 NRI_TRIXIE=0.6.1 NRI_SID=0.8.0

# Package lists, resolved against fresh lists (only when a component has to be fetched).
c17_pkgs() { pin trixie containerd $C17; }
c21_pkgs() { pin sid containerd $C21; }
read_trixie() { pin trixie golang-github-containerd-nri-dev $NRI_TRIXIE; }
read_sid() { pin sid golang-github-containerd-nri-dev $NRI_SID; echo golang-github-containerd-ttrpc-dev; }
gopath_pkgs() { # containerd-dev 1.7.24 + the golang-* closure of its Depends, minus the Go toolchain itself
    pin trixie golang-github-containerd-containerd-dev $C17
    papt trixie apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances golang-github-containerd-containerd-dev |
        grep -E '^golang-' | grep -vE '^golang-(go|src|any|doc|1\.[0-9]+-.*|github-containerd-containerd-dev)$' | sort -u
}

component containerd-$C17 "trixie containerd $C17" trixie @c17_pkgs
component containerd-$C21 "sid containerd $C21" sid @c21_pkgs
component go-1.24 "trixie golang-1.24-go golang-1.24-src" trixie golang-1.24-go golang-1.24-src
component gopath "trixie containerd-dev $C17 closure" trixie @gopath_pkgs
component cri-api "sid golang-k8s-cri-api-dev" sid golang-k8s-cri-api-dev
component read-trixie "trixie nri $NRI_TRIXIE" trixie @read_trixie
component read-sid "sid nri $NRI_SID ttrpc" sid @read_sid

# ---------------------------------------------------------------- toolchain.env (verified)
declare -A TC=(
    [PYSNAP_CONTAINERD_17]=$CACHE/containerd-$C17/usr/bin
    [PYSNAP_CONTAINERD_21]=$CACHE/containerd-$C21/usr/bin
    [PYSNAP_RUNC]=$(command -v runc || echo /usr/sbin/runc)
    [PYSNAP_REGISTRY]=/usr/bin/docker-registry
    [PYSNAP_BUSYBOX]=/bin/busybox
    [PYSNAP_GOROOT]=$CACHE/go-1.24/usr/lib/go-1.24
    [PYSNAP_GOPATH]=$CACHE/gopath/usr/share/gocode
    [PYSNAP_CRI_PROTO]=$CACHE/cri-api/usr/share/gocode/src/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto
)

check() { # check WHAT COMMAND... : the command must succeed and print something matching WHAT
    local want=$1 out
    shift
    out=$("$@" 2>&1) || die "'$*' failed: $out"
    [[ $out == *"$want"* ]] || die "'$*' printed '${out%%$'\n'*}', expected $want"
}
for v in 17:$C17 21:$C21; do
    dir=${TC[PYSNAP_CONTAINERD_${v%%:*}]}
    for b in containerd ctr containerd-shim-runc-v2; do [[ -x $dir/$b ]] || die "missing $dir/$b"; done
    check "${v#*:}" "$dir/containerd" --version
done
check "runc version" "${TC[PYSNAP_RUNC]}" --version
check "registry" "${TC[PYSNAP_REGISTRY]}" --version
check "BusyBox" "${TC[PYSNAP_BUSYBOX]}" --help
check "go1.24" "${TC[PYSNAP_GOROOT]}/bin/go" version
[[ -f ${TC[PYSNAP_GOPATH]}/src/github.com/containerd/containerd/snapshots/testsuite/testsuite.go ]] \
    || die "GOPATH lacks containerd's snapshots/testsuite: ${TC[PYSNAP_GOPATH]}"
[[ -f ${TC[PYSNAP_CRI_PROTO]} ]] || die "missing ${TC[PYSNAP_CRI_PROTO]}"

{
    echo "# written by scripts/provision.sh"
    echo "export PYSNAP_CACHE=$CACHE"
    for k in $(printf '%s\n' "${!TC[@]}" | sort); do echo "export $k=${TC[$k]}"; done
} >"$CACHE/toolchain.env.tmp"
mv "$CACHE/toolchain.env.tmp" "$CACHE/toolchain.env"
say "ok: $CACHE/toolchain.env"
