"""The README stays true: its recipe reference is the schema's, its commands exist."""

from __future__ import annotations

import re

from conftest import ROOT
from lorakit.recipe.reference import REFERENCE_END, REFERENCE_START, reference_markdown

README = (ROOT / "README.md").read_text()


def test_readme_recipe_reference_is_generated_from_the_schema():
    section = README.split(REFERENCE_START, 1)[1].split(REFERENCE_END, 1)[0]
    assert section.strip() == reference_markdown().strip(), "README reference is stale: run `make docs`"


def test_readme_commands_are_real_cli_verbs():
    from typer.main import get_command

    from lorakit.cli import app

    cli = get_command(app)
    for line in re.findall(r"^lorakit ([a-z]+(?: [a-z]+)?)", README, flags=re.M):
        words = line.split()
        group = cli.commands.get(words[0])
        assert group is not None, f"README mentions unknown verb {words[0]!r}"
        if len(words) > 1 and hasattr(group, "commands"):
            assert words[1] in group.commands, f"README mentions unknown verb {line!r}"


def test_makefile_has_the_two_readme_commands_and_ci_runs_make_test():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: ", makefile, flags=re.M) and re.search(r"^test: ", makefile, flags=re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
