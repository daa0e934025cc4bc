"""HTTP layer: controllers and wire schemas only; no Slurm details here."""
