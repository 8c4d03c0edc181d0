#!/bin/bash
# The main job: a local one-node Slurm cluster with privtmpd wired in, a
# sample job (as an unprivileged user) that shows its private /tmp, then the
# cleanup.  Everything it starts is stopped again at the end.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
"$REPO/tools/bootstrap.sh"
exec "$REPO/.venv/bin/python" "$REPO/tools/demo.py" "$@"
