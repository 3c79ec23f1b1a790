#!/usr/bin/env bash
# The README's main job: provision (cached) and run the sandboxed pysnap demo on containerd 2.1.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
scripts/provision.sh
# shellcheck source=/dev/null
source "${PYSNAP_CACHE:-/var/cache/pysnap-dev}/toolchain.env"
exec .venv/bin/python scripts/demo.py "$@"
