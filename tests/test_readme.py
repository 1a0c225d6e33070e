"""The README's examples work as written: the Python API example runs when pasted into a file,
the quickstart prompt is the one `esp-run serve` suggests, and every serve flag is documented."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme() -> str:
    return README.read_text(encoding="utf-8")


def code_block(after_heading: str, lang: str) -> str:
    text = readme()
    section = text[text.index(after_heading):]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"no ```{lang} block after {after_heading!r} in README.md"
    return match.group(1)


@pytest.mark.slow
def test_python_api_example_runs_as_a_script(tmp_path):
    code, n = re.subn(r"max_tokens=\d+", "max_tokens=8", code_block("### Python API", "python"))
    assert n == 1, "the example should set max_tokens once"
    assert 'if __name__ == "__main__":' in code and "asyncio.run(main())" in code
    script = tmp_path / "example.py"
    script.write_text(code)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert re.search(r"[A-Za-z]{2}", res.stdout), f"no text generated: {res.stdout!r}"


def test_quickstart_prompt_is_the_one_the_server_suggests():
    from esp.cli.serve import QUICKSTART_PROMPT

    curl = code_block("Then, from another shell:", "bash")
    assert f'"prompt": "{QUICKSTART_PROMPT}"' in curl
    assert f'generate("{QUICKSTART_PROMPT}"' in code_block("### Python API", "python")


def test_every_serve_flag_is_in_the_readme():
    from esp.cli.main import build_parser

    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    flags = {s for action in serve._actions for s in action.option_strings if s.startswith("--") and s != "--help"}
    text = readme()
    assert sorted(f for f in flags if f not in text) == []

