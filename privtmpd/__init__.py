"""privtmpd: per-job private temporary directories for Slurm."""

__version__ = "0.1.0"
