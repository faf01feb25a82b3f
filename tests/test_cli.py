"""The `exegpt` entry point: every subcommand answers --help, unknown ones fail clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from exegpt.commands import cli


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: exegpt {name}")
    assert cli.COMMANDS[name] in out


def test_option_defaults_are_shown(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["up", "--help"])
    out = capsys.readouterr().out
    assert "(default: 127.0.0.1)" in out
    assert "(default: cpu)" in out  # --device
    # Options without a meaningful default do not print "(default: None)".
    assert "default: None" not in out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name} " in out


def test_unknown_command_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve-everything"]) == 2
    assert "unknown command 'serve-everything'" in capsys.readouterr().err


def test_a_service_with_a_bad_flag_exits_with_one_clear_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert cli.main(["scheduler", "--port", "0", "--workload", "task:Q"]) == 1
    assert "scheduler failed to start: unknown task 'Q'" in caplog.text


@pytest.mark.parametrize("name", ["worker", "stage", "up"])
@pytest.mark.parametrize("count", ["0", "-2", "two"])
def test_a_thread_count_below_one_is_refused_at_parse(
    name: str, count: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([name, "--torch-threads", count])
    assert exited.value.code == 2
    assert "--torch-threads" in capsys.readouterr().err


def _options(help_text: str) -> str:
    """The options part of a help text (the usage line above it names the program)."""
    return help_text[help_text.index("\noptions:\n") :]


@pytest.mark.parametrize(
    ("name", "module"), [("bench", "exegpt.bench"), ("router", "services.router")]
)
def test_python_m_takes_the_same_options_as_the_exegpt_command(
    name: str, module: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")  # one help width for both processes
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    exegpt_help = capsys.readouterr().out
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {module}")
    assert _options(done.stdout) == _options(exegpt_help)
