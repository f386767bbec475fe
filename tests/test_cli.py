"""The command line: usage errors and unknown commands are one line on stderr with a non-zero exit code."""

from __future__ import annotations

import pytest

from training.cli import COMMANDS, main


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
