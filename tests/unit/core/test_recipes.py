from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core import jobscript, metadata
from gateway.core.errors import InvalidRequest, NotFound, RecipeError
from gateway.core.model import model_names
from gateway.core.recipes import RecipeCatalog, VariableSpec, check_variable, resolve_resources
from tests.support import sandbox

ROOT = Path(__file__).resolve().parents[3]
RECIPES = ROOT / "recipes"
TEST_RECIPES = ROOT / "tests" / "recipes"

INJECTIONS = [
    "$(touch /tmp/pwned)",
    "`touch /tmp/pwned`",
    "x; touch /tmp/pwned",
    "x' ; touch /tmp/pwned ; '",
    'x" && touch /tmp/pwned && "',
    "x\ntouch /tmp/pwned",
    "$HOME ${IFS} | & > <",
]


@pytest.fixture(scope="module")
def catalog() -> RecipeCatalog:
    return RecipeCatalog.load([RECIPES, TEST_RECIPES])


def test_catalog_lists_shipped_and_test_recipes(catalog: RecipeCatalog) -> None:
    assert {"inference/vllm", "testing/http"} <= set(catalog.names())


def test_vllm_defaults(catalog: RecipeCatalog) -> None:
    recipe = catalog.get("inference/vllm")
    assert recipe.spec.environment_defaults["VLLM_MODEL"] == "Qwen/Qwen2.5-0.5B-Instruct"
    r = recipe.default_resources
    assert (r.nodes, r.cpus, r.memory_mb, r.time_limit_minutes, r.gpus) == (1, 2, 32768, 15, 1)


def test_unknown_recipe(catalog: RecipeCatalog) -> None:
    with pytest.raises(NotFound, match="known recipes: inference/vllm"):
        catalog.get("../../etc/passwd")


