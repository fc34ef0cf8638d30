"""User-facing errors.

Anything a user can cause (bad path, bad key, infeasible budget, corrupt artifact) raises `NasqError` with a
message that says what was wrong, where (file / key), and what to do. The CLI prints the message without a
traceback and exits non-zero. Programming errors stay ordinary exceptions.
"""


from __future__ import annotations

from pydantic import ValidationError

__all__ = ["NasqError", "validation_problems"]


class NasqError(Exception):
    """An error the user can fix; its message is shown as-is by the CLI."""


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


def validation_problems(err: ValidationError, *, unknown_key_hint: str = "") -> list[str]:
    """One ``"key.path[i]: what is wrong (got value)"`` line per problem of a pydantic ``ValidationError``, each
    line once: the wording of every schema error nasq shows (configs, search spaces, latency tables)."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        typ = e["type"]
        if "groups" in loc[-2:-1]:  # a failed alternative of a search-space rule's int | literal union
            loc = loc[:-1]
            msg = f"must be an integer >= 1 or one of per_matrix, per_head, per_channel (got {e.get('input')!r})"
        elif typ == "extra_forbidden":
            msg = "unknown key" + (f" ({unknown_key_hint})" if unknown_key_hint else "")
        elif typ == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and typ not in ("value_error",):
                msg += f" (got {e['input']!r})"
        lines.append(f"{_loc(loc)}: {msg}")
    return list(dict.fromkeys(lines))  # a union reports one error per alternative
