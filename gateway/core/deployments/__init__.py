"""Deployments: declared replicas of a recipe, kept alive across Slurm's time
limits, failures and spec changes (spec.py, plan.py, reconciler.py)."""
