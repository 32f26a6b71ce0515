"""The documentation agrees with the code: every command's --help, docs/cli.md, the README's test command
(run verbatim by .ci/run) and the README's Python API example.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from vlmtile.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
CLI_DOC = ROOT / "docs" / "cli.md"
TEST_COMMAND_PREFIX = 'pip install ".[test]"'


def commands(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path under the `vlmtile` group, the group itself included: () , ("preprocess",), ..."""
    paths = [prefix]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            paths += commands(command, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


def fenced_blocks(markdown: str) -> list[tuple[str, list[str]]]:
    """(info string, lines) of every ``` fenced code block."""
    return [
        (m.group(1).strip(), m.group(2).splitlines())
        for m in re.finditer(r"^```([^\n]*)\n(.*?)^```\s*$", markdown, re.MULTILINE | re.DOTALL)
    ]


@pytest.mark.parametrize("path", commands(), ids=lambda p: " ".join(("vlmtile", *p)))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_has_help(path: tuple[str, ...], flag: str) -> None:
    result = CliRunner().invoke(cli, [*path, flag], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    usage = result.stdout.splitlines()[0]
    assert usage.startswith("Usage: ")
    assert usage.split()[2 : 2 + len(path)] == list(path)
    assert len(result.stdout.splitlines()) > 3


def test_preprocess_help_lists_strategy_options() -> None:
    result = CliRunner().invoke(cli, ["preprocess", "--help"], catch_exceptions=False)
    for flag in ("--max-tiles", "--min-tiles", "--max-pixels", "--min-pixels", "--alpha", "--thumbnail"):
        assert flag in result.stdout


def test_module_entry_point() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-m", "vlmtile", "--help"], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "preprocess" in result.stdout and "strategies" in result.stdout


def readme_test_command() -> str:
    if not README.exists():
        pytest.skip("README.md not written yet")
    lines = [
        line.strip()
        for _, block in fenced_blocks(README.read_text(encoding="utf-8"))
        for line in block
        if line.strip().startswith(TEST_COMMAND_PREFIX)
    ]
    assert len(lines) == 1, f"README.md should hold exactly one test command in a code block, found {lines}"
    return lines[0]


def test_readme_test_command_is_what_ci_runs() -> None:
    command = readme_test_command()
    assert CI_RUN.exists(), ".ci/run is missing"
    script = CI_RUN.read_text(encoding="utf-8")
    run_lines = [
        line.strip() for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    # Run verbatim as a line of the script, or as the value of a variable the script evals.
    assigned = {
        m.group(1): shlex.split(m.group(2))[0]
        for line in run_lines
        if (m := re.fullmatch(r"([A-Z_]+)=(.+)", line))
    }
    verbatim = command in run_lines
    evaluated = any(value == command and f'eval "${name}"' in run_lines for name, value in assigned.items())
    assert verbatim or evaluated, f".ci/run does not run the README's test command {command!r}"
    assert "pytest" in command


def test_readme_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the README's `import vlmtile` example; every `expr  # literal` comment must be what expr gives."""
    if not README.exists():
        pytest.skip("README.md not written yet")
    blocks = [
        lines
        for info, lines in fenced_blocks(README.read_text(encoding="utf-8"))
        if info == "python" and any("vlmtile.preprocess(" in line for line in lines)
    ]
    if not blocks:
        pytest.skip("README.md has no Python API example")
    (block,) = blocks
    # The example reads sample_data/: give it a copy holding just the files it names, so the run is quick.
    names = set(re.findall(r"sample_data/([\w.-]+)", "\n".join(block)))
    (tmp_path / "sample_data").mkdir()
    for name in names:
        shutil.copy(ROOT / "sample_data" / name, tmp_path / "sample_data" / name)
    monkeypatch.chdir(tmp_path)

    namespace: dict[str, object] = {}
    exec(compile("\n".join(block), "README.md", "exec"), namespace)  # the README's own example
    checked = 0
    for line in block:
        code, _, comment = line.partition("#")
        try:
            ast.parse(code.strip(), mode="eval")
            expected = ast.literal_eval(comment.strip())
        except (ValueError, SyntaxError):
            continue  # a statement, or a comment that is prose rather than a value
        actual = eval(code.strip(), namespace)  # re-evaluate the commented expression
        assert actual == expected, (
            f"README.md: `{code.strip()}` gives {actual!r}, the comment says {expected!r}"
        )
        checked += 1
    assert checked >= 1


def test_cli_doc_covers_every_command_and_option() -> None:
    if not CLI_DOC.exists():
        pytest.skip("docs/cli.md not written yet")
    doc = CLI_DOC.read_text(encoding="utf-8")
    for path in commands():
        if path:
            assert f"vlmtile {' '.join(path)}" in doc, (
                f"docs/cli.md does not document `vlmtile {' '.join(path)}`"
            )
        command: click.Command = cli
        for name in path:
            assert isinstance(command, click.Group)
            command = command.commands[name]
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert any(opt in doc for opt in param.opts), f"docs/cli.md does not mention {param.opts}"


def test_architecture_doc_lists_every_module() -> None:
    """docs/architecture.md promises one line per module: a new module without its line fails here."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "vlmtile").rglob("*.py"))
    missing = [m for m in modules if f"`{m}`" not in text]
    assert not missing, f"docs/architecture.md has no line for {missing}"


def test_docs_links_resolve() -> None:
    """Relative links in README.md and docs/*.md point at files that exist."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
