"""README.md and docs/: the generated configuration page is current, every
setting and every GATEWAY_ variable of the code is described, and relative
links lead somewhere."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

from gateway import settings
from gateway.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

settings_doc = importlib.import_module("settings_doc")

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) outside code; images and reference links alike.
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*$", re.MULTILINE)


def test_configuration_page_is_current() -> None:
    committed = settings_doc.TARGET.read_text(encoding="utf-8")
    assert committed == settings_doc.document(), "docs/configuration.md is stale: run `make docs`"


def test_every_setting_has_a_description() -> None:
    described = settings_doc.descriptions()
    missing = [f for f in Settings.__struct_fields__ if not described.get(f)]
    assert not missing, f"Settings fields with no `#:` comment in gateway/settings.py: {missing}"


def test_a_field_without_a_comment_is_found() -> None:
    source = 'class Settings:\n    #: described\n    a: int = 1\n\n    b: str = ""\n'
    assert settings_doc.descriptions(source) == {"a": "described", "b": ""}


def test_every_gateway_variable_of_the_code_is_documented() -> None:
    documented = {env_name(f) for f in Settings.__struct_fields__} | set(settings._TOOLING)
    page = settings_doc.TARGET.read_text(encoding="utf-8")
    assert all(f"`{name}`" in page for name in documented)
    files = [ROOT / "Makefile"]
    for folder in ("gateway", "scripts", "deploy"):
        files += [
            p
            for p in (ROOT / folder).rglob("*")
            if p.is_file()
            and p.suffix in {".py", ".sh", ".toml", ".yaml", ".yml", ".conf", ""}
            and "assets" not in p.parts
            and p.name != "settings_doc.py"  # quotes a misspelt one
        ]
    used: dict[str, Path] = {}
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        # A trailing `_` is a prefix in prose (GATEWAY_VLLM_*), not a variable.
        for name in re.findall(r"\bGATEWAY_[A-Z0-9_]*[A-Z0-9]\b(?!_)", text):
            used.setdefault(name, path)
    undocumented = {n: str(p.relative_to(ROOT)) for n, p in used.items() if n not in documented}
    assert not undocumented, (
        f"GATEWAY_ variables missing from docs/configuration.md: {undocumented}"
    )


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(h) for h in HEADING.findall(text)}


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return LINK.findall(INLINE_CODE.sub("", text))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        missing_anchor = bool(anchor) and resolved.suffix == ".md"
        if not resolved.exists() or (missing_anchor and anchor not in anchors(resolved)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to nothing: {broken}"
