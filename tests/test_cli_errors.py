"""One place turns expected failures into one line and an exit code, for every group."""

from __future__ import annotations

import importlib
import pkgutil

import click
import psycopg
import pytest
from click.testing import CliRunner

import meterproof
from meterproof.cli.errors import Group, one_line
from meterproof.cli.main import COMMANDS, main
from meterproof.errors import (
    ConflictError,
    InputError,
    MeterproofError,
    NotFoundError,
    UnavailableError,
)


def _every_error_class() -> set[type[MeterproofError]]:
    for info in pkgutil.walk_packages(meterproof.__path__, "meterproof."):
        if info.name.split(".")[1] not in {"tests", "__main__"}:
            importlib.import_module(info.name)
    found: set[type[MeterproofError]] = set()
    todo: list[type[MeterproofError]] = [MeterproofError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_of_ours_has_an_exit_code_the_mapping_knows() -> None:
    classes = _every_error_class()
    assert len(classes) > 20  # the packages' own errors joined the tree
    for cls in classes:
        assert cls.exit_code in {1, 2, 75}, cls


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (InputError("bad id 'x'\nsecond line"), 2, "bad id 'x'"),
        (NotFoundError("no meter 'm'"), 1, "no meter 'm'"),
        (ConflictError("taken"), 1, "taken"),
        (UnavailableError("database", "down"), 75, "database: down"),
        (FileNotFoundError(2, "No such file or directory", "/x/y"), 1, "No such file"),
        (psycopg.OperationalError("connection refused\nis the server running?"), 1,
         "database unreachable: connection refused"),
    ],
)  # fmt: skip
def test_a_group_ends_an_expected_failure_in_one_line(
    error: Exception, code: int, line: str
) -> None:
    @click.group(cls=Group)
    def group() -> None:
        """A group."""

    @group.command()
    def fail() -> None:
        raise error

    result = CliRunner().invoke(group, ["fail"])
    assert result.exit_code == code
    assert result.output.startswith(f"Error: {line}")
    assert result.output.count("\n") == 1
    assert one_line(error).exit_code == code


def test_a_bug_is_not_hidden() -> None:
    @click.group(cls=Group)
    def group() -> None:
        """A group."""

    @group.command()
    def fail() -> None:
        raise KeyError("a bug")

    result = CliRunner().invoke(group, ["fail"])
    assert isinstance(result.exception, KeyError)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_group_of_the_command_maps_errors(name: str) -> None:
    module, attr = COMMANDS[name].split(":")
    command = getattr(importlib.import_module(module), attr)
    if isinstance(command, click.Group):
        assert isinstance(command, Group), f"{name} is a click.Group, not a cli.errors.Group"


def _without_help(command: click.Command, path: str, ctx: click.Context) -> list[str]:
    """`path` if the command says nothing, `path --option` for each silent option, and
    the same for every subcommand."""
    found = [] if (command.help or "").strip() else [path]
    found += [
        f"{path} {param.opts[0]}".strip()
        for param in command.params
        if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip()
    ]
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, f"{path} {name}"
            found += _without_help(sub, f"{path} {name}".strip(), click.Context(sub, ctx, name))
    return found


def test_every_command_and_option_says_what_it_does_in_its_help() -> None:
    missing = _without_help(main, "", click.Context(main, info_name="meterproof"))
    assert not missing, sorted(missing)


def _taking_a_database_url(command: click.Command, path: list[str]) -> list[list[str]]:
    found = [path] if any("--database-url" in p.opts for p in command.params) else []
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None
            found += _taking_a_database_url(sub, [*path, name])
    return found


def test_a_database_url_libpq_cannot_parse_is_bad_input_for_every_command() -> None:
    commands = _taking_a_database_url(main, [])
    assert len(commands) > 10
    for path in commands:
        result = CliRunner().invoke(main, [*path, "--database-url", "not a url"])
        assert result.exit_code == 2, (path, result.output)
        assert "Invalid value for '--database-url'" in result.output, (path, result.output)
