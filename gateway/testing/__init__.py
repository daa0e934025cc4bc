"""Helpers for the project's own tests and scripts against local clusters."""
