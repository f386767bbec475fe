"""The command line: usage errors and unknown commands are one line on stderr with a non-zero exit code."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from cli.main import COMMANDS, main
from core.errors import InputError, UsageError

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "invalid choice: 'bogus'" in err and "synth" in err


def test_bad_option_value_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--n", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "invalid int value: 'x'" in err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_module_has_the_command_interface(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    module = importlib.import_module(COMMANDS[name][0])
    assert module.__name__ == f"cli.{name}", "one module per command, named after it, in the cli package"
    assert sorted(module.__all__) == ["configure_parser", "run"]
    assert len(inspect.signature(module.configure_parser).parameters) == 1
    assert len(inspect.signature(module.run).parameters) == 1
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cxr-drift {name}") and COMMANDS[name][1].split()[0] in out


def test_only_the_cli_package_uses_argparse() -> None:
    offenders = []
    for package in ("core", "training", "engine", "service"):
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                if any(n.split(".")[0] == "argparse" for n in names):
                    offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


class _Boom(Exception):
    pass


@pytest.mark.parametrize(
    ("raised", "code"),
    [(InputError("the data folder is empty"), 1), (UsageError("--limit must be >= 1"), 2)],
)
def test_domain_errors_are_one_line(
    raised: Exception, code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(args: object) -> int:
        raise raised

    monkeypatch.setattr(importlib.import_module("cli.synth"), "run", run)
    assert main(["synth", "--out", "x"]) == code
    assert capsys.readouterr().err == f"cxr-drift: error: {raised}\n"


@pytest.mark.parametrize("raised", [ValueError("a bug"), KeyError("a bug"), _Boom("a bug")])
def test_a_bug_keeps_its_traceback(raised: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only domain errors are the user's fault: a plain ValueError from a command is a bug, not bad input."""

    def run(args: object) -> int:
        raise raised

    monkeypatch.setattr(importlib.import_module("cli.synth"), "run", run)
    with pytest.raises(type(raised)):
        main(["synth", "--out", "x"])


@pytest.mark.parametrize(
    "argv",
    [
        ["synth", "--out", "{tmp}/s", "--n", "3"],
        ["train", "--arch", "densenet201", "--data", "{tmp}/missing", "--out", "{tmp}/t"],
        ["train", "--arch", "vgg16", "--data", "{tmp}", "--out", "{tmp}/t"],
        ["export", "--model-dir", "{tmp}/missing"],
        ["calibrate", "--model-dir", "{tmp}/missing", "--data", "{tmp}"],
        ["study", "--artifacts", "{tmp}/missing", "--data", "{tmp}", "--out", "{tmp}/o"],
        ["demo", "--archs", "vgg16", "--no-serve", "--dir", "{tmp}/demo"],
        ["serve", "--port", "0"],
        ["db", "upgrade", "--database-url", "mysql://nobody@127.0.0.1/x"],
        ["keys", "create", "--role", "audit", "--database-url", "sqlite:///{tmp}/missing-dir/keys.db"],
    ],
    ids=lambda argv: argv[0],
)
def test_bad_input_is_one_line_without_traceback(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    errors = [line for line in err if "error" in line.lower()]
    assert len(errors) == 1, err
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "demo").exists(), "an unknown architecture must fail before any work"
