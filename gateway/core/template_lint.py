"""Refuse batch-script templates whose ``{{ }}`` values the shell quoting can't protect.

:mod:`gateway.core.shell` passes every ``{{ expr }}`` through ``shlex.quote``.
That makes the value one inert shell word only where the shell reads the
expression as a plain word of data. :func:`lint_template` finds, when a recipe
is loaded, the places where it would not, and refuses the template with
``file:line`` and the reason.

How: Jinja's own lexer splits the template, so ``{# #}`` comments are skipped;
the ``data`` text in between is what the shell will read, and a small shell
reader runs over it: quoting (a stack of contexts: script, ``$( )``, ``"..."``,
``$(( ))``, ``${ }``, heredoc bodies) and, in script context, words and simple
commands (the command word, its arguments, pipelines, ``if``/``while``/``{ }``
bodies). Each ``{{ }}`` stands in that text as one word character
(:data:`_EXPR`) and is judged where it stands. ``{{ x | raw_int }}`` prints only
digits, so it is allowed anywhere.

Refused:

* ``{% include %}``, ``{% import %}``, ``{% from %}`` and ``{% extends %}`` (they
  pull in files that are never linted: a recipe is one template file), and any
  tag but ``if``/``elif``/``else``, ``for``, ``set`` and ``with`` (``macro``,
  ``call``, ``filter``, ``autoescape`` and ``block`` print text that is not
  linted where it lands, or rewrite the values' quoting).
* A ``{% %}`` tag anywhere but in plain script text: inside quotes, ``$( )`` or
  backticks within quotes, ``$(( ))``, ``${ }``, a shell comment, a heredoc
  body or its ``<<WORD`` line, or between two non-blank characters (each tag
  needs a blank or newline on one side, so a word never spans a tag). The text
  is read with every branch rendered, one after the other; so that each branch
  and loop pass renders in the same shell state, every tag of one block (``if``
  ... ``elif`` ... ``else`` ... ``endif``; ``for`` ... ``endfor``) must stand in
  the same state (same command, same nesting), and the text around the block's
  tags must keep words apart in any rendering (see :meth:`_Scanner.check_block`).
* A template that ends inside quotes, ``$( )``, backticks, ``$(( ))``, ``${ }``
  or an unterminated heredoc, or that has a ``'`` or ``$'`` never closed.
* ``{{ }}`` where its quotes are literal or close other quotes: inside
  ``"..."``, ``'...'``, ``$'...'``, an unquoted heredoc body, right after a
  backslash or ``$``, in a heredoc delimiter, and in ``${...}`` within quotes.
* ``{{ }}`` where the shell evaluates the word as code even quoted: in
  arithmetic (``$(( ))``, ``(( ))``, ``$[ ]``), in ``[[ ]]`` (its ``-eq``/``-v``
  operands evaluate ``a[$(cmd)]``), in ``${name:offset:length}`` and any array
  subscript (``${a[...]}``, ``a[...]=``), in a ``NAME=( ... )`` array
  assignment, in the value of ``BASH_ENV``, ``ENV``, ``SHELLOPTS``,
  ``BASHOPTS``, ``PROMPT_COMMAND`` or ``PS0``-``PS4``, and as an argument of the
  builtins in :data:`_CODE_COMMANDS` (``eval``, ``let``, ``trap``, ``source``,
  ``.``, ``declare``, ``typeset``, ``local``, ``unset``, ``read``, ``mapfile``,
  ``alias``, ``shopt`` ...), of ``printf -v`` (and as printf's first argument,
  which could be ``-v``), of ``set`` (unless after ``--``), of ``export`` and
  ``readonly`` (unless it is the value of a literal ``NAME=``, with no options),
  as the operand of ``test``/``[`` ``-v``/``-R`` or right after another value
  there, and of the commands that run a shell on their arguments (``su``,
  ``ssh``, ``watch``, ``flock``, ``runuser``).
* ``{{ }}`` in the arguments of an interpreter (:data:`_INTERPRETERS`: ``bash``,
  ``sh`` and other shells, ``sudo``, ``python``, ``perl``, ``ruby``, ``node``,
  ``awk``, ``sed``), wherever its word stands in the command (``srun bash -c``,
  ``apptainer exec img python3 -c``), before the interpreter's first operand
  (a value there could be ``-c``) or after a code flag (``-c``, ``-lc``,
  ``-e``...; for shells anywhere after the shell).
* ``{{ }}`` that becomes code read from stdin: in a here-string, a heredoc body
  (quoted or not), ``< WORD`` or ``< <( )`` of a command that reads its program
  from stdin (an interpreter with no operand or ``-``/``/dev/stdin``, ``bash -s``,
  ``source``, ``xargs``, a command named by a value or variable, a compound
  command that holds one, a bare ``exec``), or in an earlier stage of a pipeline
  into one; any ``{{ }}`` piped into a compound command (``| while ...``,
  ``| { ...; }``); and such a reader inside ``>( )``.
* ``{{ }}`` in the arguments of a command whose name is a value or an expansion
  (``{{ tool }} {{ arg }}``, ``"$CMD" {{ arg }}``: it could be ``eval`` or
  ``bash -c``), and in a ``$( )`` whose output lands in any refused place above
  (the output is read there too) or names a command.
* ``declare``/``typeset``/``local`` with the integer attribute (``-i``) anywhere:
  every later assignment to such a variable is evaluated as arithmetic.
* xtrace, anywhere in the text (comments and heredoc bodies included): ``set``
  with a flag containing ``x``, ``xtrace`` (``set -o xtrace``, ``shopt -so
  xtrace``), ``bash -x`` (or another shell with such a flag), ``BASH_XTRACEFD``
  and ``PS4``: a trace would write the job's secrets, such as its upstream key,
  into the job's log, which the API serves.

Allowed: ``{{ }}`` as a plain word or part of one (``--model={{ m }}``,
``"text "{{ x }}``), as a variable assignment's value (``X={{ x }}``), the value
of ``export NAME=``, in ``$( )`` (also within quotes or an unquoted heredoc),
in ``${x:-{{ y }}}`` in plain context, as a redirection target, as the word
after ``<<<`` (``read -r -a ARGS <<< {{ x }}`` reads it as data), in an
interpreter's arguments after its script or module (``python3 serve.py
--port {{ p }}``), and as the command word itself (see the limits).

Allowed although not strictly safe: ``{{ }}`` in a shell comment or in the body
of a quoted heredoc (``<<'EOF'``) fed to a command that does not read code. A
value with a newline ends the comment, or can repeat the delimiter line, there;
``check_variable`` refuses control characters in every request value, whatever
a recipe's ``pattern``; runtime values come from the recipe and the site overlay.

Known limits, which a recipe's author must mind:

* Values are not followed through variables, functions or aliases the template
  defines: ``X={{ x }}`` is allowed, and then ``eval "$X"``, ``$(( X ))``,
  ``[[ $X -eq 1 ]]``, ``${!X}``, a function that evals ``$1`` or a pipeline
  into a function that runs ``bash`` run its code. For numbers use
  ``{{ x | raw_int }}``.
* A ``{{ }}`` that names the program to run (the command word, or after
  ``exec``, ``env``, ``srun``, ``timeout``...) is not judged, and when it is
  an argument of such a launcher (``srun {{ a }} -c {{ b }}``) neither are the
  words after it; nor are values choosing files the job loads (``PATH=``,
  ``LD_PRELOAD=``, ``PYTHONPATH=``).
* Programs outside :data:`_INTERPRETERS` and :data:`_CODE_COMMANDS` that run an
  argument as code (``php -r``, ``Rscript -e``, ``find -exec`` with a value as
  the command...) are not recognised.
* Bash semantics are assumed (checked against bash 5.2: ``[ ]``, ``printf %d``,
  ``exit``, ``shift`` and ``ulimit`` do not evaluate ``a[$(cmd)]``;
  ``export``/``readonly NAME=value`` do not re-read ``(...)``).
* The reader is not a full shell parser: unusual syntax (a ``{`` or ``fi``
  that is not at a command's start, ``esac`` after a pattern without ``;;``,
  ``exec 3<<<`` taken for stdin) can make it misjudge where a command starts or
  what it reads. Such templates are mostly refused, or are not valid shell.
"""

