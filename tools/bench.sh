#!/bin/bash
# The benchmark suite (docs/performance.md): privtmpd against bare Slurm,
# empty hooks and job_container/tmpfs, in one run on a local one-node Slurm
# cluster.  As root.  Installs what it needs first.  Arguments go to
# `python -m bench`: --quick (< 3 minutes), --only SECTION..., --help.
# Results: bench/results/latest.json and latest.png.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
"$REPO/tools/bootstrap.sh"
if ! "$REPO/.venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    echo "bench: installing the bench extra (matplotlib) into $REPO/.venv"
    "$REPO/.venv/bin/pip" install -q -e "$REPO[bench]"
fi
cd "$REPO"
exec "$REPO/.venv/bin/python" -m bench "$@"
