"""Every `latent ...` command shown in README.md's code blocks parses (options, required values,
subcommands), so the documented usage cannot drift from the CLI (issue 32, item 7).

Parsing only (click's ``make_context``): nothing runs. Optional parts written ``[...]`` are
parsed once left out and once put in; trailing ``# comments`` and line continuations are handled.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

try:  # typer >= 0.23 carries its own click
    from typer._click import ClickException
except ImportError:  # pragma: no cover
    from click import ClickException

from latent.app.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands(text: str) -> list[str]:
    """The `latent ...` command lines of the fenced code blocks, continuations joined, comments cut."""
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("latent "):
                commands.append(line)
    return commands


def variants(command: str) -> list[list[str]]:
    """The command without its ``[optional]`` parts and with them (first alternative of ``a|b``)."""
    without = re.sub(r"\s*\[[^\]]*\]", "", command)
    within = re.sub(r"\[([^\]]*)\]", lambda match: re.sub(r"\|\S+", "", match.group(1)), command)
    return [shlex.split(without)[1:], shlex.split(within)[1:]]


def parse(arguments: list[str]):
    """Parse ``latent ARGUMENTS`` down to the leaf command without running it."""
    command = typer.main.get_command(app)
    context = command.make_context("latent", list(arguments))
    while hasattr(command, "resolve_command"):  # a group: go down to the subcommand
        rest = [*context._protected_args, *context.args] if hasattr(context, "_protected_args") else \
            [*context.protected_args, *context.args]
        name, command, rest = command.resolve_command(context, rest)
        context = command.make_context(name, rest, parent=context)
    return context


COMMANDS = readme_commands(README.read_text())


def test_the_readme_shows_commands() -> None:
    assert len(COMMANDS) >= 30
    assert "latent predict --model runs/l2sct --gc-io /input /output" in COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_a_readme_command_parses(command: str) -> None:
    for arguments in variants(command):
        try:
            parse(arguments)
        except ClickException as error:
            pytest.fail(f"{command!r}: {error.format_message()}")


def test_a_wrong_command_does_not_parse() -> None:
    with pytest.raises(ClickException, match="No such option: --outt"):
        parse(["predict", "--method", "water", "--data", "ROOT", "--outt", "x"])
    with pytest.raises(ClickException, match="Missing .*data"):
        parse(["encode", "--cache", "c.zarr", "--vae", "v"])
