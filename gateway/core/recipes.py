"""Recipes are data: ``recipes/<category>/<name>/recipe.toml`` plus a Jinja2
batch-script template beside it.

A site overlay (TOML) can change a recipe's defaults (model, partitions,
account, runtime paths) without editing the recipe. Everything is loaded and
validated at start-up; a broken file stops start-up with a message naming the
file and the field (a template: its line, see recipe_check.py).
"""

from __future__ import annotations

import copy
import math
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import jinja2
import msgspec

from gateway.core import containers, recipe_check, shell
from gateway.core.errors import InvalidRequest, NotFound, RecipeError
from gateway.core.resources import (
    MAX_CPUS,
    MAX_GPUS,
    MAX_NODES,
    MAX_TIME_LIMIT,
    Resources,
    parse_count,
    parse_memory,
)

RECIPE_FILE = "recipe.toml"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*/[a-z0-9][a-z0-9_.-]*$")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
# Variables a request must never set: they run code (BASH_ENV, LD_PRELOAD,
# PYTHONSTARTUP), trace secrets into the log (SHELLOPTS=xtrace, PS4), or are
# the gateway's and Slurm's own.
_RESERVED_NAMES = frozenset(
    {"BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "IFS", "PATH", "HOME", "CDPATH"}
    | {"GLOBIGNORE", "PROMPT_COMMAND", "TMPDIR", "SHELL", "USER", "LOGNAME"}
)
_RESERVED_PREFIXES: tuple[str, ...] = ("LD_", "PYTHON", "GW_", "SLURM_", "BASH_FUNC_", "SBATCH_")
_RESERVED_PREFIXES += ("SRUN_",)
# The container runtimes' own (APPTAINERENV_LD_PRELOAD would be LD_PRELOAD inside).
_RESERVED_PREFIXES += ("APPTAINER", "SINGULARITY", "ENROOT_", "PYXIS_", "CH_")
# What any string variable may hold unless the recipe says otherwise.
_DEFAULT_STRING = re.compile(r"[^\x00-\x1f\x7f]{0,4096}")
_INT = re.compile(r"-?[0-9]{1,18}")
_FLOAT = re.compile(r"-?[0-9]{1,18}(?:\.[0-9]{1,18})?(?:[eE][-+]?[0-9]{1,3})?")

VarType = Literal["string", "int", "float", "port", "host", "device_list", "bool"]


class VariableSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """An environment variable a request may set, and what it may hold."""

    description: str = ""
    type: VarType = "string"
    pattern: str | None = None
    min: float | None = None
    max: float | None = None
    choices: list[str] | None = None


class ResourceDefaults(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    nodes: int = 1
    cpu: str | int = "1"
    memory: str | int = "4G"
    time_limit: int = 60
    gpu: str | int | None = None


class Partitions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    gpu: str | None = None
    cpu: str | None = None


class ServiceSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How the gateway talks to what the job serves."""

    kind: Literal["vllm", "http"] = "http"
    health_path: str = "/health"
    port_variable: str | None = None
    # Which request variables name the model: the one loaded, the name it is
    # served under (else the loaded one), its context length. Code outside the
    # recipe reads them through these, never by a server's own variable names.
    model_variable: str | None = None
    served_name_variable: str | None = None
    max_model_len_variable: str | None = None
    # LoRA adapters it serves besides its model, as "name=path name=path":
    # each name is a model of its own on /v1.
    adapters_variable: str | None = None


class RecipeSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    description: str
    version: str = "1"
    template: str = "job.sh.j2"
    resources: ResourceDefaults = ResourceDefaults()
    environment_defaults: dict[str, str] = msgspec.field(default_factory=dict)
    environment: dict[str, VariableSpec] = msgspec.field(default_factory=dict)
    partitions: Partitions = Partitions()
    account: str | None = None
    service: ServiceSpec = ServiceSpec()
    runtime: dict[str, str] = msgspec.field(default_factory=dict)


class Recipe:
    """A loaded, validated recipe with its compiled template."""

    def __init__(self, name: str, folder: Path, spec: RecipeSpec, template: jinja2.Template):
        self.name = name
        self.folder = folder
        self.spec = spec
        self.template = template
        self.default_resources = resolve_resources(spec.resources, None, field="resources")

    @property
    def category(self) -> str:
        return self.name.split("/", 1)[0]

    def environment(self, overrides: Mapping[str, str]) -> dict[str, str]:
        """The recipe's defaults with the request's variables, each validated."""
        merged = dict(self.spec.environment_defaults)
        for key, value in overrides.items():
            field = f"config.environment.{key}"
            spec = self.spec.environment.get(key)
            if spec is None:
                allowed = ", ".join(sorted(self.spec.environment)) or "none"
                raise InvalidRequest.field(
                    field, f"not a variable of recipe {self.name} (allowed: {allowed})"
                )
            merged[key] = check_variable(spec, value, field)
        _check_adapters(self.spec.service, merged)
        return merged

    def partition(self, resources: Resources) -> str | None:
        return self.spec.partitions.gpu if resources.gpus else self.spec.partitions.cpu

    def template_values(self, resources: Mapping[str, Any]) -> dict[str, Any]:
        """What the template may name: operator values only (recipe_check.ROOTS).
        A request's variables are not among them: they reach the job as
        environment variables."""
        return {
            "recipe": {"name": self.name, "description": self.spec.description},
            "resources": dict(resources),
            "runtime": dict(self.spec.runtime),
            "service": {
                "kind": self.spec.service.kind,
                "health_path": self.spec.service.health_path,
            },
        }

    def render(self, context: Mapping[str, Any]) -> str:
        try:
            return self.template.render(**context)
        except jinja2.TemplateError as exc:
            raise RecipeError(f"recipe {self.name}: template failed: {exc}") from exc


def check_variable(spec: VariableSpec, value: Any, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidRequest.field(field, "expected a string")
    text = str(value)
    if spec.choices is not None and text not in spec.choices:
        raise InvalidRequest.field(field, f"must be one of {', '.join(spec.choices)}")
    kind = spec.type
    if kind in ("int", "port", "float"):
        # Python's int() and float() also take " 8001", "٨", "1_000", "nan" and
        # "inf": the job would get a string its program reads differently.
        if not (_FLOAT if kind == "float" else _INT).fullmatch(text):
            raise InvalidRequest.field(field, f"{text!r} is not a {kind} number")
        number = float(text) if kind == "float" else int(text)
        if not math.isfinite(number):
            raise InvalidRequest.field(field, f"{text!r} is not a finite number")
        low = 1 if kind == "port" else spec.min
        high = 65535 if kind == "port" else spec.max
        if low is not None and number < low:
            raise InvalidRequest.field(field, f"must be at least {low:g}")
        if high is not None and number > high:
            raise InvalidRequest.field(field, f"must be at most {high:g}")
        # What the job gets is the normalised number ("007" -> "7", "9e-1" -> "0.9").
        text = repr(number) if kind == "float" else str(number)
    elif kind == "bool" and text not in ("0", "1", "true", "false"):
        raise InvalidRequest.field(field, "must be true, false, 1 or 0")
    elif kind == "host" and not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", text):
        raise InvalidRequest.field(field, f"{text!r} is not a host name or address")
    elif kind == "device_list" and not re.fullmatch(r"[0-9]{1,4}(,[0-9]{1,4}){0,255}", text):
        raise InvalidRequest.field(field, f"{text!r} is not a list of device numbers like '0,1'")
    pattern = spec.pattern
    # Whatever a recipe's pattern says: a newline would end a shell comment or
    # a quoted heredoc that a template puts the value in.
    if not _DEFAULT_STRING.fullmatch(text):
        raise InvalidRequest.field(
            field, "control characters are not allowed (at most 4096 characters)"
        )
    if pattern is not None and not re.fullmatch(pattern, text):
        raise InvalidRequest.field(field, f"{text!r} does not match {pattern}")
    return text


def adapter_modules(text: str) -> list[tuple[str, str]]:
    """``name=path`` words (a recipe's ``adapters_variable``) as pairs."""
    return [(name, path) for name, _, path in (word.partition("=") for word in text.split())]


def _check_adapters(service: ServiceSpec, environment: Mapping[str, str]) -> None:
    """Names vLLM would refuse at its start, after the wait in Slurm's queue
    and the model's load: one given twice, or the model's own."""
    variable = service.adapters_variable
    if variable is None or not environment.get(variable):
        return
    served = environment.get(service.served_name_variable or "") or environment.get(
        service.model_variable or ""
    )
    seen: set[str] = {served} if served else set()
    for name, _ in adapter_modules(environment[variable]):
        if name in seen:
            why = "is the model's own name" if name == served else "is given twice"
            raise InvalidRequest.field(
                f"config.environment.{variable}", f"the adapter name {name!r} {why}"
            )
        seen.add(name)


def resolve_resources(
    defaults: ResourceDefaults, request: Mapping[str, Any] | None, *, field: str
) -> Resources:
    """Defaults overlaid with a request's fields; ``gpu: null`` means CPU-only."""
    values: dict[str, Any] = msgspec.structs.asdict(defaults)
    if request:
        values.update(request)
    gpu = values.get("gpu")
    gpus = (
        0 if gpu in (None, "", 0, "0") else parse_count(gpu, f"{field}.gpu", low=1, high=MAX_GPUS)
    )
    return Resources(
        nodes=parse_count(values["nodes"], f"{field}.nodes", low=1, high=MAX_NODES),
        cpus=parse_count(values["cpu"], f"{field}.cpu", low=1, high=MAX_CPUS),
        memory_mb=parse_memory(values["memory"], f"{field}.memory"),
        time_limit_minutes=parse_count(
            values["time_limit"], f"{field}.time_limit", low=1, high=MAX_TIME_LIMIT
        ),
        gpus=gpus,
    )


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}") from None


class SiteOverlay(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Site settings applied over every recipe, then per recipe."""

    account: str | None = None
    partitions: dict[str, str] = msgspec.field(default_factory=dict)
    runtime: dict[str, str] = msgspec.field(default_factory=dict)
    recipes: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)


class RecipeCatalog:
    def __init__(self, recipes: dict[str, Recipe]) -> None:
        self._recipes = dict(sorted(recipes.items()))

    @classmethod
    def load(cls, folders: list[Path], overlay_file: Path | None = None) -> RecipeCatalog:
        overlay = SiteOverlay()
        if overlay_file is not None:
            try:
                overlay = msgspec.convert(_read_toml(overlay_file), SiteOverlay)
            except msgspec.ValidationError as exc:
                raise RecipeError(f"{overlay_file}: {exc}") from None
        recipes: dict[str, Recipe] = {}
        for folder in folders:
            if not folder.is_dir():
                raise RecipeError(f"{folder}: recipe folder does not exist")
            for meta in sorted(folder.glob(f"*/*/{RECIPE_FILE}")):
                name = f"{meta.parent.parent.name}/{meta.parent.name}"
                # A later folder overrides an earlier one (tests add their own).
                recipes[name] = _load_recipe(name, meta, overlay)
        unknown = set(overlay.recipes) - set(recipes)
        if unknown:
            raise RecipeError(
                f"{overlay_file}: overlay names unknown recipes: {', '.join(sorted(unknown))}"
            )
        return cls(recipes)

    def __iter__(self) -> Iterator[Recipe]:
        return iter(self._recipes.values())

    def __len__(self) -> int:
        return len(self._recipes)

    def get(self, name: str) -> Recipe:
        recipe = self._recipes.get(name)
        if recipe is None:
            known = ", ".join(self._recipes) or "none"
            raise NotFound(f"recipe {name!r} does not exist (known recipes: {known})")
        return recipe

    def names(self) -> list[str]:
        return list(self._recipes)


def _load_recipe(name: str, meta: Path, overlay: SiteOverlay) -> Recipe:
    if not _NAME.match(name):
        raise RecipeError(f"{meta}: recipe name {name!r} must be <category>/<name> in lower case")
    raw = _read_toml(meta)
    site: dict[str, Any] = {}
    if overlay.account:
        site["account"] = overlay.account
    if overlay.partitions:
        site["partitions"] = overlay.partitions
    if overlay.runtime:
        site["runtime"] = overlay.runtime
    merged = _merge(_merge(raw, site), overlay.recipes.get(name, {}))
    try:
        spec = msgspec.convert(merged, RecipeSpec)
    except msgspec.ValidationError as exc:
        raise RecipeError(f"{meta}: {exc}") from None
    for key in [*spec.environment, *spec.environment_defaults]:
        if not _ENV_NAME.match(key):
            raise RecipeError(f"{meta}: environment variable name {key!r} is not valid")
        if key in _RESERVED_NAMES or key.startswith(_RESERVED_PREFIXES):
            raise RecipeError(
                f"{meta}: environment variable {key} is reserved: a request could change "
                "how the shell, the loader or Python run the job, or the gateway's own values"
            )
    _check_service_variables(spec, meta)
    try:
        containers.check(spec.runtime)
    except ValueError as exc:
        raise RecipeError(f"{meta}: {exc}") from None
    for key, value in spec.environment_defaults.items():
        var = spec.environment.get(key)
        if var is not None:
            try:
                check_variable(var, value, f"environment_defaults.{key}")
            except InvalidRequest as exc:
                raise RecipeError(f"{meta}: {exc.detail}") from None
    template_path = meta.parent / spec.template
    env = shell.environment(jinja2.FileSystemLoader(meta.parent))
    try:
        template = env.get_template(spec.template)
    except jinja2.TemplateNotFound:
        raise RecipeError(f"{meta}: template: {template_path} does not exist") from None
    except jinja2.TemplateSyntaxError as exc:
        raise RecipeError(f"{template_path}:{exc.lineno}: template: {exc.message}") from None
    try:
        recipe = Recipe(name, meta.parent, spec, template)
    except InvalidRequest as exc:
        raise RecipeError(f"{meta}: {exc.detail}") from None
    # Rendered as a job on the recipe's defaults would have it, and on the
    # other kind of node (GPU or not), so that both branches are checked.
    defaults = recipe.default_resources.as_config()
    other = {**defaults, "gpu": None if recipe.default_resources.gpus else "1"}
    source = template_path.read_text(encoding="utf-8")
    values = [recipe.template_values(defaults), recipe.template_values(other)]
    recipe_check.check_template(template, source, template_path, env, values)
    return recipe


def _check_service_variables(spec: RecipeSpec, meta: Path) -> None:
    """The variables ``[service]`` names are the recipe's own, and a vLLM
    service names its model: without it, /v1 could route it by no name."""
    service = spec.service
    if service.kind == "vllm" and service.model_variable is None:
        raise RecipeError(
            f'{meta}: service.model_variable: required when service.kind = "vllm" (the '
            'variable that names the model, e.g. "VLLM_MODEL"): /v1 routes by it'
        )
    declared = spec.environment.keys() | spec.environment_defaults.keys()
    for field in ("port_variable", "model_variable", "served_name_variable",
                  "max_model_len_variable", "adapters_variable"):  # fmt: skip
        name = getattr(service, field)
        if name is not None and name not in declared:
            raise RecipeError(
                f"{meta}: service.{field}: {name} is not one of the recipe's variables "
                "([environment] or [environment_defaults])"
            )
