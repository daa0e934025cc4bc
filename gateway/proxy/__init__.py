"""The data path: prompts and /v1 requests relayed to services, below the HTTP API."""
