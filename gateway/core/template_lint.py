"""Refuse batch-script templates whose ``{{ }}`` values the shell quoting can't protect.

:mod:`gateway.core.shell` passes every ``{{ expr }}`` through ``shlex.quote``.
That makes the value one inert shell word only where the expression stands in
plain word context. Inside ``"..."``, ``'...'``, ``$'...'``, ``$(( ))`` or the
body of an unquoted heredoc the added quotes are literal or close the
surrounding ones, and a value like ``$(id)`` would run. :func:`lint_template`
finds such expressions when a recipe is loaded.

Jinja's own lexer splits the template, so ``{# #}`` comments and ``{% %}``
tags are skipped; the ``data`` text in between is what the shell will read,
and a small quoting state machine runs over it. Each ``{{ }}`` stands in that
text as one word character (:data:`_EXPR`) and the state is checked there.
``{% if %}`` branches are read one after the other, as if all were rendered.
``{{ x | raw_int }}`` prints only digits, so it is allowed anywhere.

Allowed although not strictly safe: ``{{ }}`` in a shell comment or in the
body of a quoted heredoc (``<<'EOF'``). A value with a newline ends the comment,
or can repeat the delimiter line, there; ``check_variable`` refuses control
characters in values unless a recipe sets its own ``pattern``.

Known limits: ``case`` patterns written without the leading ``(`` inside
``$( )`` end the substitution early, and shell keywords are not parsed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import jinja2
from jinja2 import nodes

from gateway.core.errors import RecipeError

# Stands for one {{ }} in the shell text: a word character (its offset is what counts).
_EXPR = "\x00"
# Characters that end an unquoted word (and so may start a comment after them).
_BREAKS = frozenset(" \t\n;&|()<>")


class _Kind(enum.Enum):
    PLAIN = "plain"  # the script itself, $( ) or ` `: a value is one word here
    ARITH = "arith"  # $(( )) or (( )): expanded like double quotes, quotes literal
    PARAM = "param"  # ${ }: as safe as what surrounds it
    DQUOTE = "dquote"
    HEREDOC = "heredoc"  # body of an unquoted heredoc: expanded, quotes literal


@dataclass
class _Frame:
    kind: _Kind
    closer: str = ""  # ")" or "`" for a command substitution, "" for the script
    depth: int = 0  # unmatched ( or { opened inside this frame


@dataclass
class _Heredoc:
    delimiter: str
    strip_tabs: bool  # <<- : leading tabs are removed before matching the end line
    quoted: bool  # any quoting in the delimiter: the body is not expanded


@dataclass
class _Expr:
    line: int
    raw_int: bool  # `x | raw_int` prints only digits, so it is safe anywhere


_REASONS = {
    _Kind.DQUOTE: (
        "{{ }} inside double quotes: the value is shell-quoted, so write it outside "
        'the quotes, e.g. "text "{{ x }}'
    ),
    _Kind.HEREDOC: (
        "{{ }} inside an unquoted heredoc body: the shell expands $( ) there and the "
        "value's quotes are literal; quote the delimiter (<<'EOF') or set a variable "
        "before the heredoc and use it inside"
    ),
    _Kind.ARITH: (
        "{{ }} inside $(( )) or (( )): arithmetic is expanded as in double quotes, so "
        "the value's quotes are literal; use {{ x | raw_int }}"
    ),
    _Kind.PARAM: (
        "{{ }} inside ${...} within double quotes, a heredoc or $(( )): the value's "
        "quotes are literal there; set a variable outside the quotes and use it instead"
    ),
}
_SQUOTE = (
    "{{ }} inside single quotes: the value is shell-quoted, so close the quotes "
    "before it, e.g. 'text '{{ x }}"
)
_ANSI = "{{ }} inside $'...': the value's quotes would end the string; write it outside"
_AFTER_BACKSLASH = "{{ }} right after a backslash: it would escape the value's opening quote"
_AFTER_DOLLAR = "{{ }} right after $: the shell would read the value's quotes as $'...'"
_DELIMITER = "{{ }} in a heredoc delimiter: whether the body expands would depend on the value"


def lint_template(source: str, path: Path, env: jinja2.Environment) -> None:
    """Raise :class:`RecipeError` at the first ``{{ }}`` the shell quoting can't protect."""
    text, exprs = _shell_text(source, path, env)
    _Scanner(text, exprs, path).scan(0, len(text), [_Frame(_Kind.PLAIN)])


