#!/bin/bash
# The main job: a local Slurm cluster (a controller and two nodes, each in
# namespaces of its own) with privtmpd wired in, a
# sample job (as an unprivileged user) that shows its private /tmp, then the
# cleanup.  Everything it starts is stopped again at the end.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
"$REPO/tools/bootstrap.sh"
exec "$REPO/.venv/bin/python" "$REPO/tools/demo.py" "$@"
