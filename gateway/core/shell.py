"""Batch-script rendering where every interpolated value is shell-quoted.

Templates are Jinja2, rendered in a sandbox with StrictUndefined. They see
operator values only (recipe_check.py refuses a template that names anything
else; a request's values reach the job as environment variables). The
``finalize`` hook quotes the result of every ``{{ ... }}`` expression, so a
value is one shell word; only :class:`RawShell` strings, which the gateway
itself builds (``raw_int``), pass through unquoted.
"""

from __future__ import annotations

import shlex
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class RawShell(str):
    """Shell text written by the gateway (helper functions), never user input."""

    __slots__ = ()


def quote(value: Any) -> str:
    if isinstance(value, RawShell):
        return str(value)
    if value is None:
        return "''"
    if isinstance(value, bool):
        return "1" if value else "0"
    return shlex.quote(str(value))


def environment(loader: jinja2.BaseLoader | None = None) -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        finalize=quote,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["raw_int"] = _raw_int
    # range, lipsum, cycler...: nothing a job script needs, so nothing to reach.
    env.globals.clear()
    return env


def _raw_int(value: Any) -> RawShell:
    """An integer left unquoted (``{{ port | raw_int }}``); anything else is an error."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"not an integer: {value!r}")
    return RawShell(str(int(value)))
