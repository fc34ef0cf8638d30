"""Search spaces: which tensors are searched, how their rows are grouped, and which bit widths they may take.

A search space is a YAML file (``search_spaces/<name>.yaml``) validated by pydantic (unknown keys are errors)::

    name: aqbert_128g                # identifier, recorded in run dirs
    description: free text
    quant_mode: symmetric            # symmetric: b>=2 uses -(2^(b-1)-1)..2^(b-1)-1 (2 bits = ternary)
                                     # signed: LSQ full range -2^(b-1)..2^(b-1)-1
    activations: {bits: 8, granularity: per_token}   # bits 2..8; per_token | per_tensor
    fixed:                           # precision of everything NOT matched by a rule
      word_embeddings_bits: 8        # 8 (int8 + fp32 scale per vocabulary row) | 32 (fp32)
      other_embeddings_bits: 32      # position / token-type embeddings: 8 | 32
      unsearched_linear_bits: 32     # any linear no rule matches (pooler, classifier, ...): 8 | 32
    rules:
      - name: attention_qkv          # unique per file
        patterns: ["encoder.layer.*.attention.self.query", ...]   # dotted-path globs, see below
        groups: 128                  # int G >= 1 | per_matrix (G=1) | per_head (G=num_heads) | per_channel (G=rows)
        choices: [0, 2, 4, 8]        # distinct bit widths in 0..8, 0 = pruned; at least one non-zero

LayerNorm parameters and biases of unsearched layers are always fp32; biases of searched linears are fp32 and
part of their group's bytes (see :func:`nasq.quant.packing.group_nbytes`).

Patterns are ``fnmatch`` globs applied **per dotted component** (case-sensitive): ``*``, ``?`` and ``[...]`` never
cross a ``.``, and a whole component ``**`` matches zero or more components. So
``encoder.layer.*.output.dense`` matches the FFN output ``encoder.layer.3.output.dense`` but not
``encoder.layer.3.attention.output.dense`` (plain ``fnmatch`` would match both); use
``encoder.layer.**.output.dense`` to mean both.

Decisions:

* ``groups: G`` larger than a tensor's rows is **clamped** to ``rows`` (one row per group, i.e. per-channel), so
  one space file works for models of any width; the resolved :class:`SearchedTensor` shows the real count.
* ``per_head`` means G = ``num_heads`` contiguous row groups. For q/k/v these are exactly the attention heads
  (a pruned group removes a head); for other linears it is just a G=heads split. Rows not divisible by
  ``num_heads`` and embeddings with ``per_head`` are errors.
* Every pattern must match at least one tensor of the model, and no tensor may be matched by two rules
  (checked by :func:`resolve`, which knows the model's tensors).
* Rows are output features for linears (the ``(out, in)`` view) and vocabulary entries for embeddings
  (``(vocab, hidden)``); groups are contiguous ``numpy.array_split`` sizes (first ``rows % G`` groups get one
  extra row). A module path under ``embeddings.`` is an embedding (no bias), anything else a linear.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from nasq.errors import NasqError, validation_problems
from nasq.io import read_yaml

__all__ = [
    "Activations",
    "Fixed",
    "Rule",
    "SearchSpace",
    "SearchedTensor",
    "SpaceInfo",
    "group_sizes",
    "load_space",
    "match_path",
    "parse_space",
    "resolve",
    "search_spaces_dir",
    "tensor_kind",
]

GroupSpec = int | Literal["per_matrix", "per_head", "per_channel"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Activations(_Strict):
    """Activation quantization of quantized linears (fixed, not searched)."""

    bits: int = Field(8, ge=2, le=8)
    granularity: Literal["per_token", "per_tensor"] = "per_token"


class Fixed(_Strict):
    """Precision of the tensors no rule matches (LayerNorm and unsearched biases are always fp32)."""

    word_embeddings_bits: Literal[8, 32] = 8
    other_embeddings_bits: Literal[8, 32] = 32
    unsearched_linear_bits: Literal[8, 32] = 32


class Rule(_Strict):
    """One group of searched tensors sharing a subgroup layout and bit choices."""

    name: str = Field(min_length=1)
    patterns: list[str] = Field(min_length=1)
    groups: GroupSpec
    choices: list[StrictInt]

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.strip():
                raise ValueError("empty pattern")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate patterns in {v}")
        return v

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: GroupSpec) -> GroupSpec:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"groups must be >= 1 or per_matrix/per_head/per_channel, got {v}")
        return v

    @field_validator("choices")
    @classmethod
    def _choices(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("choices is empty: list bit widths such as [0, 2, 4, 8]")
        bad = [b for b in v if not 0 <= b <= 8]
        if bad:
            raise ValueError(f"bit width(s) {bad} outside 0..8 (0 = pruned)")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate choices in {v}")
        if all(b == 0 for b in v):
            raise ValueError("choices must contain a non-zero bit width (only 0 would prune every row)")
        return sorted(v)


class SearchSpace(_Strict):
    """A validated search space (see the module docstring for the YAML schema)."""

    name: str = Field(min_length=1)
    description: str = ""
    quant_mode: Literal["symmetric", "signed"] = "symmetric"
    activations: Activations = Activations()
    fixed: Fixed = Fixed()
    rules: list[Rule] = Field(min_length=1)
    _source: str = PrivateAttr(default="<inline>")

    @model_validator(mode="after")
    def _unique_rule_names(self) -> SearchSpace:
        seen: set[str] = set()
        for r in self.rules:
            if r.name in seen:
                raise ValueError(f"duplicate rule name {r.name!r}")
            seen.add(r.name)
        return self

    @property
    def source(self) -> str:
        """The file this space was loaded from (``<inline>`` for dicts)."""
        return self._source


@dataclass(frozen=True)
class SearchedTensor:
    """One searched weight matrix, resolved against a model's shapes.

    ``rows`` = output features (vocabulary size for embeddings), ``cols`` = input features (hidden size for
    embeddings); ``group_sizes`` are contiguous row counts summing to ``rows``; ``choices`` are sorted bits.
    """

    path: str
    rule: str
    rows: int
    cols: int
    group_sizes: tuple[int, ...]
    choices: tuple[int, ...]
    has_bias: bool
    kind: Literal["linear", "embedding"]

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes)

    @property
    def num_weights(self) -> int:
        return self.rows * self.cols

    @property
    def row_offsets(self) -> tuple[int, ...]:
        """Start row of each group (length G+1, last = rows)."""
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.group_sizes)]))

    def to_dict(self) -> dict:
        """The JSON form (``search_result.json``; ``plan.json`` tensors add their bits)."""
        return {"path": self.path, "rule": self.rule, "rows": self.rows, "cols": self.cols,
                "group_sizes": list(self.group_sizes), "choices": list(self.choices), "has_bias": self.has_bias,
                "kind": self.kind}

    @classmethod
    def from_dict(cls, d: object, where: str) -> SearchedTensor:
        """Inverse of :meth:`to_dict`; a missing key or a wrong type is a ``NasqError`` naming ``where``."""
        missing = [k for k in _TENSOR_FIELDS if k not in d] if isinstance(d, dict) else list(_TENSOR_FIELDS)
        if missing:
            raise NasqError(f"{where} lacks {', '.join(missing)}")
        try:
            return cls(path=str(d["path"]), rule=str(d["rule"]), rows=int(d["rows"]), cols=int(d["cols"]),
                       group_sizes=tuple(int(x) for x in d["group_sizes"]),
                       choices=tuple(int(x) for x in d["choices"]), has_bias=bool(d["has_bias"]), kind=d["kind"])
        except (TypeError, ValueError) as e:
            raise NasqError(f"{where}: invalid value ({e})") from None


_TENSOR_FIELDS = ("path", "rule", "rows", "cols", "group_sizes", "choices", "has_bias", "kind")


@dataclass(frozen=True)
class SpaceInfo:
    """What a plan needs from its search space (a :class:`SearchSpace` carries the same attributes)."""

    name: str
    source: str
    quant_mode: Literal["symmetric", "signed"] = "symmetric"
    activations: Mapping[str, Any] = field(default_factory=lambda: {"bits": 8, "granularity": "per_token"})
    fixed: Fixed = field(default_factory=Fixed)

    @classmethod
    def of(cls, space: SearchSpace | SpaceInfo) -> SpaceInfo:
        if isinstance(space, SpaceInfo):
            return space
        return cls(name=space.name, source=space.source, quant_mode=space.quant_mode,
                   activations=space.activations.model_dump(), fixed=space.fixed)


def search_spaces_dir() -> Path:
    """The repository's ``search_spaces/`` directory."""
    return Path(__file__).resolve().parents[2] / "search_spaces"


