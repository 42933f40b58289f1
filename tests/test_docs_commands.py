"""Every `zoo ...` command the README and docs/ show exists, with the options they give it."""

import re
from pathlib import Path

import pytest
import typer
from typer.core import TyperCommand, TyperGroup

from zoo_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
OPTION = re.compile(r"(?<![\w-])(--?[a-z][a-z-]*)")


def resolve(words: list[str]) -> tuple[TyperCommand | TyperGroup, list[str]]:
    """The (sub)command the words name, and the words after it."""
    command = typer.main.get_command(app)
    while isinstance(command, TyperGroup) and words and words[0] in command.commands:
        command, words = command.commands[words[0]], words[1:]
    return command, words


def documented_commands(page: Path) -> list[str]:
    """The `zoo ...` commands in a page's code blocks and inline code, comments dropped."""
    text = page.read_text()
    snippets = [line for block in FENCE.findall(text) for line in block.splitlines()]
    snippets += INLINE.findall(FENCE.sub("", text))
    parts = [part.split("#")[0].strip() for snippet in snippets for part in snippet.split("&&")]
    return [part.removeprefix("zoo ") for part in parts if re.match(r"zoo [a-z]", part)]


def unknown_options(line: str) -> list[str]:
    command, rest = resolve(line.split())
    if isinstance(command, TyperGroup) and not command.invoke_without_command:
        # A group named on its own (`zoo modal …`) is fine; with more words, they name no command.
        return [f"no command in `zoo {line}`"] if [w for w in rest if w != "…"] else []
    known = {opt for param in command.params for opt in param.opts + param.secondary_opts} | {"--help"}
    return [opt for opt in OPTION.findall(" ".join(rest)) if opt not in known]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_commands_exist_with_their_options(page: Path) -> None:
    commands = documented_commands(page)
    problems = {line: bad for line in commands if (bad := unknown_options(line))}
    assert problems == {}


def test_the_check_catches_an_unknown_option_and_command() -> None:
    assert unknown_options("sample outputs/x --nfe 1 --colour red") == ["--colour"]
    assert unknown_options("modal submit cifar10 --gpu H100:8 -f") == ["-f"]
    assert unknown_options("data encode") == ["no command in `zoo data encode`"]
    assert unknown_options("modal …") == []
    assert unknown_options("ckpts download run/200 --dest x.pt") == []