def _shell_text(source: str, path: Path, env: jinja2.Environment) -> tuple[str, dict[int, _Expr]]:
    """The template's literal text with :data:`_EXPR` for each ``{{ }}``, keyed by offset."""
    parts: list[str] = []
    exprs: dict[int, _Expr] = {}
    offset = 0
    begin = 0  # the line of the {{ being read
    expr: list[str] | None = None  # the source of the expression being read
    try:
        for line, kind, value in env.lex(source):
            if expr is not None:
                if kind != "variable_end":
                    expr.append(value)
                    continue
                exprs[offset] = _Expr(begin, _is_raw_int(expr, env))
                parts.append(_EXPR)
                offset += 1
                expr = None
            elif kind == "data":
                # Only offsets in `exprs` are expressions; a stray NUL is just a character.
                parts.append(value)
                offset += len(value)
            elif kind == "variable_begin":
                begin, expr = line, []
            # Anything else ({# #}, {% %}, their contents) prints no shell text.
    except jinja2.TemplateSyntaxError as exc:
        raise RecipeError(f"{path}:{exc.lineno}: template: {exc.message}") from None
    return "".join(parts), exprs


def _is_raw_int(expr: list[str], env: jinja2.Environment) -> bool:
    """Whether the expression's outermost operation is the ``raw_int`` filter."""
    try:
        body = env.parse("{{" + "".join(expr) + "}}").body
    except jinja2.TemplateSyntaxError:
        return False
    if len(body) != 1 or not isinstance(body[0], nodes.Output) or len(body[0].nodes) != 1:
        return False
    node = body[0].nodes[0]
    return isinstance(node, nodes.Filter) and node.name == "raw_int"