def _format_validation(err: ValidationError, source: str) -> str:
    problems = validation_problems(err, unknown_key_hint="check spelling; see nasq/contract/space.py for the schema")
    return f"invalid search space {source}:\n" + "\n".join(f"  {p}" for p in problems)


def parse_space(data: object, source: str = "<inline>") -> SearchSpace:
    """Validate a loaded YAML mapping into a :class:`SearchSpace` (errors name ``source`` and the key path)."""
    if not isinstance(data, dict):
        raise NasqError(
            f"invalid search space {source}: the top level must be a mapping, got {type(data).__name__}"
        )
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as e:
        raise NasqError(_format_validation(e, source)) from None
    space._source = source
    return space


def load_space(path_or_name: str | Path) -> SearchSpace:
    """Load a search space by file path or by name (``aqbert_128g`` -> ``search_spaces/aqbert_128g.yaml``)."""
    p = Path(path_or_name)
    candidates = [p]
    if p.suffix not in (".yaml", ".yml") and len(p.parts) == 1:
        candidates = [search_spaces_dir() / f"{p.name}.yaml", p]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        avail = sorted(q.stem for q in search_spaces_dir().glob("*.yaml"))
        raise NasqError(
            f"search space {str(path_or_name)!r} not found (tried {', '.join(str(c) for c in candidates)}); "
            f"pass a YAML path or one of: {', '.join(avail) or '(none)'}"
        )
    return parse_space(read_yaml(path, what="search space", max_bytes=2**24, expect=None), str(path))