from __future__ import annotations

import enum
import re
from bisect import bisect_right
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NoReturn

import jinja2
from jinja2 import nodes

from gateway.core.errors import RecipeError

# Stands for one {{ }} in the shell text: a word character (its offset is what counts).
_EXPR = "\x00"
# Characters that end an unquoted word (and so may start a comment after them).
_BREAKS = frozenset(" \t\n;&|()<>")
_BLANKS = frozenset(" \t\n")

# -- Jinja tags -------------------------------------------------------------------------------
_OPEN_TAGS = frozenset({"if", "for", "with", "set"})  # `set x = ...` has no body
_MIDDLE_TAGS = frozenset({"elif", "else"})
_CLOSE_TAGS = frozenset({"endif", "endfor", "endwith", "endset"})
_FILE_TAGS = frozenset({"include", "import", "from", "extends"})
_OTHER_TAGS = {
    "macro": "a macro's text is printed unquoted, and unlinted, where {% call %} uses it",
    "call": "it prints a macro's text unquoted, and unlinted, where it stands",
    "filter": "it rewrites the rendered text, the values' quoting included",
    "autoescape": "HTML escaping rewrites the values' quotes",
    "block": "blocks serve template inheritance, which a recipe can't use",
}

# -- shell words ------------------------------------------------------------------------------
# Reserved words after which a command word is still to come.
_KEYWORDS = frozenset({"!", "then", "else", "elif", "do"})
# Reserved words that open a compound command, and the word that closes it.
_COMPOUND = {
    "{": "}",
    "if": "fi",
    "while": "done",
    "until": "done",
    "for": "done",
    "select": "done",
    "case": "esac",
}
# Commands that run the next word as the command (their options are skipped).
_WRAPPERS = frozenset({"command", "builtin", "exec", "env", "nohup", "time"})
_CODE_COMMANDS = {
    "eval": "eval runs its arguments as shell code",
    "let": "let evaluates its arguments as arithmetic, which runs a[$(cmd)]",
    "trap": "trap runs its first argument as shell code",
    "source": "source runs a file as shell code",
    ".": ". runs a file as shell code",
    "declare": "declare evaluates NAME[sub]= subscripts and re-reads '(...)' values of arrays",
    "typeset": "typeset evaluates NAME[sub]= subscripts and re-reads '(...)' values of arrays",
    "local": "local evaluates NAME[sub]= subscripts and, with -a, re-reads '(...)' values",
    "unset": "unset evaluates the subscripts of the names it is given",
    "read": "read assigns to the names it is given, whose subscripts are evaluated "
    "(read ... <<< {{ x }} reads a value as data)",
    "mapfile": "mapfile assigns to the name it is given and runs its -C callback",
    "readarray": "readarray assigns to the name it is given and runs its -C callback",
    "getopts": "getopts assigns to the name it is given",
    "alias": "an alias's text is read as shell code",
    "enable": "enable -f loads a shared library into the shell",
    "compgen": "compgen expands its -W word list and runs its -C command",
    "complete": "complete expands its -W word list and runs its -C command",
    "fc": "fc runs commands from the history",
    "shopt": "shopt changes the shell's options",
    "su": "su -c runs a shell command, and su reads options anywhere",
    "runuser": "runuser -c runs a shell command, and it reads options anywhere",
    "ssh": "ssh runs its arguments through the remote shell",
    "watch": "watch runs its arguments through sh -c",
    "flock": "flock -c runs a shell command",
}
_DECLARE = frozenset({"declare", "typeset", "local"})
# Commands that run what they read from stdin (xargs: as the arguments of a command).
_STDIN_COMMANDS = frozenset({"source", ".", "xargs", "parallel"})
_STDIN_FILES = frozenset({"-", "/dev/stdin", "/dev/fd/0", "/proc/self/fd/0"})
# Variables whose value the shell expands, evaluates as arithmetic or obeys.
_SPECIAL_ASSIGNMENT = re.compile(
    r"(?<![A-Za-z0-9_])(BASH_ENV|ENV|SHELLOPTS|BASHOPTS|PROMPT_COMMAND|BASH_XTRACEFD|PS[0-4]"
    r"|RANDOM|SRANDOM|OPTIND|HISTCMD)\+?="
)
_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\[[^\]]*\])?\+?=")
_IN_SUBSCRIPT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\[[^\]]*\Z")
_FD = re.compile(r"[0-9]+|\{[A-Za-z_][A-Za-z0-9_]*\}")


@dataclass(frozen=True)
class _Interpreter:
    """How a program that runs code reads its command line."""

    code: str  # short flags after which the arguments are code (-c)
    stdin: str = ""  # short flags that make it read its program from stdin (bash -s)
    takes_arg: frozenset[str] = frozenset()  # options whose next word is their argument
    names_operand: frozenset[str] = frozenset()  # options whose argument is the operand (-m)
    long_code: frozenset[str] = frozenset()  # long options that take code
    code_anywhere: bool = False  # a code flag counts even after the operand
    reads_stdin: bool = True  # reads its program from stdin without an operand


