"""Benchmark suite of privtmpd against bare Slurm, empty hooks and
job_container/tmpfs: `tools/bench.sh` (see docs/performance.md)."""