def match_path(path: str, pattern: str) -> bool:
    """True if dotted ``path`` matches ``pattern`` component-wise (``fnmatchcase`` per component, ``**`` = any
    number of whole components)."""
    return _match(path.split("."), pattern.split("."))


def _match(parts: list[str], pats: list[str]) -> bool:
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and _match(parts[1:], pats[1:])


def tensor_kind(path: str) -> Literal["linear", "embedding"]:
    """``embedding`` for module paths under ``embeddings.`` (``embeddings.word_embeddings``), else ``linear``."""
    return "embedding" if path.startswith("embeddings.") else "linear"


def group_sizes(rows: int, groups: int) -> tuple[int, ...]:
    """Contiguous ``numpy.array_split`` sizes: ``rows`` split into ``groups`` parts, first ``rows % groups`` larger."""
    q, r = divmod(rows, groups)
    return tuple(q + 1 if i < r else q for i in range(groups))


def _num_groups(
    space: SearchSpace, i: int, rule: Rule, path: str, rows: int, num_heads: int, kind: str
) -> int:
    where = f"search space {space.source}: rules[{i}].groups ({rule.name})"
    g = rule.groups
    if g == "per_matrix":
        return 1
    if g == "per_channel":
        return rows
    if g == "per_head":
        if kind == "embedding":
            raise NasqError(
                f"{where}: per_head does not apply to embedding {path}; use an integer group count"
            )
        if num_heads < 1 or rows % num_heads:
            raise NasqError(
                f"{where}: per_head needs rows divisible by num_heads, but {path} has {rows} rows and "
                f"{num_heads} heads; use an integer group count instead"
            )
        return num_heads
    assert isinstance(g, int)
    return min(g, rows)  # documented: clamp to one row per group


def resolve(
    space: SearchSpace,
    shapes: dict[str, tuple[int, int]],
    num_heads: int,
    has_bias: dict[str, bool] | None = None,
) -> list[SearchedTensor]:
    """Match ``space``'s rules against a model's tensors.

    ``shapes`` maps module path -> ``(rows, cols)``: ``(out, in)`` for linears, ``(vocab, hidden)`` for embeddings.
    Only paths matched by a rule are returned, in the order of ``shapes``. ``has_bias`` overrides the default
    (True for linears; embeddings never have one).
    """
    has_bias = has_bias or {}
    hits: dict[str, int] = {}
    for i, rule in enumerate(space.rules):
        for j, pat in enumerate(rule.patterns):
            matched = [p for p in shapes if match_path(p, pat)]
            if not matched:
                sample = ", ".join(list(shapes)[:4])
                raise NasqError(
                    f"search space {space.source}: rules[{i}].patterns[{j}] {pat!r} matches no tensor of the "
                    f"model (paths look like: {sample}, ...); fix the pattern or remove it"
                )
            for p in matched:
                if p in hits and hits[p] != i:
                    k = hits[p]
                    raise NasqError(
                        f"search space {space.source}: tensor {p} is matched by rules[{k}] "
                        f"({space.rules[k].name}) and rules[{i}] ({rule.name}); each tensor may match one rule"
                    )
                hits[p] = i
    out = []
    for path, shape in shapes.items():
        if path not in hits:
            continue
        if len(shape) != 2:
            raise ValueError(f"shape of {path} must be (rows, cols), got {shape}")
        rows, cols = int(shape[0]), int(shape[1])
        i = hits[path]
        rule = space.rules[i]
        kind = tensor_kind(path)
        g = _num_groups(space, i, rule, path, rows, num_heads, kind)
        out.append(
            SearchedTensor(
                path=path,
                rule=rule.name,
                rows=rows,
                cols=cols,
                group_sizes=group_sizes(rows, g),
                choices=tuple(rule.choices),
                has_bias=False if kind == "embedding" else bool(has_bias.get(path, True)),
                kind=kind,
            )
        )
    return out
