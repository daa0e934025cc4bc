"""Who calls the gateway: API keys, OIDC tokens, Slurm tokens; tenants and roles."""
