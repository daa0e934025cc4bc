"""The checks a recipe's template passes when the recipe loads.

A template renders operator values only: the recipe's own (``recipe.*``,
``service.*``), its runtime settings with the site overlay (``runtime.*``) and
the job's resources (``resources.*``), each shell-quoted on output
(:mod:`gateway.core.shell`). A request's values never become shell text: they
reach the job as environment variables, which the script reads as ``"$NAME"``.
So what is checked here is mostly what the template may name:

* the parse tree (:func:`check_tree`): only those names (Jinja's globals are
  gone and may not be set), plain ``name.key`` look-ups into them or a loop
  variable over them, a few filters and tests, ``if``/``for``/``set``/``with``; no
  ``include``/``import``/``from``/``extends`` (a recipe is one file), macros,
  calls, ``filter`` or ``autoescape`` blocks;
* the shell text (:func:`check_shell_text`): no xtrace anywhere (it would write
  the job's secrets, such as its upstream key, into the log the API serves),
  no template value as the value of a variable the shell runs or obeys, and
  none where ``shlex.quote``'s quotes would be text: inside quotes, a heredoc's
  body, a shell comment or after a backslash;
* the rendered script (:func:`check_rendered`): rendered with the recipe's own
  values, it must pass the same xtrace check and ``bash -n``.

Each refusal is a :class:`RecipeError` that starts with ``file:line:``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import jinja2
from jinja2 import meta, nodes

from gateway.core.errors import RecipeError

# The operator values a template may name (gateway.core.recipes.Recipe.template_values).
ROOTS = ("recipe", "resources", "runtime", "service")
# What the shipped recipes need, and no more: raw_int prints an integer unquoted.
FILTERS = frozenset({"raw_int", "default"})
TESTS = frozenset({"defined", "undefined", "none"})

_ALLOWED = (
    nodes.Template, nodes.Output, nodes.TemplateData, nodes.If, nodes.For, nodes.Assign,
    nodes.AssignBlock, nodes.With, nodes.Name, nodes.Const, nodes.Tuple, nodes.List,
    nodes.CondExpr, nodes.Filter, nodes.Test, nodes.Getattr, nodes.Getitem, nodes.Compare,
    nodes.Operand, nodes.And, nodes.Or, nodes.Not, nodes.Concat, nodes.Add, nodes.Sub,
    nodes.Mul, nodes.Div, nodes.FloorDiv, nodes.Mod, nodes.Neg, nodes.Pos,
    nodes.Scope,  # only around {% autoescape %}, which is refused
)  # fmt: skip
_FILE = "pulls in another file, which is never checked: a recipe is one template file"
_AUTOESCAPE = "{% autoescape %} is not allowed: HTML escaping rewrites the values' quotes"
_REFUSED: dict[type[nodes.Node], str] = {
    nodes.Include: "{% include %} " + _FILE,
    nodes.Import: "{% import %} " + _FILE,
    nodes.FromImport: "{% from %} " + _FILE,
    nodes.Extends: "{% extends %} " + _FILE,
    nodes.Block: "{% block %} serves template inheritance, which a recipe can't use",
    nodes.Macro: "{% macro %} is not allowed: its text lands unchecked where it is called",
    nodes.CallBlock: "{% call %} is not allowed: it prints a macro's text where it stands",
    nodes.Call: "calls are not allowed: a template places values, it calls nothing",
    nodes.FilterBlock: "{% filter %} is not allowed: it rewrites the text, quoting included",
    nodes.ScopedEvalContextModifier: _AUTOESCAPE,
    nodes.EvalContextModifier: _AUTOESCAPE,
}  # fmt: skip
_ONLY = "a template may name only the operator values " + ", ".join(ROOTS)
# Neither the roots nor Jinja's own globals (which the environment drops) may be set.
_RESERVED = frozenset(ROOTS) | frozenset(jinja2.defaults.DEFAULT_NAMESPACE) | {"loop"}

# Stands for one {{ }} in the shell text.
_EXPR = "\x00"
_XTRACE_WORDS = [
    (re.compile(r"\bxtrace\b"), "xtrace"),
    (re.compile(r"\bBASH_XTRACEFD\b"), "BASH_XTRACEFD"),
    (re.compile(r"\bPS4\b"), "PS4"),
]
# `set` or a shell as a word, and the rest of its simple command on the line.
_SET_WORDS = re.compile(r"(?<![\w$./-])set(?=[ \t])([^\n;&|)#]*)")
_SHELL_WORDS = re.compile(
    r"(?<![\w$.-])(?:[\w./-]*/)?(?:sh|bash|dash|zsh|ksh|mksh|ash|yash)(?=[ \t])([^\n;&|)#]*)"
)
_XTRACE = (
    "xtrace ({what}): a trace would write the job's secrets, such as its upstream key, "
    "into the job's log, which the API serves"
)
# Variables whose value the shell runs, evaluates or obeys: no template value there.
_SPECIAL = re.compile(
    r"(?<![A-Za-z0-9_])(BASH_ENV|ENV|SHELLOPTS|BASHOPTS|PROMPT_COMMAND|PS[0-4])\+?=" + _EXPR
)


def check_template(
    template: jinja2.Template,
    source: str,
    path: Path,
    env: jinja2.Environment,
    values: Iterable[Mapping[str, Any]],
) -> None:
    """All the checks; ``values``: the operator values to render it with, one
    mapping per rendering (they name the same roots as :data:`ROOTS`)."""
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise RecipeError(f"{path}:{exc.lineno}: template: {exc.message}") from None
    check_tree(tree, path)
    check_shell_text(source, path, env)
    for context in values:
        check_rendered(_render(template, path, context), path)


def check_tree(tree: nodes.Template, path: Path) -> None:
    """Refuse a node or name outside what a recipe template may use."""

    def fail(node: nodes.Node, reason: str) -> NoReturn:
        raise RecipeError(f"{path}:{node.lineno}: {reason}")

    # Loop variables walk operator values, so a look-up into one is one too.
    loop_targets = {
        name.name
        for loop in tree.find_all(nodes.For)
        for name in [loop.target, *loop.target.find_all(nodes.Name)]
        if isinstance(name, nodes.Name)
    }
    for node in tree.find_all(nodes.Node):
        refused = _REFUSED.get(type(node))
        if refused is not None:
            fail(node, refused)
        if not isinstance(node, _ALLOWED):
            fail(node, f"{type(node).__name__} is not allowed in a recipe template")
        if isinstance(node, nodes.Filter) and node.name not in FILTERS:
            fail(node, f"filter {node.name} is not allowed (only {', '.join(sorted(FILTERS))})")
        if isinstance(node, nodes.Test) and node.name not in TESTS:
            fail(node, f"test {node.name} is not allowed (only {', '.join(sorted(TESTS))})")
        why = (
            _lookup(node, loop_targets) if isinstance(node, nodes.Getattr | nodes.Getitem) else None
        )
        if why is not None:
            fail(node, why)
        if isinstance(node, nodes.Name) and node.ctx != "load" and node.name in _RESERVED:
            fail(node, f"{node.name!r} is a name the template may only read ({_ONLY})")
    # A name the template does not set itself is looked up in the context:
    # only the operator values are there.
    undeclared = meta.find_undeclared_variables(tree)
    stored = {n.name for n in tree.find_all(nodes.Name) if n.ctx != "load"} | {"loop"}
    for name in tree.find_all(nodes.Name):
        if name.ctx != "load" or name.name in ROOTS:
            continue
        if name.name in undeclared or name.name not in stored:
            fail(name, f"{name.name!r} is not a value a template may use: {_ONLY}")


def _lookup(node: nodes.Getattr | nodes.Getitem, loop_targets: set[str]) -> str | None:
    """Why a look-up is refused, if it is: only ``name.key`` or ``name['key']``
    into an operator value or a loop variable over one."""
    if isinstance(node, nodes.Getattr):
        key = node.attr
    elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str | int):
        key = str(node.arg.value)
    else:
        return "only a plain key may be looked up (name.key or name['key'])"
    if isinstance(node.node, nodes.Name) and node.node.name == "env":
        return (
            f"env.{key} is a request value, and request values never become shell text: "
            f'they reach the job as environment variables; write "${key}" in the script '
            f"instead ({_ONLY})"
        )
    if not isinstance(node.node, nodes.Name):
        return "only one look-up into a value is allowed (name.key)"
    if node.node.name not in ROOTS and node.node.name not in loop_targets | {"loop"}:
        return f"{node.node.name}.{key}: look-ups go into operator values only ({_ONLY})"
    if key.startswith("_"):
        return f"{key} is not a key a template may look up"
    return None


def check_shell_text(source: str, path: Path, env: jinja2.Environment) -> None:
    """Refuse xtrace anywhere in the template's text (Jinja comments aside)
    and a template value as the value of a variable the shell obeys."""
    text, starts, lines = _shell_text(source, env)

    def line_at(at: int) -> int:
        k = max(bisect_right(starts, at) - 1, 0)
        return lines[k] + text.count("\n", starts[k], at) if starts else 1

    if (quoted := _quoted_value(text)) is not None:
        at, where = quoted
        raise RecipeError(
            f"{path}:{line_at(at)}: a {{{{ }}}} value {where}: its shell quotes would be "
            "literal characters there; assign it to a variable outside quotes "
            '(NAME={{ value }}) and write "$NAME"'
        )
    if found := _SPECIAL.search(text):
        raise RecipeError(
            f"{path}:{line_at(found.start())}: a template value as the value of "
            f"{found[1]}: the shell runs or obeys it"
        )
    if (xtrace := _xtrace(text)) is not None:
        at, what = xtrace
        raise RecipeError(f"{path}:{line_at(at)}: {_XTRACE.format(what=what)}")


_HEREDOC = re.compile(r"<<(-?)[ \t]*(['\"]?)([A-Za-z0-9_]+)\2")


def _quoted_value(text: str) -> tuple[int, str] | None:
    """Where a value stands inside quotes, a heredoc, a shell comment or after
    a backslash: there the quotes ``shlex.quote`` adds are text, not quoting."""
    i, n = 0, len(text)
    pending: list[tuple[str, bool]] = []  # heredocs opened on this line
    while i < n:
        c = text[i]
        if c == "\\":
            if text.startswith(_EXPR, i + 1):
                return i + 1, "after a backslash"
            i += 2
            continue
        if c == "'" or (c == "$" and text.startswith("$'", i)):
            i += 1 if c == "'" else 2
            while i < n and text[i] != "'":
                if text[i] == _EXPR:
                    return i, "inside single quotes"
                i += 2 if c == "$" and text[i] == "\\" else 1
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                if text[i] == _EXPR:
                    return i, "inside double quotes"
                i += 2 if text[i] == "\\" else 1
        elif c == "#" and (i == 0 or text[i - 1] in " \t\n;&|("):
            end = text.find("\n", i)
            if _EXPR in text[i : end if end >= 0 else n]:
                return text.index(_EXPR, i), "in a shell comment"
            i = n if end < 0 else end
            continue
        elif c == "<" and text.startswith("<<", i) and not text.startswith("<<<", i):
            if (found := _HEREDOC.match(text, i)) is not None:
                pending.append((found[3], found[1] == "-"))
                i = found.end()
                continue
        elif c == "\n" and pending:
            i += 1
            for word, tabs in pending:
                while i < n:
                    end = text.find("\n", i)
                    end = n if end < 0 else end
                    line = text[i:end]
                    i = end + 1
                    if (line.lstrip("\t") if tabs else line) == word:
                        break
                    if _EXPR in line:
                        return text.index(_EXPR, i - len(line) - 1), "in a heredoc's body"
            pending = []
            continue
        i += 1
    return None


def check_rendered(script: str, path: Path) -> None:
    """The rendered script: no xtrace (an operator value could spell it) and ``bash -n``."""
    if (xtrace := _xtrace(script)) is not None:
        at, what = xtrace
        line = script.count("\n", 0, at) + 1
        raise RecipeError(f"{path}: rendered with the recipe's values, line {line}: "
                          + _XTRACE.format(what=what))  # fmt: skip
    bash = shutil.which("bash")
    if bash is None:
        raise RecipeError(f"{path}: bash is needed to check a recipe's script (bash -n)")
    done = subprocess.run(
        [bash, "-n"], input=script, capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        error = done.stderr.strip().replace("\n", "; ")
        raise RecipeError(
            f"{path}: rendered with the recipe's values, the script is not valid bash: {error}"
        )


def _render(template: jinja2.Template, path: Path, context: Mapping[str, Any]) -> str:
    try:
        return template.render(**context)
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        line = _template_line(exc.__traceback__, template.filename)
        where = f"{path}:{line}" if line else str(path)
        raise RecipeError(f"{where}: rendering with the recipe's values failed: {exc}") from None


def _template_line(tb: TracebackType | None, filename: str | None) -> int | None:
    """The template's line in a traceback Jinja rewrote (its frames name the file)."""
    line, name = None, filename or "<template>"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == name:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _shell_text(source: str, env: jinja2.Environment) -> tuple[str, list[int], list[int]]:
    """The template's literal text with :data:`_EXPR` for each ``{{ }}``; where each
    piece starts in it, and on which line of the template."""
    parts: list[str] = []
    starts: list[int] = []
    lines: list[int] = []
    offset = 0
    for line, kind, value in env.lex(source):
        if kind in ("data", "variable_begin"):
            piece = value if kind == "data" else _EXPR
            starts.append(offset)
            lines.append(line)
            parts.append(piece)
            offset += len(piece)
    return "".join(parts), starts, lines


def _xtrace(text: str) -> tuple[int, str] | None:
    """Where the text turns on xtrace, and how."""
    for pattern, what in _XTRACE_WORDS:
        if found := pattern.search(text):
            return found.start(), what
    for found in _SET_WORDS.finditer(text):
        words = found[1].replace('"', " ").replace("'", " ").split()
        if any(re.fullmatch(r"-[A-Za-z]*x[A-Za-z]*", w) for w in words):
            return found.start(), "set -x"
    for found in _SHELL_WORDS.finditer(text):
        for word in found[1].replace('"', " ").replace("'", " ").split():
            if not word.startswith("-") or word.startswith("--"):
                break
            if "x" in word:
                return found.start(), f"a shell's {word}"
    return None
