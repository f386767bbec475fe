"""The command line: usage errors and unknown commands are one line on stderr with a non-zero exit code."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import COMMANDS, main


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
def test_every_command_module_has_the_command_interface(name: str) -> None:
    import importlib

    module = importlib.import_module(COMMANDS[name][0])
    assert callable(module.configure_parser) and callable(module.run)


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
