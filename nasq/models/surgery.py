"""Model surgery as pure functions: return a new model with some submodules replaced.

`replace_modules(model, fn)` deep-copies `model` (via `nnx.clone`) and, for each submodule at dotted path `p`
(HF-style, relative to `root`), replaces it by `fn(p, module)` when that returns a module (None = keep).
The input model is never mutated, so supernet -> discrete -> packed are three values, Equinox-style.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flax import nnx

from nasq.models.bert import Embedding, Linear
from nasq.tree import flatten


def module_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def iter_named(model: nnx.Module, types=(Linear, Embedding)):
    """Yield `(dotted_path, module)` for submodules of the given types, in definition order."""
    for path, mod in nnx.iter_modules(model):
        if isinstance(mod, types):
            yield module_path(path), mod


def linear_shapes(bert: nnx.Module) -> dict[str, tuple[int, int]]:
    """`{path: (rows, cols)}` for every Linear (rows = out features) and Embedding (rows = vocab) of a BERT."""
    out = {}
    for p, m in iter_named(bert):
        out[p] = (m.out_features, m.in_features) if isinstance(m, Linear) else (m.num_embeddings, m.features)
    return out


def _set_child(parent, key, value):
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def replace_modules(model: nnx.Module, fn: Callable[[str, nnx.Module], nnx.Module | None]) -> nnx.Module:
    """A copy of `model` where each submodule `m` at path `p` with `fn(p, m) is not None` is replaced."""
    new = nnx.clone(model)
    targets = []
    for path, mod in nnx.iter_modules(new):
        if not path:
            continue
        repl = fn(module_path(path), mod)
        if repl is not None:
            targets.append((path, repl))
    for path, repl in targets:
        parent = new
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        _set_child(parent, path[-1], repl)
    return new


def strip_root(path: str) -> str:
    """A classifier's module path relative to the BERT root: ``bert.encoder.layer.0...`` -> ``encoder.layer.0...``
    (the head stays ``classifier``)."""
    return path.removeprefix("bert.")


def module_shapes(model: nnx.Module) -> dict[str, tuple[str, int, int]]:
    """``{path: (kind, rows, cols)}`` for every Linear/Embedding of a ``BertForSequenceClassification`` (or a
    ``BertModel``), paths relative to the BERT root (``classifier`` for the head)."""
    out = {}
    for p, m in iter_named(model, (Linear, Embedding)):
        if isinstance(m, Linear):
            out[strip_root(p)] = ("linear", m.out_features, m.in_features)
        else:
            out[strip_root(p)] = ("embedding", m.num_embeddings, m.features)
    return out


def model_param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """``{param_path: shape}`` of a (fp32) model's parameters, paths relative to the BERT root
    (``embeddings.word_embeddings.embedding``, ``encoder.layer.0.attention.self.query.kernel``,
    ``classifier.kernel``): the ``param_shapes`` that :func:`nasq.contract.cost.fixed_nbytes` takes."""
    return {strip_root(k): tuple(int(d) for d in np.shape(v)) for k, v in flatten(nnx.state(model, nnx.Param)).items()}
