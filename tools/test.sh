#!/bin/bash
# Run the whole test suite, as root, for real: unit tests, root integration
# tests in real mount namespaces, and end-to-end tests on a local one-node
# Slurm cluster.  Extra arguments go to pytest (e.g. -k requeue, -x).
# PRIVTMPD_REQUIRE_PRIVILEGED=1 turns every skipped privileged test into a
# failure (CI sets it).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
"$REPO/tools/bootstrap.sh"
cd "$REPO"
exec "$REPO/.venv/bin/python" -m pytest "$@"