_SHELL = _Interpreter(
    code="c",
    stdin="s",
    takes_arg=frozenset({"-o", "+o", "-O", "+O", "--rcfile", "--init-file"}),
    long_code=frozenset({"--command"}),
    code_anywhere=True,
)
_INTERPRETERS = {
    **dict.fromkeys(["sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "yash"], _SHELL),
    "sudo": _Interpreter(
        code="si",
        takes_arg=frozenset(
            {"-u", "-g", "-C", "-D", "-h", "-p", "-r", "-t", "-U", "-T", "-R"}
            | {"--user", "--group", "--close-from", "--chdir", "--host", "--prompt"}
            | {"--role", "--type", "--other-user", "--command-timeout", "--chroot"}
        ),
        long_code=frozenset({"--shell", "--login"}),
    ),
    "perl": _Interpreter(code="eE"),
    "ruby": _Interpreter(code="e", takes_arg=frozenset({"-I", "-r", "-C"})),
    "node": _Interpreter(
        code="ep", takes_arg=frozenset({"-r", "--require"}), long_code=frozenset({"--eval"})
    ),
    **dict.fromkeys(
        ["awk", "gawk", "mawk", "nawk"],
        _Interpreter(
            code="e",
            takes_arg=frozenset({"-f", "-v", "-F", "--file", "--assign", "--field-separator"}),
            long_code=frozenset({"--source"}),
            reads_stdin=False,
        ),
    ),
    **dict.fromkeys(
        ["sed", "gsed"],
        _Interpreter(
            code="e",
            takes_arg=frozenset({"-f", "-l", "--file"}),
            long_code=frozenset({"--expression"}),
            reads_stdin=False,
        ),
    ),
}
_PYTHON = _Interpreter(
    code="c", takes_arg=frozenset({"-W", "-X", "-Q"}), names_operand=frozenset({"-m"})
)
_PYTHON_NAME = re.compile(r"(python|pypy)[0-9.]*")


def _fill(reason: str, **names: str | int) -> str:
    """``reason`` with ``{name}`` replaced (its ``{{ }}`` and ``{% %}`` stay as they are)."""
    for key, value in names.items():
        reason = reason.replace("{" + key + "}", str(value))
    return reason


def _interpreter(word: str) -> tuple[str, _Interpreter] | None:
    base = word.rsplit("/", 1)[-1]
    if base in _INTERPRETERS:
        return base, _INTERPRETERS[base]
    if base in ("nodejs",):
        return base, _INTERPRETERS["node"]
    if _PYTHON_NAME.fullmatch(base):
        return base, _PYTHON
    return None


# -- reasons ----------------------------------------------------------------------------------
_DQUOTE = (
    "{{ }} inside double quotes: the value is shell-quoted, so write it outside "
    'the quotes, e.g. "text "{{ x }}'
)
_HEREDOC = (
    "{{ }} inside an unquoted heredoc body: the shell expands $( ) there and the "
    "value's quotes are literal; quote the delimiter (<<'EOF') or set a variable "
    "before the heredoc and use it inside"
)
_ARITH = (
    "{{ }} inside $(( )), (( )) or $[ ]: arithmetic is expanded as in double quotes, so "
    "the value's quotes are literal, and it evaluates a[$(cmd)]; use {{ x | raw_int }}"
)
_PARAM = (
    "{{ }} inside ${...} within double quotes, a heredoc or $(( )): the value's "
    "quotes are literal there; set a variable outside the quotes and use it instead"
)
_PARAM_NAME = "{{ }} in the name of a ${...} expansion: the shell reads it as a name"
_SUBSTRING = (
    "{{ }} in a ${name:offset:length} expansion: offset and length are arithmetic, "
    "which evaluates a[$(cmd)] even quoted; use {{ x | raw_int }}"
)
_SUBSCRIPT = (
    "{{ }} in an array subscript: subscripts are arithmetic, which evaluates a[$(cmd)] "
    "even quoted; use {{ x | raw_int }}"
)
_COMPOUND_ASSIGN = (
    "{{ }} inside a NAME=( ... ) array assignment: an element written [k]=v evaluates k "
    "as arithmetic; assign the value to a variable first, or use read -r -a NAME <<< {{ x }}"
)
_SQUOTE = (
    "{{ }} inside single quotes: the value is shell-quoted, so close the quotes "
    "before it, e.g. 'text '{{ x }}"
)
_ANSI = "{{ }} inside $'...': the value's quotes would end the string; write it outside"
_AFTER_BACKSLASH = "{{ }} right after a backslash: it would escape the value's opening quote"
_AFTER_DOLLAR = "{{ }} right after $: the shell would read the value's quotes as $'...'"
_DELIMITER = "{{ }} in a heredoc delimiter: whether the body expands would depend on the value"
_DBRACKET = (
    "{{ }} inside [[ ]]: its arithmetic operators (-eq, -lt...) and -v evaluate a[$(cmd)] "
    "in their operands even quoted; use [ ] with a variable, or {{ x | raw_int }}"
)
_SPECIAL = (
    "{{ }} as the value of {name}: the shell expands, evaluates as arithmetic or obeys "
    "that variable's value"
)
_DUP = (
    "{{ }} after >& or <&: bash expands a target that is not a number a second time, "
    "which runs its $(cmd); write >file 2>&1, or use {{ x | raw_int }}"
)
_CODE_ARG = "{{ }} as an argument of {name}: {why}"
_EXPORT = (
    "{{ }} as an argument of {name}: only the value of a literal NAME=, with no options, "
    "is data there (with -a or an existing array it is re-read as code)"
)
_PRINTF = (
    "{{ }} as printf's first argument or after printf -v: -v NAME assigns to NAME, whose "
    "subscript evaluates a[$(cmd)]; write a literal format first"
)
_SET = (
    "{{ }} as an argument of set: a value like -x or -o xtrace would change the shell's "
    "options; use set -- {{ x }}"
)
_TEST = (
    "{{ }} as the operand of test -v/-R, or right after another {{ }} in test or [ ]: "
    "-v evaluates a[$(cmd)], and a value could itself be -v"
)
_INTERP_OPTIONS = (
    "{{ }} where {name} reads its options: a value like -c would make the next word code; "
    "write the script, module or program first"
)
_INTERP_CODE = "{{ }} after {name} {flag}: its arguments are run as code"
_ENV_SPLIT = "{{ }} after env -S: env splits that string into a command line"
_VALUE_COMMAND = (
    "{{ }} in the arguments of a command whose name is a {{ }} or an expansion: it "
    "could be eval or bash -c; name the command literally"
)
_SUBST_COMMAND = (
    "{{ }} in a $( ) or ` ` that stands as a command's name: its output names the "
    "command and its arguments"
)
_SUBST = "{{ }} in a $( ), ` ` or <( ) whose output is read as code: "
_STDIN_CODE = (
    "{{ }} that reaches the stdin of {name}, which reads its program from stdin (a "
    "here-string, heredoc, < <( ) or a pipeline into it)"
)
_OUTPUT_CODE = (
    "a >( ) holding {name}, which reads its program from stdin: what is written there becomes code"
)
_PIPE_COMPOUND = (
    "{{ }} piped into a compound command ({ }, ( ), while, if, for, case): what reads "
    "it there is not followed; pipe into a simple command"
)
_INTEGER = (
    "{name} {flag}: integer variables evaluate every value assigned to them as "
    "arithmetic, which runs a[$(cmd)]; use {{ x | raw_int }} and plain variables"
)
_XTRACE = (
    "xtrace ({what}): a trace would write the job's secrets, such as its upstream key, "
    "into the job's log, which the API serves"
)
_TAG_FILE = (
    "{% {name} %} pulls in another file, which is never linted: a recipe is one template file"
)
_TAG_OTHER = "{% {name} %} is not allowed in a recipe template (only if, for, set and with): {why}"
_TAG_PLACE = (
    "{% {name} %} {where}: every {% %} tag must stand in plain script text, so that "
    "each branch renders in the same shell state; put it on its own line"
)
_TAG_BLANKS = (
    "{% {name} %} between two non-blank characters: put a blank or newline before or "
    "after it, or a branch's text would run into the next word"
)
_TAG_STATE = (
    "{% {name} %} stands in another shell state than {% {first} %} on line {line} "
    "(another command, or inside another construct): every tag of one block must stand "
    "where the shell is in the same state, e.g. each on its own line"
)
_TAG_GLUE = (
    "{% {name} %} at line {line}: in some rendering the text before one of this "
    "block's tags would run into the text after another without a blank; put a blank "
    "before each of its tags, or after each"
)
_END = "the template ends inside {what} opened on this line"


class _Kind(enum.Enum):
    PLAIN = "plain"  # the script itself, $( ) or ` `: a value is one word here
    ARITH = "arith"  # $(( )), (( )) or $[ ]: expanded like double quotes, quotes literal
    PARAM = "param"  # ${ }: as safe as what surrounds it, but for name, subscript, offset
    DQUOTE = "dquote"
    HEREDOC = "heredoc"  # body of an unquoted heredoc: expanded, quotes literal


_OPENED = {
    _Kind.ARITH: "arithmetic",
    _Kind.PARAM: "a ${...} expansion",
    _Kind.DQUOTE: "double quotes",
}


@dataclass(frozen=True)
class _Tag:
    line: int
    name: str
    opens: bool  # if, for, with, set (without =): a block with a body


@dataclass
class _Expr:
    line: int
    raw_int: bool  # `x | raw_int` prints only digits, so it is safe anywhere


@dataclass(eq=False)
class _Pipeline:
    values: list[tuple[int, int]] = field(default_factory=list)  # (offset, stage) of {{ }}
    code_stage: int | None = None  # the first stage that reads code from stdin


@dataclass(eq=False)
class _Cmd:
    """The simple command (one pipeline stage) being read in a script frame."""

    pipeline: _Pipeline = field(default_factory=_Pipeline)
    stage: int = 0
    touched: bool = False  # a word or redirection has been read
    started: bool = False  # the command word has been read
    name: str = ""  # the command word; "" when it held a {{ }} or an expansion
    value_name: bool = False  # the command word held a {{ }} or an expansion
    skip: int = 0  # words to skip before the command word (function NAME)
    wrapper: str = ""  # exec, env...: their options are skipped, the next word is the command
    coproc: bool = False
    danger: str = ""  # every further {{ }} of this command is refused with this reason
    mode: str = ""  # "dbracket", "export", "printf", "set", "test"
    opts: bool = False  # export: an option was given; printf: first argument read; set: --
    prev: str = ""  # test: the previous word
    prev_value: bool = False  # test: the previous word held a {{ }}
    interp: str = ""  # the last interpreter among the words
    spec: _Interpreter | None = None
    operand: str | None = None  # the interpreter's first operand
    skip_arg: str = ""  # the interpreter option whose argument comes next
    code_flag: bool = False
    stdin_flag: bool = False
    compound: bool = False  # the command is a compound command just closed
    compound_code: bool = False  # ... holding a command that reads code from stdin
    redirect: str = ""  # the next word is the target of this redirection operator
    herestring: bool = False  # the next word follows <<<
    stdin_values: list[int] = field(default_factory=list)  # {{ }} reaching its stdin

    def key(self) -> tuple[object, ...]:
        """What must be the same at every tag of one block."""
        skip = ("pipeline", "stdin_values", "spec")
        own = tuple(getattr(self, f.name) for f in fields(self) if f.name not in skip)
        return (self.pipeline.code_stage, *own)


@dataclass(eq=False)
class _Frame:
    kind: _Kind
    start: int = 0  # offset where it opened
    closer: str = ""  # ")" or "`" for $( ) or ` `, "}"/"fi"/"done"/"esac" for compounds
    depth: int = 0  # unmatched ( (or [ for $[ ]) or { inside this frame
    subst: bool = False  # $( ), ` `, <( ): its output continues a word of the frame below
    compound: bool = False  # a { }, if, while... or ( ) compound command
    inner_code: bool = False  # compound: holds a command that reads code from stdin
    head: bool = False  # case: its `WORD in` is still to come
    taint: str = ""  # a {{ }} anywhere inside is refused with this reason
    deny: str = ""  # a {{ }} directly inside is refused with this reason
    part: str = ""  # PARAM: "start", "name", "op", "subscript", "substring" or "word"
    count: int = 0  # PARAM: characters of the name read
    feeds: _Cmd | None = None  # <( ) target of <: the command whose stdin it is
    output: bool = False  # >( ): what the command writes there is its stdin
    cmd: _Cmd = field(default_factory=_Cmd)  # PLAIN: the command being read
    word: list[str] | None = None  # PLAIN: the word being read (quotes removed)
    word_value: bool = False
    word_dynamic: bool = False  # it holds an expansion
    word_quoted: bool = False

    def key(self) -> tuple[object, ...]:
        return (
            self.kind,
            self.closer,
            self.depth,
            self.subst,
            self.compound,
            self.taint,
            self.deny,
            self.head,
            self.cmd.key() if self.kind is _Kind.PLAIN else None,
        )


@dataclass
class _Heredoc:
    delimiter: str
    strip_tabs: bool  # <<- : leading tabs are removed before matching the end line
    quoted: bool  # any quoting in the delimiter: the body is not expanded
    start: int  # offset of the <<
    cmd: _Cmd  # the command whose stdin it is


@dataclass
class _TagState:
    tag: _Tag
    prev_blank: bool  # a blank (or the start) stands right before it
    next_blank: bool  # a blank (or the end) stands right after it
    state: tuple[object, ...] | None = None  # the shell state at the next word boundary


def lint_template(source: str, path: Path, env: jinja2.Environment) -> None:
    """Raise :class:`RecipeError` at the first ``{{ }}`` or tag the shell quoting can't protect."""
    text, exprs, tags, lines = _shell_text(source, path, env)
    scanner = _Scanner(text, exprs, tags, lines, path)
    scanner.xtrace()
    scanner.run()


def _shell_text(
    source: str, path: Path, env: jinja2.Environment
) -> tuple[str, dict[int, _Expr], dict[int, list[_Tag]], list[tuple[int, int]]]:
    """The template's literal text with :data:`_EXPR` for each ``{{ }}``, and where tags stand.

    Returns the text, the expressions and the tags keyed by offset (a tag at offset
    ``n`` stands right before ``text[n]``), and ``(offset, line)`` where each piece of
    text starts.
    """
    parts: list[str] = []
    exprs: dict[int, _Expr] = {}
    tags: dict[int, list[_Tag]] = {}
    lines: list[tuple[int, int]] = []
    offset = 0
    begin = 0  # the line of the {{ or {% being read
    expr: list[str] | None = None  # the source of the expression being read
    tag: list[str] | None = None  # the names and operators of the tag being read
    try:
        for line, kind, value in env.lex(source):
            if expr is not None:
                if kind != "variable_end":
                    expr.append(value)
                    continue
                exprs[offset] = _Expr(begin, _is_raw_int(expr, env))
                lines.append((offset, begin))
                parts.append(_EXPR)
                offset += 1
                expr = None
            elif tag is not None:
                if kind in ("name", "operator"):
                    tag.append(value)
                elif kind == "block_end":
                    tags.setdefault(offset, []).append(_tag(tag, begin, path))
                    tag = None
            elif kind == "data":
                # Only offsets in `exprs` are expressions; a stray NUL is just a character.
                lines.append((offset, line))
                parts.append(value)
                offset += len(value)
            elif kind == "variable_begin":
                begin, expr = line, []
            elif kind == "block_begin":
                begin, tag = line, []
            # Anything else ({# #}, {% raw %}) prints no shell text of its own.
    except jinja2.TemplateSyntaxError as exc:
        raise RecipeError(f"{path}:{exc.lineno}: template: {exc.message}") from None
    return "".join(parts), exprs, tags, lines


def _tag(tokens: list[str], line: int, path: Path) -> _Tag:
    name = tokens[0] if tokens else ""
    if name in _FILE_TAGS:
        raise RecipeError(f"{path}:{line}: {_fill(_TAG_FILE, name=name)}")
    if name not in _OPEN_TAGS | _MIDDLE_TAGS | _CLOSE_TAGS:
        why = _OTHER_TAGS.get(name, "it is not one of them")
        raise RecipeError(f"{path}:{line}: {_fill(_TAG_OTHER, name=name, why=why)}")
    # `set x = ...` has no body; `set x %}...{% endset` has.
    return _Tag(line, name, name in _OPEN_TAGS and not (name == "set" and "=" in tokens))


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


_XTRACE_PATTERNS = [
    (re.compile(r"\bxtrace\b"), "xtrace"),
    (re.compile(r"\bBASH_XTRACEFD\b"), "BASH_XTRACEFD"),
    (re.compile(r"\bPS4\b"), "PS4"),
]
# `set` or a shell as a word, and the rest of its simple command on the line.
_SET_WORDS = re.compile(r"(?<![\w$./-])set(?=[ \t])([^\n;&|)#]*)")
_SHELL_WORDS = re.compile(
    r"(?<![\w$.-])(?:[\w./-]*/)?(?:sh|bash|dash|zsh|ksh|mksh|ash|yash)(?=[ \t])([^\n;&|)#]*)"
)


class _Scanner:
    def __init__(
        self,
        text: str,
        exprs: dict[int, _Expr],
        tags: dict[int, list[_Tag]],
        lines: list[tuple[int, int]],
        path: Path,
    ) -> None:
        self.text = text
        self.exprs = exprs
        self.tags = tags
        self.starts = [offset for offset, _ in lines]
        self.lines = [line for _, line in lines]
        self.path = path
        self.blank = True  # the last character read in script context was a blank
        self.blocks: list[list[_TagState]] = []  # open {% if %}/{% for %}... blocks
        self.closed: list[list[_TagState]] = []  # closed blocks not checked yet
        self.deferred: list[_TagState] = []  # tags whose state is taken at the next blank

    # -- errors ------------------------------------------------------------------------------
    def line_at(self, at: int) -> int:
        if at in self.exprs:
            return self.exprs[at].line
        k = bisect_right(self.starts, at) - 1
        if k < 0:
            return 1
        return self.lines[k] + self.text.count("\n", self.starts[k], at)

    def fail(self, at: int, reason: str) -> NoReturn:
        raise RecipeError(f"{self.path}:{self.line_at(at)}: {reason}")

    def fail_tag(self, tag: _Tag, reason: str) -> NoReturn:
        raise RecipeError(f"{self.path}:{tag.line}: {reason}")

    def check_span(self, start: int, end: int, reason: str) -> None:
        """Refuse any expression in text[start:end] (a string that can't hold one)."""
        for at in range(start, end):
            if at in self.exprs and not self.exprs[at].raw_int:
                self.fail(at, reason)

    def tags_inside(self, start: int, end: int, where: str) -> None:
        """Refuse tags standing at offsets start..end-1 (inside one shell token)."""
        for at in range(start, end):
            for tag in self.tags.get(at, ()):
                self.fail_tag(tag, _fill(_TAG_PLACE, name=tag.name, where=where))

    # -- xtrace ------------------------------------------------------------------------------
    def xtrace(self) -> None:
        text = self.text
        for pattern, what in _XTRACE_PATTERNS:
            if found := pattern.search(text):
                self.fail(found.start(), _fill(_XTRACE, what=what))
        for found in _SET_WORDS.finditer(text):
            words = found[1].replace('"', " ").replace("'", " ").split()
            if any(re.fullmatch(r"-[A-Za-z]*x[A-Za-z]*", w) for w in words):
                self.fail(found.start(), _fill(_XTRACE, what="set -x"))
        for found in _SHELL_WORDS.finditer(text):
            for word in found[1].replace('"', " ").replace("'", " ").split():
                if not word.startswith("-") or word.startswith("--"):
                    break
                if "x" in word:
                    self.fail(found.start(), _fill(_XTRACE, what=f"a shell's {word}"))

    # -- the reader --------------------------------------------------------------------------
    def run(self) -> None:
        stack = [_Frame(_Kind.PLAIN)]
        pending: list[_Heredoc] = []
        end = len(self.text)
        self.scan(0, end, stack, pending)
        if end in self.tags:
            self.at_tags(end, stack, pending)
        if stack[-1].kind is _Kind.PLAIN:
            self.end_word(stack, end)
            self.take_deferred(stack)
        for heredoc in pending:
            self.fail(heredoc.start, f"heredoc <<{heredoc.delimiter} never ends")
        self.check_open(stack)
        while len(stack) > 1:
            self.close_plain(stack)
        self.end_stage(stack[0], stack)
        self.check_blocks()

    def check_open(self, stack: list[_Frame]) -> None:
        for frame in stack[1:]:
            if frame.kind in _OPENED:
                self.fail(frame.start, _fill(_END, what=_OPENED[frame.kind]))
            if frame.subst:
                what = "backticks" if frame.closer == "`" else "a $( ) command substitution"
                self.fail(frame.start, _fill(_END, what=what))

    def scan(self, i: int, end: int, stack: list[_Frame], pending: list[_Heredoc]) -> None:
        """Read text[i:end] starting inside ``stack``."""
        while i < end:
            if i in self.tags:
                self.at_tags(i, stack, pending)
            j = self.step(i, end, stack, pending)
            self.tags_inside(i + 1, min(j, end), self.where(i))
            i = j

    def where(self, i: int) -> str:
        c = self.text[i]
        if c == "'":
            return "inside single quotes"
        if c == "#":
            return "inside a shell comment"
        if c == "\\":
            return "inside a backslash escape"
        if c == "\n":
            return "inside a heredoc body"
        if c in "<>&|;":
            return "inside a shell operator or heredoc delimiter"
        return "inside a shell token"

    def step(self, i: int, end: int, stack: list[_Frame], pending: list[_Heredoc]) -> int:
        """Read the token at ``i``; return where the next one starts."""
        text = self.text
        frame = stack[-1]
        kind = frame.kind
        c = text[i]
        nxt = text[i + 1] if i + 1 < end else ""
        shell_syntax = kind in (_Kind.PLAIN, _Kind.ARITH, _Kind.PARAM)
        was_blank, self.blank = self.blank, False
        if i in self.exprs:
            self.value(i, stack)
            return i + 1
        if c == "\\":
            if i + 1 in self.exprs:
                # \'value' escapes the value's opening quote in plain context.
                if shell_syntax and not self.exprs[i + 1].raw_int:
                    self.fail(i + 1, _AFTER_BACKSLASH)
                return i + 1  # the expression itself is read next
            if nxt == "\n" and kind is not _Kind.HEREDOC:
                self.blank = was_blank  # a line continuation is removed altogether
            elif kind is _Kind.PLAIN or kind is _Kind.DQUOTE:
                self.add(stack, nxt, quoted=True)
            # Escapes the next character everywhere we get here ("..." and heredoc
            # bodies only for some, but skipping one more never hides a quote).
            return min(i + 2, end)
        if c == "$":
            return self.dollar(i, end, stack, shell_syntax)
        if c == "`":
            if kind is _Kind.PLAIN and frame.closer == "`":
                self.close_plain(stack)
            else:
                self.open_subst(stack, i, "`")
            return i + 1
        if kind is _Kind.DQUOTE:
            if c == '"':
                stack.pop()
            else:
                self.add(stack, c)
            return i + 1
        if kind is _Kind.HEREDOC:
            return i + 1  # quotes are literal here; only $ ` \ matter
        # PLAIN, ARITH or PARAM: shell syntax proper.
        if c == "'":
            close = text.find("'", i + 1, end)
            if close < 0:
                self.fail(i, "a single quote that never closes")
            self.check_span(i + 1, close, _SQUOTE)
            self.add(stack, text[i + 1 : close], quoted=True)
            return close + 1
        if c == '"':
            self.add(stack, "", quoted=True)
            stack.append(_Frame(_Kind.DQUOTE, start=i))
            return i + 1
        if kind is _Kind.PARAM:
            return self.param(i, stack)
        if kind is _Kind.ARITH:
            return self.arith(i, stack)
        return self.plain(i, end, stack, pending)

    def plain(self, i: int, end: int, stack: list[_Frame], pending: list[_Heredoc]) -> int:
        """Read the token at ``i`` in script context: words, operators, comments."""
        text = self.text
        frame = stack[-1]
        c = text[i]
        nxt = text[i + 1] if i + 1 < end else ""
        if c in " \t":
            self.end_word(stack, i)
            self.take_deferred(stack)
            self.blank = True
            return i + 1
        if c == "\n":
            cmd = self.end_word(stack, i)
            self.take_deferred(stack)
            if cmd.mode != "dbracket" and (cmd.touched or cmd.started):
                self.separate(stack)
            self.blank = True
            if pending:
                i = self.heredoc_bodies(i + 1, end, stack, pending)
                pending.clear()
                return i
            return i + 1
        if frame.cmd.mode == "dbracket" and c in "()<>&|":
            # Inside [[ ]] these are operators of the test, not shell syntax.
            self.end_word(stack, i)
            if c == "(":
                frame.depth += 1
            elif c == ")" and frame.depth:
                frame.depth -= 1
            elif c == ")":
                return self.close_paren(i, stack)
            return i + 1
        if c == "#" and frame.word is None:
            close = text.find("\n", i, end)
            return end if close < 0 else close  # the newline itself is read next
        if c == "(":
            return self.open_paren(i, stack, nxt)
        if c == ")":
            if frame.depth:
                frame.depth -= 1  # end of an extglob @( )
                return i + 1
            return self.close_paren(i, stack)
        if c in "<>" and nxt == "(":
            self.end_word(stack, i)
            self.open_subst(stack, i, ")")
            return i + 2
        if c == "<" and nxt == "<":
            cmd = self.end_word(stack, i, before_redirect=True)
            cmd.touched = True
            if text.startswith("<<<", i):
                cmd.herestring = True
                return i + 3
            return self.redirect(i, end, pending, cmd)
        if c in "<>" or (c == "&" and nxt == ">"):
            cmd = self.end_word(stack, i, before_redirect=c != "&")
            cmd.touched = True
            j = i + 1
            while j < end and text[j] in "<>&|" and j - i < 3:
                j += 1
            cmd.redirect = text[i:j]
            return j
        if c == "|":
            self.end_word(stack, i)
            if nxt == "|":
                self.separate(stack)
                return i + 2
            self.separate(stack, pipe=True)
            return i + 2 if nxt == "&" else i + 1
        if c in "&;":
            self.end_word(stack, i)
            self.separate(stack)
            return i + 2 if c == "&" and nxt == "&" else i + 1
        self.add(stack, c)
        return i + 1

    # -- words -------------------------------------------------------------------------------
    def host(self, stack: list[_Frame]) -> _Frame | None:
        """The script frame whose word the character at the top of ``stack`` belongs to."""
        top = stack[-1]
        if top.kind is _Kind.PLAIN:
            return top
        if top.kind is _Kind.DQUOTE and len(stack) > 1 and stack[-2].kind is _Kind.PLAIN:
            return stack[-2]
        return None

    def add(
        self,
        stack: list[_Frame],
        chars: str,
        quoted: bool = False,
        dynamic: bool = False,
        value: bool = False,
    ) -> None:
        frame = self.host(stack)
        if frame is None:
            return
        if frame.word is None:
            frame.word = []
            frame.word_value = frame.word_dynamic = frame.word_quoted = False
        frame.word.append(chars)
        frame.word_quoted |= quoted
        frame.word_dynamic |= dynamic
        frame.word_value |= value

    def end_word(self, stack: list[_Frame], at: int, before_redirect: bool = False) -> _Cmd:
        """The word being read ends at ``at``: see what it means to the command.

        Returns the command being read afterwards (a compound command may have
        opened or closed).
        """
        frame = stack[-1]
        if frame.kind is not _Kind.PLAIN or frame.word is None:
            return frame.cmd
        word = "".join(frame.word)
        quoted, value, dynamic = frame.word_quoted, frame.word_value, frame.word_dynamic
        frame.word = None
        cmd = frame.cmd
        literal = not value and not dynamic
        if before_redirect and literal and not quoted and _FD.fullmatch(word):
            return cmd  # the file descriptor of a redirection: 2>&1
        cmd.touched = True
        if cmd.redirect:
            cmd.redirect = ""
        elif cmd.herestring:
            cmd.herestring = False
        elif not cmd.started:
            self.command_word(stack, word, at, quoted, literal)
        else:
            self.argument(cmd, word, at, literal, value)
            if frame.head and literal and word == "in":
                frame.head = False  # case WORD in: the patterns come next
                self.separate(stack)
        return stack[-1].cmd

    def command_word(
        self, stack: list[_Frame], word: str, at: int, quoted: bool, literal: bool
    ) -> None:
        frame = stack[-1]
        cmd = frame.cmd
        if _ASSIGNMENT.match(word):
            return  # an assignment: the command word is still to come
        if cmd.skip:
            cmd.skip -= 1
            return
        if cmd.wrapper and literal and len(word) > 1 and word[0] in "-+":
            if cmd.wrapper == "env" and (
                word.startswith("--split-string") or (word[1] != "-" and "S" in word)
            ):
                cmd.danger = _ENV_SPLIT
            return
        if cmd.coproc:
            cmd.coproc = False
            if re.match(r"[ \t]*\{[ \t\n]", self.text[at:]):
                return  # coproc NAME { ...; }
        if not literal:
            cmd.started, cmd.name, cmd.value_name = True, "", True
            return
        if not quoted:
            if word in _KEYWORDS:
                return
            if word == "coproc":
                cmd.coproc = True
                return
            if word == "function":
                cmd.skip = 1
                return
            if word in _COMPOUND:
                self.check_piped_compound(cmd)
                closer = _COMPOUND[word]
                stack.append(
                    _Frame(_Kind.PLAIN, start=at, closer=closer, compound=True, head=word == "case")
                )
                return
            if word in ("}", "fi", "done", "esac"):
                if frame.compound and frame.closer == word:
                    self.close_plain(stack)
                return
            if word == "[[":
                cmd.started, cmd.name, cmd.mode = True, word, "dbracket"
                return
        if word in _WRAPPERS:
            cmd.wrapper = word
            return
        cmd.started, cmd.name = True, word
        if word in _CODE_COMMANDS:
            cmd.danger = _fill(_CODE_ARG, name=word, why=_CODE_COMMANDS[word])
        elif word in ("export", "readonly"):
            cmd.mode = "export"
        elif word in ("printf", "set", "test", "["):
            cmd.mode = "test" if word == "[" else word
        self.maybe_interpreter(cmd, word)

    def maybe_interpreter(self, cmd: _Cmd, word: str) -> bool:
        found = _interpreter(word)
        if found is None:
            return False
        cmd.interp, cmd.spec = found
        cmd.operand, cmd.skip_arg, cmd.stdin_flag = None, "", False
        return True

    def argument(self, cmd: _Cmd, word: str, at: int, literal: bool, value: bool) -> None:
        if cmd.mode == "dbracket":
            if literal and word == "]]":
                cmd.mode = ""
            return
        if cmd.name in _DECLARE and literal and word[:1] in "-+" and "i" in word[1:]:
            self.fail(at - 1, _fill(_INTEGER, name=cmd.name, flag=word))
        if cmd.mode == "export" and word[:1] in "-+":
            cmd.opts = True
        elif cmd.mode == "printf" and not cmd.opts:
            cmd.opts = True
            if word.startswith("-v") or not literal:
                cmd.danger = _PRINTF
        elif cmd.mode == "set" and word == "--":
            cmd.opts = True
        elif cmd.mode == "test":
            cmd.prev, cmd.prev_value = (word if literal else ""), value
        if cmd.spec is not None:
            self.interpreter_word(cmd, word, literal)
        elif literal:
            self.maybe_interpreter(cmd, word)

    def interpreter_word(self, cmd: _Cmd, word: str, literal: bool) -> None:
        spec = cmd.spec
        assert spec is not None
        if cmd.skip_arg:
            if cmd.skip_arg in spec.names_operand:
                cmd.operand = word  # python -m MODULE
            cmd.skip_arg = ""
            return
        flag = literal and len(word) > 1 and word[0] in "-+" and word != "--"
        if flag and word.startswith("--"):
            option = word.split("=", 1)[0]
            if option in spec.long_code and (cmd.operand is None or spec.code_anywhere):
                cmd.code_flag = True
                cmd.danger = _fill(_INTERP_CODE, name=cmd.interp, flag=option)
            elif cmd.operand is None and option in spec.takes_arg and "=" not in word:
                cmd.skip_arg = option
            return
        if flag and (cmd.operand is None or spec.code_anywhere) and word[0] == "-":
            if any(letter in spec.code for letter in word[1:]):
                cmd.code_flag = True
                cmd.danger = _fill(_INTERP_CODE, name=cmd.interp, flag=word)
            if any(letter in spec.stdin for letter in word[1:]):
                cmd.stdin_flag = True
        if cmd.operand is not None:
            if literal:
                self.maybe_interpreter(cmd, word)  # sudo bash ..., sudo -u x python3 ...
            return
        if flag:
            if word in spec.takes_arg or word in spec.names_operand:
                cmd.skip_arg = word
            return
        if literal and word == "--":
            return
        cmd.operand = word if literal else ""
        if literal:
            found = _interpreter(word)
            if found is not None and cmd.interp == "sudo":
                self.maybe_interpreter(cmd, word)

    # -- commands ----------------------------------------------------------------------------
    def stdin_code(self, cmd: _Cmd) -> str:
        """The name of what reads code from this command's stdin, or ""."""
        if cmd.compound:
            return "a compound command" if cmd.compound_code else ""
        if not cmd.started:
            # exec <<< x: every later command reads the script's stdin.
            return "exec (later commands read the script's stdin)" if cmd.wrapper == "exec" else ""
        if cmd.value_name:
            return "a command named by a {{ }} or an expansion"
        if cmd.name in _STDIN_COMMANDS:
            return cmd.name
        spec = cmd.spec
        if spec is None or not spec.reads_stdin:
            return ""
        if cmd.stdin_flag or cmd.operand in _STDIN_FILES:
            return cmd.interp
        if cmd.operand is None and (not cmd.code_flag or cmd.interp == "sudo"):
            return cmd.interp
        return ""

    def separate(self, stack: list[_Frame], pipe: bool = False) -> None:
        """End the current pipeline stage; start the next stage or a new pipeline."""
        frame = stack[-1]
        cmd = frame.cmd
        self.end_stage(frame, stack)
        if pipe:
            frame.cmd = _Cmd(cmd.pipeline, stage=cmd.stage + 1)
        else:
            frame.cmd = _Cmd()

    def end_stage(self, frame: _Frame, stack: list[_Frame]) -> None:
        cmd = frame.cmd
        name = self.stdin_code(cmd)
        if not name:
            return
        reason = _fill(_STDIN_CODE, name=name)
        earlier = [at for at, stage in cmd.pipeline.values if stage < cmd.stage]
        if earlier:
            self.fail(min(earlier), reason)
        if cmd.stdin_values:
            self.fail(min(cmd.stdin_values), reason)
        for outer in stack:
            if outer.output:
                self.fail(outer.start, _fill(_OUTPUT_CODE, name=name))
        if cmd.pipeline.code_stage is None:
            cmd.pipeline.code_stage = cmd.stage
        for outer in stack:
            if outer.compound:
                outer.inner_code = True

    def check_piped_compound(self, cmd: _Cmd) -> None:
        """A compound command starts as ``cmd``: refuse values piped into it."""
        earlier = [at for at, stage in cmd.pipeline.values if stage < cmd.stage]
        if earlier:
            self.fail(min(earlier), _PIPE_COMPOUND)

    def open_paren(self, i: int, stack: list[_Frame], nxt: str) -> int:
        frame = stack[-1]
        cmd = frame.cmd
        word = "".join(frame.word) if frame.word is not None else None
        if word is None and nxt == "(" and not cmd.started:
            cmd.started, cmd.name, cmd.touched = True, "((", True
            stack.append(_Frame(_Kind.ARITH, start=i, closer=")"))  # (( arithmetic ))
            return i + 2
        if word is not None and _ASSIGNMENT.fullmatch(word):
            # NAME=( elements ): read as a frame of its own; values refused directly in it.
            frame.word_dynamic = True
            child = _Frame(_Kind.PLAIN, start=i, closer=")", deny=_COMPOUND_ASSIGN)
            child.cmd.started = True
            stack.append(child)
            return i + 1
        if word is not None and word[-1:] in ("@", "!", "+", "*", "?"):
            frame.depth += 1  # extglob @( | )
            return i + 1
        self.end_word(stack, i)
        frame = stack[-1]
        if defined := re.match(r"\([ \t]*\)", self.text[i:]):
            frame.cmd = _Cmd()  # NAME ( ): a function's body, a command, comes next
            return i + defined.end()
        if frame.compound and frame.closer == "esac" and not frame.cmd.started:
            return i + 1  # case pattern (a|b): its ) is read as a stray one
        self.check_piped_compound(frame.cmd)
        stack.append(_Frame(_Kind.PLAIN, start=i, closer=")", compound=True))
        return i + 1

    def close_paren(self, i: int, stack: list[_Frame]) -> int:
        self.end_word(stack, i)  # may close a compound: $(if ...; fi)
        if stack[-1].closer == ")":
            self.close_plain(stack)
        else:
            self.separate(stack)  # a stray ): the end of a case pattern (a) or a|b)
        return i + 1

    def close_plain(self, stack: list[_Frame]) -> None:
        """End the script frame on top: $( ), ` `, <( ), ( ) or a compound command."""
        frame = stack[-1]
        self.end_word(stack, frame.start)
        frame = stack[-1]
        self.end_stage(frame, stack)
        stack.pop()
        outer = stack[-1]
        if frame.compound:
            cmd = outer.cmd
            cmd.started = cmd.touched = cmd.compound = True
            cmd.name = frame.closer
            cmd.compound_code = frame.inner_code

    def open_subst(self, stack: list[_Frame], i: int, closer: str) -> None:
        """Open $( ), ` `, <( ) or >( ): its output lands in the word being read."""
        taint = self.taint_for(stack)
        self.add(stack, "$", dynamic=True)
        frame = _Frame(_Kind.PLAIN, start=i, closer=closer, subst=True, taint=taint)
        frame.feeds = self.stdin_of(stack)  # < <( ), <<< "$( )": the command's stdin
        frame.output = self.text.startswith(">(", i)
        stack.append(frame)

    def stdin_of(self, stack: list[_Frame]) -> _Cmd | None:
        """The command whose stdin the word being read is (<<< WORD, < WORD), or None."""
        for frame in reversed(stack):
            if frame.kind is _Kind.PLAIN:
                cmd = frame.cmd
                return cmd if cmd.herestring or cmd.redirect.startswith("<") else None
            if frame.kind not in (_Kind.DQUOTE, _Kind.PARAM):
                return None
        return None

    def taint_for(self, stack: list[_Frame]) -> str:
        """Why a command substitution opening here must hold no {{ }}, or ""."""
        for frame in reversed(stack):
            if frame.taint:
                return frame.taint
            if frame.kind is _Kind.ARITH:
                return _SUBST + _ARITH
            if frame.kind is _Kind.PARAM:
                if frame.part in ("start", "name", "op", "subscript"):
                    return _SUBST + _SUBSCRIPT
                if frame.part == "substring":
                    return _SUBST + _SUBSTRING
                continue
            if frame.kind is _Kind.DQUOTE:
                continue
            if frame.kind is _Kind.HEREDOC or frame.deny:
                return ""
            reason = self.command_reason(frame, subst=True)
            return _SUBST + reason if reason else ""
        return ""

    # -- values ------------------------------------------------------------------------------
    def value(self, at: int, stack: list[_Frame]) -> None:
        if self.exprs[at].raw_int:
            self.add(stack, _EXPR, value=True)
            return
        reason = self.reason(stack)
        if reason:
            self.fail(at, reason)
        self.add(stack, _EXPR, value=True)
        for frame in stack:
            if frame.kind is _Kind.PLAIN:
                frame.cmd.pipeline.values.append((at, frame.cmd.stage))
                if frame.feeds is not None:
                    frame.feeds.stdin_values.append(at)
        if (stdin := self.stdin_of(stack)) is not None:
            stdin.stdin_values.append(at)

    def reason(self, stack: list[_Frame]) -> str:
        """Why a {{ }} at the top of ``stack`` is refused, or ""."""
        for frame in stack:
            if frame.taint:
                return frame.taint
        top = stack[-1]
        if top.kind is _Kind.DQUOTE:
            return _DQUOTE
        if top.kind is _Kind.HEREDOC:
            return _HEREDOC
        if top.kind is _Kind.ARITH:
            return _ARITH
        if top.kind is _Kind.PARAM:
            if top.part in ("start", "name", "op"):
                return _PARAM_NAME
            if top.part == "subscript":
                return _SUBSCRIPT
            if top.part == "substring":
                return _SUBSTRING
            # ${x:-{{ y }}} is fine in plain context, not within "..." or a heredoc.
            outer = next(f for f in reversed(stack) if f.kind is not _Kind.PARAM)
            if outer.kind is not _Kind.PLAIN:
                return _PARAM
            top = outer
        if top.deny:
            return top.deny
        return self.command_reason(top, subst=False)

    def command_reason(self, frame: _Frame, subst: bool) -> str:
        """Why a value in the word being read in script ``frame`` is refused, or ""."""
        cmd = frame.cmd
        word = "".join(frame.word or [])
        if cmd.mode == "dbracket":
            return _DBRACKET
        if cmd.redirect.endswith("&") and cmd.redirect[:1] in "<>":
            return _DUP
        if cmd.herestring or cmd.redirect:
            return ""  # data; a here-string to code is refused where the command ends
        assignment = _ASSIGNMENT.match(word)
        if special := _SPECIAL_ASSIGNMENT.search(word):
            return _fill(_SPECIAL, name=special[1])
        if not cmd.started:
            if _IN_SUBSCRIPT.match(word):
                return _SUBSCRIPT
            if assignment:
                return ""  # X={{ x }}: a variable's value is one word
            if cmd.danger:
                return cmd.danger  # env -S
            return _SUBST_COMMAND if subst else ""  # the value names the command
        if cmd.value_name:
            return _VALUE_COMMAND
        if cmd.danger:
            return cmd.danger
        if cmd.mode == "export" and (cmd.opts or not assignment or assignment[2]):
            return _fill(_EXPORT, name=cmd.name)
        if cmd.spec is not None and (cmd.operand is None or cmd.skip_arg):
            return _fill(_INTERP_OPTIONS, name=cmd.interp)
        if cmd.mode == "printf" and not cmd.opts:
            return _PRINTF
        if cmd.mode == "set" and not cmd.opts:
            return _SET
        if cmd.mode == "test" and (cmd.prev in ("-v", "-R") or cmd.prev_value):
            return _TEST
        return ""

    # -- $ -----------------------------------------------------------------------------------
    def dollar(self, i: int, end: int, stack: list[_Frame], shell_syntax: bool) -> int:
        """Read a ``$`` at ``i``: maybe open a substitution or a $'...' string."""
        text = self.text
        if i + 1 in self.exprs and shell_syntax and not self.exprs[i + 1].raw_int:
            self.fail(i + 1, _AFTER_DOLLAR)
        if text.startswith("$((", i):
            self.add(stack, "$", dynamic=True)
            stack.append(_Frame(_Kind.ARITH, start=i, closer=")"))
            return i + 3
        if text.startswith("$(", i):
            self.open_subst(stack, i, ")")
            return i + 2
        if text.startswith("$[", i):
            self.add(stack, "$", dynamic=True)
            stack.append(_Frame(_Kind.ARITH, start=i, closer="]"))
            return i + 2
        if text.startswith("${", i):
            self.add(stack, "$", dynamic=True)
            stack.append(_Frame(_Kind.PARAM, start=i, closer="}", part="start"))
            return i + 2
        if text.startswith("$'", i) and shell_syntax:
            # ANSI-C string: backslash escapes, ends at the first unescaped quote.
            j = i + 2
            while j < end and text[j] != "'":
                j += 2 if text[j] == "\\" else 1
            if j >= end:
                self.fail(i, "a $'...' string that never closes")
            self.check_span(i + 2, j, _ANSI)
            self.add(stack, text[i + 2 : j], quoted=True)
            return j + 1
        if text.startswith('$"', i):
            return i + 1  # a locale string: the " is read next
        self.add(stack, "$", dynamic=True)
        return i + 1

    def param(self, i: int, stack: list[_Frame]) -> int:
        """Read one character of a ${...} expansion."""
        frame = stack[-1]
        c = self.text[i]
        nxt = self.text[i + 1] if i + 1 < len(self.text) else ""
        if frame.part == "start":
            frame.part = "name"
            if c in "#!" and nxt not in "}:":
                return i + 1  # ${#name} or ${!name}
        if frame.part == "name":
            if c.isalnum() or c == "_":
                frame.count += 1
                return i + 1
            if frame.count == 0 and c in "@*#?-$!":
                frame.count, frame.part = 1, "op"
                return i + 1
            frame.part = "op"
        if frame.part == "op":
            if c == "[":
                frame.part, frame.depth = "subscript", 1
            elif c == ":":
                frame.part = "word" if nxt in ("-", "=", "?", "+") else "substring"
            elif c == "}":
                stack.pop()
            else:
                frame.part = "word"
            return i + 1
        if frame.part == "subscript":
            if c == "[":
                frame.depth += 1
            elif c == "]":
                frame.depth -= 1
                if not frame.depth:
                    frame.part = "op"
            return i + 1
        if c == "{":
            frame.depth += 1
        elif c == "}":
            if frame.depth:
                frame.depth -= 1
            else:
                stack.pop()
        return i + 1

    def arith(self, i: int, stack: list[_Frame]) -> int:
        frame = stack[-1]
        c = self.text[i]
        if c in "([":
            frame.depth += 1
        elif c in ")]" and frame.depth:
            frame.depth -= 1  # a nested ( in $(( ))
        elif c == frame.closer:
            stack.pop()  # end of $(( )), (( )) or $[ ]
            if c == ")":
                if not self.text.startswith(")", i + 1):
                    # bash then rereads $(( ... ) ...) as $( ( ... ) ...)
                    self.fail(i, "$(( or (( closed by a single ): write $( ( for a subshell")
                return i + 2
        return i + 1

    # -- heredocs ----------------------------------------------------------------------------
    def redirect(self, i: int, end: int, pending: list[_Heredoc], cmd: _Cmd) -> int:
        """Read ``<<WORD``/``<<-WORD`` at ``i`` into ``pending``."""
        text = self.text
        start = i
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
            pending.append(_Heredoc("".join(word), strip_tabs, quoted, start, cmd))
        return i

    def heredoc_bodies(self, i: int, end: int, stack: list[_Frame], pending: list[_Heredoc]) -> int:
        """Read the bodies of ``pending`` heredocs from ``i``, one after the other."""
        text = self.text
        first = i
        for doc in pending:
            start = i
            body_end = -1
            while i < end:
                newline = text.find("\n", i, end)
                line_end = end if newline < 0 else newline
                line = text[i:line_end]
                if (line.lstrip("\t") if doc.strip_tabs else line) == doc.delimiter:
                    body_end = i
                    i = line_end + 1
                    break
                i = line_end + 1
            if body_end < 0:
                self.fail(doc.start, f"heredoc <<{doc.delimiter} never ends")
            i = min(i, end)
            reader = self.stdin_code(doc.cmd)
            pipeline = doc.cmd.pipeline
            later = pipeline.code_stage
            if not reader and later is not None and later >= doc.cmd.stage:
                reader = "the pipeline it feeds"
            if reader:
                self.check_span(start, body_end, _fill(_STDIN_CODE, name=reader))
            elif not doc.quoted:
                body = [_Frame(_Kind.HEREDOC, start=start)]
                self.scan(start, body_end, body, [])
                if len(body) > 1:
                    self.fail(
                        body[1].start,
                        f"the body of heredoc <<{doc.delimiter} ends inside an expansion or quotes",
                    )
            # The body reaches the command's stdin, and down its pipeline.
            for at in range(start, body_end):
                if at in self.exprs and not self.exprs[at].raw_int:
                    pipeline.values.append((at, doc.cmd.stage))
                    for frame in stack:
                        if frame.kind is _Kind.PLAIN:
                            frame.cmd.pipeline.values.append((at, frame.cmd.stage))
        self.tags_inside(first, i, "inside a heredoc body")
        return i

    # -- tags --------------------------------------------------------------------------------
    def at_tags(self, at: int, stack: list[_Frame], pending: list[_Heredoc]) -> None:
        text = self.text
        for tag in self.tags[at]:
            for frame in stack:
                if frame.kind is not _Kind.PLAIN:
                    where = {
                        _Kind.DQUOTE: "inside double quotes",
                        _Kind.ARITH: "inside arithmetic",
                        _Kind.PARAM: "inside a ${...} expansion",
                        _Kind.HEREDOC: "inside a heredoc body",
                    }[frame.kind]
                    self.fail_tag(tag, _fill(_TAG_PLACE, name=tag.name, where=where))
            if pending:
                where = "between a heredoc's << and its body"
                self.fail_tag(tag, _fill(_TAG_PLACE, name=tag.name, where=where))
            next_blank = at >= len(text) or text[at] in _BLANKS
            if not self.blank and not next_blank:
                self.fail_tag(tag, _fill(_TAG_BLANKS, name=tag.name))
            state = _TagState(tag, self.blank, next_blank)
            if self.blank:
                state.state = self.snapshot(stack)
            else:
                self.deferred.append(state)
            name = tag.name
            if tag.opens:
                self.blocks.append([state])
            elif self.blocks and (name in _MIDDLE_TAGS or name in _CLOSE_TAGS):
                self.blocks[-1].append(state)
                if name in _CLOSE_TAGS:
                    self.closed.append(self.blocks.pop())
        self.check_blocks()

    def snapshot(self, stack: list[_Frame]) -> tuple[object, ...]:
        return tuple(frame.key() for frame in stack)

    def take_deferred(self, stack: list[_Frame]) -> None:
        if not self.deferred:
            return
        state = self.snapshot(stack)
        for tag_state in self.deferred:
            tag_state.state = state
        self.deferred.clear()
        self.check_blocks()

    def check_blocks(self) -> None:
        waiting = []
        for block in self.closed:
            if any(t.state is None for t in block):
                waiting.append(block)
            else:
                self.check_block(block)
        self.closed = waiting

    def check_block(self, block: list[_TagState]) -> None:
        """Every rendering of the block must read as the text does, branch by branch.

        Each tag must stand in the same shell state as the block's first. Where
        a rendering puts two pieces of text together that the text keeps apart
        (an ``if`` not taken, a loop's next pass), a blank must stand on one side:
        for ``if``, ``set`` and ``with`` the text before the first tag meets the
        text after any tag, and the text before any tag the text after the last;
        a ``for`` loop's pieces can meet in any order.
        """
        first, last = block[0], block[-1]
        for tag_state in block[1:]:
            if tag_state.state != first.state:
                self.fail_tag(
                    tag_state.tag,
                    _fill(
                        _TAG_STATE,
                        name=tag_state.tag.name,
                        first=first.tag.name,
                        line=first.tag.line,
                    ),
                )
        if first.tag.name == "for":
            glued = not (all(t.prev_blank for t in block) or all(t.next_blank for t in block))
        else:
            glued = any(
                not (first.prev_blank or t.next_blank) or not (t.prev_blank or last.next_blank)
                for t in block
            )
        if glued:
            self.fail_tag(first.tag, _fill(_TAG_GLUE, name=first.tag.name, line=first.tag.line))
