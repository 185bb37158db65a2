"""The docs (issue 28): the README stays a short front door, every relative link in README.md and docs/*.md points
to a file that exists, and docs/config.md is exactly what docs/config_doc.py generates from the config schema, with
every key of every section documented."""
from __future__ import annotations

import dataclasses
import re
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "docs"))
import config_doc  # noqa: E402

PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL, or an anchor on the same page
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken
    assert len(PAGES) >= 10


def test_config_doc_equals_the_schema(capsys):
    assert config_doc.main(["--check"]) == 0, capsys.readouterr().err


def test_every_config_key_is_documented():
    from coopt_ray import config as C

    text = (REPO / "docs" / "config.md").read_text()
    sections = {"": C.Config, "participants[*].": C.ParticipantConfig}
    sections.update({f"{f.name}.": type(f.default_factory()) for f in dataclasses.fields(C.Config)
                     if f.default is dataclasses.MISSING})
    keys = [prefix + f.name for prefix, cls in sections.items() for f in dataclasses.fields(cls)
            if not (prefix == "" and (f.name == "participants" or f.default is dataclasses.MISSING))]
    assert len(keys) > 80
    for key in keys:
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row, f"docs/config.md lacks {key}"
        assert row.rstrip(" |").split(" | ")[-1].strip(), f"docs/config.md: {key} has no meaning"


def test_a_field_without_a_comment_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Section:
        documented: int = 1  # what it means
        bare: int = 2

    try:
        config_doc.field_notes(Section, ["documented", "bare"])
    except SystemExit as e:
        assert "bare" in str(e)
    else:
        raise AssertionError("a key without a meaning was accepted")
