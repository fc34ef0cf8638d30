"""The commands the README and docs show exist: every ``nasq ...`` command of their shell blocks and inline code
names a real (sub)command, and every ``--flag`` on it is one that (sub)command accepts (a renamed or removed flag
breaks the first thing a new user copies)."""

import argparse
import re
from pathlib import Path

import pytest

from nasq.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "SECURITY.md", *sorted((REPO / "docs").glob("*.md"))]


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:  # argparse keeps its subcommands here; no public accessor
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _commands(text: str) -> list[tuple[int, str]]:
    """``(line number, command)`` of each ``nasq ...`` command in the ```bash blocks (continuation lines joined,
    comments dropped) and in inline code spans (`` `nasq ...` ``)."""
    out, block, pending = [], False, None
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            block = line.strip() in ("```bash", "```sh", "```console") and not block
            continue
        if not block:
            continue
        code = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if pending is not None:
            pending = (pending[0], pending[1] + " " + code.rstrip("\\").strip())
        elif code.lstrip().startswith("nasq "):
            pending = (i, code.strip().rstrip("\\").rstrip())
        if pending is not None and not code.endswith("\\"):
            out.append(pending)
            pending = None
    return out + [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in re.finditer(r"`(nasq [^`]+)`", text)]


def _check(cmd: str) -> list[str]:
    words = cmd.split()[1:]
    parser, path = build_parser(), ["nasq"]
    while words and (sub := _subparsers(parser)):
        name = words[0]
        if name.startswith("{"):  # "nasq bench {train-step,search-step,infer}": each one
            return [e for n in name.strip("{}").split(",") for e in _check(" ".join(["nasq", *path[1:], n]))]
        if name.isupper():  # a placeholder: "nasq COMMAND --help"
            return []
        if name not in sub:
            return [f"{' '.join(path)}: no subcommand {name!r}"]
        parser, path, words = sub[name], [*path, name], words[1:]
    errors = []
    chosen = next((a for a in parser._actions if not a.option_strings and a.choices), None)
    if chosen is not None and words and not words[0].startswith("-"):  # e.g. "nasq baseline measured"
        errors += [f"{' '.join(path)}: {n!r} is not one of {', '.join(chosen.choices)}"
                   for n in words[0].strip("{}").split(",") if n not in chosen.choices]
    flags = {o for a in parser._actions for o in a.option_strings}
    return errors + [f"{' '.join(path)}: no flag {w.split('=')[0]}" for w in words
                     if re.fullmatch(r"--[a-z][a-z0-9-]*(=.*)?", w) and w.split("=")[0] not in flags]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_commands_exist(doc):
    cmds = _commands(doc.read_text())
    errors = [f"{doc.name}:{line}: {e}  ({cmd})" for line, cmd in cmds for e in _check(cmd)]
    assert not errors, "\n".join(errors)


def test_the_checker_catches_a_wrong_flag_and_subcommand():
    assert _check("nasq finalize runs/search --out plan.json") == []
    assert _check("nasq pipeline --preset quick --latency-ms 5") == ["nasq pipeline: no flag --latency-ms"]
    assert _check("nasq baseline median --bits 2")[0].startswith("nasq baseline: 'median' is not one of uniform")
    assert _check("nasq bench {infer,nope}") == ["nasq bench: 'nope' is not one of train-step, search-step, infer"]
    text = "```bash\nnasq search --teacher t \\\n    --avg-bits 2 --nope 1   # a comment --also\n```\n"
    assert _commands(text) == [(2, "nasq search --teacher t --avg-bits 2 --nope 1")]