@pytest.mark.parametrize(
    ("env", "field", "message"),
    [
        ({"NOPE": "1"}, "config.environment.NOPE", "not a variable of recipe inference/vllm"),
        ({"VLLM_PORT": "http"}, "config.environment.VLLM_PORT", "not a port number"),
        ({"VLLM_PORT": "70000"}, "config.environment.VLLM_PORT", "at most 65535"),
        ({"VLLM_MODEL": "$(reboot)"}, "config.environment.VLLM_MODEL", "does not match"),
        ({"VLLM_GPU_MEMORY_UTILIZATION": "2"}, "config.environment.VLLM_GPU_MEMORY", "at most 1"),
        ({"CUDA_VISIBLE_DEVICES": "0;ls"}, "config.environment.CUDA_VISIBLE_DEVICES", "device"),
    ],
)
def test_environment_is_validated(
    catalog: RecipeCatalog, env: dict[str, str], field: str, message: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        catalog.get("inference/vllm").environment(env)
    assert info.value.errors[0].field.startswith(field)
    assert message in info.value.errors[0].message


@pytest.mark.parametrize(
    ("resources", "field", "message"),
    [
        ({"memory": "lots"}, "config.resources.memory", "is not a size"),
        ({"memory": "0G"}, "config.resources.memory", "between"),
        ({"cpu": "eight"}, "config.resources.cpu", "not a whole number"),
        ({"cpu": "0"}, "config.resources.cpu", "between 1"),
        ({"nodes": 0}, "config.resources.nodes", "between 1"),
        ({"time_limit": 0}, "config.resources.time_limit", "between 1"),
        ({"gpu": "-1"}, "config.resources.gpu", "not a whole number"),
    ],
)
def test_resources_are_validated(
    catalog: RecipeCatalog, resources: dict[str, object], field: str, message: str
) -> None:
    recipe = catalog.get("inference/vllm")
    with pytest.raises(InvalidRequest) as info:
        resolve_resources(recipe.spec.resources, resources, field="config.resources")
    assert info.value.errors[0].field == field
    assert message in info.value.errors[0].message


def test_resources_from_seed_examples(catalog: RecipeCatalog) -> None:
    recipe = catalog.get("inference/vllm")
    r = resolve_resources(
        recipe.spec.resources,
        {"nodes": 1, "cpu": "4", "memory": "16G", "gpu": None},
        field="config.resources",
    )
    assert (r.cpus, r.memory_mb, r.gpus, r.time_limit_minutes) == (4, 16384, 0, 15)
    assert recipe.partition(r) == "cpu"
    r = resolve_resources(recipe.spec.resources, {"memory": "512M", "gpu": "2"}, field="c")
    assert (r.memory_mb, r.gpus, recipe.partition(r)) == (512, 2, "gpu")


@pytest.mark.parametrize("payload", INJECTIONS)
def test_request_values_stay_out_of_the_script(catalog: RecipeCatalog, payload: str) -> None:
    """A request's value is in the job's environment only: never in the
    script's text, and the script's use of it ("$MESSAGE") keeps it inert."""
    recipe = catalog.get("testing/http")
    env = recipe.environment({"MESSAGE": payload.replace("\n", " ")})
    meta = metadata.ServiceMeta(recipe=recipe.name, created=0, owner="u", environment=env)
    encoded = metadata.MetaCodec(b"s" * 32).unbound(meta)
    script = jobscript.build(
        recipe, encoded, recipe.template_values(recipe.default_resources.as_config())
    )
    assert "pwned" not in script
    line = next(x for x in script.splitlines() if x.startswith('echo "message from environment'))
    with sandbox.folder() as box:  # as nobody under root
        out = sandbox.run(
            ["bash", "-c", line],
            env={"PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            cwd=box,
            check=True,
        ).stdout
        assert list(box.iterdir()) == []
    assert out == f"message from environment: {payload.replace(chr(10), ' ')}\n"
    assert not Path("/tmp/pwned").exists()


def _write(folder: Path, name: str, toml: str, template: str = "echo hi\n") -> Path:
    d = folder / name
    d.mkdir(parents=True)
    (d / "recipe.toml").write_text(toml)
    (d / "job.sh.j2").write_text(template)
    return d


@pytest.mark.parametrize(
    ("toml", "template", "message"),
    [
        ('description = "x"\nbogus = 1\n', "echo\n", "recipe.toml: Object contains unknown field"),
        ("description = 3\n", "echo\n", "Expected `str`, got `int` - at `$.description`"),
        ('description = "x"\n[resources]\nmemory = "lots"\n', "echo\n", "resources.memory"),
        ('description = "x"\n', "{% if %}\n", "job.sh.j2:1: template"),
        ("description = \n", "echo\n", "not valid TOML"),
        ('description = "x"\n', "echo hi\necho {{ env.X }}\n", "job.sh.j2:2: env.X is a request"),
        ('description = "x"\n', "echo hi\nif true; then\n", "job.sh.j2: rendered with the"),
        # A vLLM recipe from before model_variable would route by no name (review).
        ('description = "x"\n[service]\nkind = "vllm"\n', "echo\n", "service.model_variable"),
        (
            'description = "x"\n[service]\nport_variable = "PORTT"\n',
            "echo\n",
            "service.port_variable: PORTT is not one of the recipe's variables",
        ),
    ],
)
def test_broken_recipe_names_file_and_field(
    tmp_path: Path, toml: str, template: str, message: str
) -> None:
    _write(tmp_path, "cat/broken", toml, template)
    with pytest.raises(RecipeError) as info:
        RecipeCatalog.load([tmp_path])
    assert message in str(info.value)
    assert "cat/broken" in str(info.value)


def test_site_overlay_changes_defaults(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text(
        'account = "proj1"\n[partitions]\ncpu = "batch"\n'
        '[recipes."inference/vllm".environment_defaults]\nVLLM_MODEL = "/models/tiny"\n'
        '[recipes."inference/vllm".resources]\nmemory = "6G"\ngpu = ""\n'
    )
    recipe = RecipeCatalog.load([RECIPES], site).get("inference/vllm")
    assert recipe.spec.environment_defaults["VLLM_MODEL"] == "/models/tiny"
    assert recipe.spec.account == "proj1"
    assert recipe.spec.partitions.cpu == "batch"
    assert recipe.spec.partitions.gpu == "gpu"
    assert (recipe.default_resources.memory_mb, recipe.default_resources.gpus) == (6144, 0)


def test_lora_adapters_come_from_the_request_or_the_sites_overlay(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text(
        '[recipes."inference/vllm".environment_defaults]\n'
        'VLLM_LORA_MODULES = "sql=/models/sql-lora chat/v2=org/chat-lora"\n'
    )
    recipe = RecipeCatalog.load([RECIPES], site).get("inference/vllm")
    spec = recipe.spec.service
    names = model_names(spec, recipe.environment({"VLLM_SERVED_MODEL_NAME": "base"}))
    assert names.adapters == {"sql": "/models/sql-lora", "chat/v2": "org/chat-lora"}
    assert names.names == ["base", "sql", "chat/v2"]
    # A request's own list replaces the site's.
    mine = recipe.environment({"VLLM_LORA_MODULES": "mine=/home/me/lora"})
    assert model_names(spec, mine).adapters == {"mine": "/home/me/lora"}
    assert model_names(spec, recipe.environment({})).names == [
        "Qwen/Qwen2.5-0.5B-Instruct",
        "sql",
        "chat/v2",
    ]
    # An empty one: none, whatever the site offers.
    assert model_names(spec, recipe.environment({"VLLM_LORA_MODULES": ""})).names == [
        "Qwen/Qwen2.5-0.5B-Instruct"
    ]


@pytest.mark.parametrize(
    ("environment", "why"),
    [
        ({"VLLM_LORA_MODULES": "a=/x b=/y a=/z"}, "the adapter name 'a' is given twice"),
        (
            {"VLLM_SERVED_MODEL_NAME": "chat", "VLLM_LORA_MODULES": "chat=/x"},
            "the adapter name 'chat' is the model's own name",
        ),
        ({"VLLM_MODEL": "org/m", "VLLM_LORA_MODULES": "org/m=/x"}, "is the model's own name"),
        ({"VLLM_LORA_MODULES": "a=/x", "VLLM_MAX_LORA_RANK": "24"}, "must be one of 1, 8, 16"),
    ],
)
def test_adapters_vllm_would_refuse_at_its_start_are_refused_now(
    catalog: RecipeCatalog, environment: dict[str, str], why: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        catalog.get("inference/vllm").environment(environment)
    assert why in info.value.detail
    assert "VLLM_" in info.value.detail


@pytest.mark.parametrize(
    "modules",
    [
        "sql",  # no path
        "=/models/x",  # no name
        "sql=/models/x;rm -rf ~",
        "sql=/models/x\nother=/y",
        "a=/x  b=/y",  # words are one space apart
        " ".join(f"a{i}=/m/{i}" for i in range(17)),  # 16 at most
        '{"name": "sql", "path": "/models/x"}',  # vLLM's JSON form is not taken
    ],
)
def test_malformed_lora_modules_are_refused_by_name(catalog: RecipeCatalog, modules: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        catalog.get("inference/vllm").environment({"VLLM_LORA_MODULES": modules})
    assert "VLLM_LORA_MODULES" in info.value.detail


def test_site_overlay_for_unknown_recipe_fails(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('[recipes."nope/x"]\ndescription = "y"\n')
    with pytest.raises(RecipeError, match="unknown recipes: nope/x"):
        RecipeCatalog.load([RECIPES], site)


@pytest.mark.parametrize(
    ("kind", "given", "gets"),
    [
        ("port", "0008001", "8001"),
        ("int", "-0", "0"),
        ("int", 42, "42"),
        ("float", "9e-1", "0.9"),
        ("float", "0.50", "0.5"),
        ("float", 1, "1.0"),
    ],
)
def test_numbers_are_normalised_for_the_job(kind: str, given: object, gets: str) -> None:
    spec = VariableSpec(type=kind)  # type: ignore[arg-type]
    assert check_variable(spec, given, "config.environment.X") == gets


@pytest.mark.parametrize(
    ("kind", "given"),
    [
        ("port", " 8001"),
        ("port", "8001\n"),
        ("port", "\u0668\u0660"),  # Arabic-Indic digits: int() takes them
        ("int", "1_000"),
        ("int", "+5"),
        ("float", "nan"),
        ("float", "inf"),
        ("float", "1e999"),
        ("float", "0x10"),
    ],
)
def test_numbers_take_ascii_digits_only(kind: str, given: str) -> None:
    spec = VariableSpec(type=kind)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest) as info:
        check_variable(spec, given, "config.environment.X")
    assert info.value.errors[0].field == "config.environment.X"


def test_control_characters_are_refused_whatever_the_pattern() -> None:
    spec = VariableSpec(pattern=r"(?s).*")
    with pytest.raises(InvalidRequest, match="control characters"):
        check_variable(spec, "a\nb", "config.environment.X")


@pytest.mark.parametrize(
    "name",
    [
        "BASH_ENV",
        "PS4",
        "SHELLOPTS",
        "LD_PRELOAD",
        "PYTHONPATH",
        "APPTAINERENV_LD_PRELOAD",
        "SINGULARITYENV_PATH",
        "ENROOT_MOUNT_HOME",
        "CH_IMAGE_STORAGE",
    ],
)
def test_a_recipe_may_not_let_requests_set_reserved_variables(tmp_path: Path, name: str) -> None:
    _write(tmp_path, "cat/reserved", f'description = "x"\n[environment.{name}]\n')
    with pytest.raises(RecipeError, match=f"environment variable {name} is reserved"):
        RecipeCatalog.load([tmp_path])
