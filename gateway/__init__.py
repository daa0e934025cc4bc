"""Slurm AI gateway: run and reach AI services on Slurm clusters over HTTP."""

__version__ = "0.1.0"
