"""The rvae-tools command line: help everywhere, meaningful exit codes."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from rvae_tools import __version__
from rvae_tools.cli import COMMANDS, main


def test_top_level_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out


def test_no_command_and_unknown_command_exit_2(capsys):
    assert main([]) == 2
    assert main(["segmnet"]) == 2
    assert "unknown command 'segmnet'" in capsys.readouterr().err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"rvae-tools {command}" in capsys.readouterr().out


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["provenance"])
    assert info.value.code == 2


def test_console_script_installed():
    exe = shutil.which("rvae-tools")
    if exe is None:
        pytest.skip("the package is not installed (no rvae-tools on PATH)")
    proc = subprocess.run([exe, "validate-config", "/nonexistent.yaml"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "rvae-tools validate-config: error: /nonexistent.yaml: config file not found"
