"""Helpers the tests share: stub servers, gateway processes, polling, clusters."""
