#!/usr/bin/env bash
# The test command (README): provision everything, then run pytest. Extra arguments go to pytest.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
scripts/provision.sh
# shellcheck source=/dev/null
source "${PYSNAP_CACHE:-/var/cache/pysnap-dev}/toolchain.env"
export PYSNAP_BIN=$REPO/.venv/bin/pysnap
rc=0
.venv/bin/python -m pytest -ra "$@" || rc=$?
if ((rc == 5)); then echo "test.sh: pytest collected no tests: failing" >&2; fi
exit "$rc"