@dataclass
class _Scanner:
    text: str
    exprs: dict[int, _Expr]
    path: Path

    def fail(self, at: int, reason: str) -> NoReturn:
        raise RecipeError(f"{self.path}:{self.exprs[at].line}: {reason}")

    def check_span(self, start: int, end: int, reason: str) -> None:
        """Refuse any expression in text[start:end] (a string that can't hold one)."""
        for at in range(start, end):
            if at in self.exprs and not self.exprs[at].raw_int:
                self.fail(at, reason)

    def check_expr(self, at: int, stack: list[_Frame]) -> None:
        if self.exprs[at].raw_int:
            return
        kind = stack[-1].kind
        if kind is _Kind.PARAM:
            # ${x:-{{ y }}} is fine in plain context, not within "..." or a heredoc.
            outer = next(f.kind for f in reversed(stack) if f.kind is not _Kind.PARAM)
            if outer is _Kind.PLAIN:
                return
        elif kind is _Kind.PLAIN:
            return
        self.fail(at, _REASONS[kind])

    def scan(self, i: int, end: int, stack: list[_Frame]) -> None:
        """Read text[i:end] starting inside ``stack``; heredoc bodies are read recursively."""
        text = self.text
        pending: list[_Heredoc] = []  # heredocs whose bodies start after the next newline
        word_start = True  # whether a `#` here would start a comment
        while i < end:
            frame = stack[-1]
            kind = frame.kind
            c = text[i]
            nxt = text[i + 1] if i + 1 < end else ""
            shell_syntax = kind in (_Kind.PLAIN, _Kind.ARITH, _Kind.PARAM)
            if i in self.exprs:
                self.check_expr(i, stack)
                i, word_start = i + 1, False
                continue
            if c == "\\":
                if i + 1 in self.exprs:
                    # \'value' escapes the value's opening quote in plain context.
                    if shell_syntax and not self.exprs[i + 1].raw_int:
                        self.fail(i + 1, _AFTER_BACKSLASH)
                    i += 1  # the expression itself is checked next
                    continue
                # Escapes the next character everywhere we get here ("..." and heredoc
                # bodies only for some, but skipping one more never hides a quote).
                i, word_start = i + 2, False
                continue
            if c == "$":
                i = self.dollar(i, end, stack, shell_syntax)
                word_start = stack[-1] is not frame and stack[-1].kind is _Kind.PLAIN
                continue
            if c == "`":
                if kind is _Kind.PLAIN and frame.closer == "`":
                    stack.pop()
                    word_start = False
                else:
                    stack.append(_Frame(_Kind.PLAIN, closer="`"))
                    word_start = True
                i += 1
                continue
            if kind is _Kind.DQUOTE:
                if c == '"':
                    stack.pop()
                i += 1
                continue
            if kind is _Kind.HEREDOC:
                i += 1  # quotes are literal here; only $ ` \ matter
                continue
            # PLAIN, ARITH or PARAM: shell syntax proper.
            if c == "'":
                close = text.find("'", i + 1, end)
                close = end if close < 0 else close
                self.check_span(i + 1, close, _SQUOTE)
                i, word_start = close + 1, False
                continue
            if c == '"':
                stack.append(_Frame(_Kind.DQUOTE))
                i, word_start = i + 1, False
                continue
            if kind is _Kind.PARAM:
                if c == "{":
                    frame.depth += 1
                elif c == "}":
                    if frame.depth:
                        frame.depth -= 1
                    else:
                        stack.pop()
                i += 1
                continue
            if c == "(":
                if kind is _Kind.PLAIN and word_start and nxt == "(":
                    stack.append(_Frame(_Kind.ARITH, closer=")"))  # (( arithmetic ))
                    i += 2
                else:
                    frame.depth += 1
                    i += 1
                word_start = True
                continue
            if c == ")":
                if frame.depth:
                    frame.depth -= 1  # end of a ( subshell ) or of a nested ( in $(( ))
                    i, word_start = i + 1, True
                elif frame.closer == ")":
                    stack.pop()  # end of $( ) or $(( )): the word goes on after it
                    i += 2 if kind is _Kind.ARITH and nxt == ")" else 1
                    word_start = False
                else:
                    i, word_start = i + 1, True  # stray, e.g. a `case` pattern
                continue
            if kind is _Kind.ARITH:
                i, word_start = i + 1, False  # no comments, no heredocs: << is a shift
                continue
            # PLAIN only.
            if c == "#" and word_start:
                close = text.find("\n", i, end)
                i = end if close < 0 else close  # the newline itself is read next
                continue
            if c == "<" and nxt == "<":
                i = self.redirect(i, end, pending)
                word_start = True
                continue
            if c == "\n" and pending:
                i = self.heredoc_bodies(i + 1, end, pending)
                pending = []
                word_start = True
                continue
            word_start = c in _BREAKS
            i += 1

    def dollar(self, i: int, end: int, stack: list[_Frame], shell_syntax: bool) -> int:
        """Read a ``$`` at ``i``: maybe open a substitution or a $'...' string."""
        text = self.text
        if i + 1 in self.exprs and shell_syntax and not self.exprs[i + 1].raw_int:
            self.fail(i + 1, _AFTER_DOLLAR)
        if text.startswith("$((", i):
            stack.append(_Frame(_Kind.ARITH, closer=")"))
            return i + 3
        if text.startswith("$(", i):
            stack.append(_Frame(_Kind.PLAIN, closer=")"))
            return i + 2
        if text.startswith("${", i):
            stack.append(_Frame(_Kind.PARAM, closer="}"))
            return i + 2
        if text.startswith("$'", i) and shell_syntax:
            # ANSI-C string: backslash escapes, ends at the first unescaped quote.
            j = i + 2
            while j < end and text[j] != "'":
                j += 2 if text[j] == "\\" else 1
            self.check_span(i + 2, min(j, end), _ANSI)
            return j + 1
        return i + 1

    def redirect(self, i: int, end: int, pending: list[_Heredoc]) -> int:
        """Read ``<<WORD``/``<<-WORD`` at ``i`` into ``pending``; ``<<<`` is a here-string."""
        text = self.text
        if text.startswith("<<<", i):
            return i + 3
        strip_tabs = text.startswith("<<-", i)
        i += 3 if strip_tabs else 2
        while i < end and text[i] in " \t":
            i += 1
        word: list[str] = []
        quoted = False
        while i < end and text[i] not in _BREAKS:
            c = text[i]
            if i in self.exprs:
                self.fail(i, _DELIMITER)
            if c == "'":
                close = text.find("'", i + 1, end)
                close = end if close < 0 else close
                word.append(text[i + 1 : close])
                quoted, i = True, close + 1
            elif c == '"':
                j = i + 1
                while j < end and text[j] != '"':
                    if text[j] == "\\" and j + 1 < end and text[j + 1] in '"\\$`':
                        j += 1
                    word.append(text[j])
                    j += 1
                quoted, i = True, j + 1
            elif c == "\\":
                word.append(text[i + 1 : i + 2])
                quoted, i = True, i + 2
            else:
                word.append(c)
                i += 1
        if word or quoted:
            pending.append(_Heredoc("".join(word), strip_tabs, quoted))
        return i

    def heredoc_bodies(self, i: int, end: int, pending: list[_Heredoc]) -> int:
        """Read the bodies of ``pending`` heredocs from ``i``, one after the other."""
        text = self.text
        for doc in pending:
            start = i
            body_end = end
            while i < end:
                newline = text.find("\n", i, end)
                line_end = end if newline < 0 else newline
                line = text[i:line_end]
                if (line.lstrip("\t") if doc.strip_tabs else line) == doc.delimiter:
                    body_end = i
                    i = line_end + 1
                    break
                i = line_end + 1
            i = min(i, end)
            if not doc.quoted:
                self.scan(start, body_end, [_Frame(_Kind.HEREDOC)])
        return i
