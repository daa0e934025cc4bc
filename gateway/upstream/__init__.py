"""Adapters to what the jobs serve: health probes, the vLLM client and proxy."""
