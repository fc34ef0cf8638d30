"""Flat ``{dotted.name: array}`` views of pytrees: the key format of orbax checkpoints and safetensors files."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nasq.errors import NasqError

__all__ = ["flatten", "keystr", "unflatten_like"]


def keystr(path) -> str:
    """Dotted name of a pytree key path: `bert.encoder.layer.0.attention.self.query.kernel`."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
        else:
            parts.append(str(k))
    return ".".join(parts)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{dotted_keypath: leaf}` for any pytree (stable order), used for checkpoints and safetensors."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {prefix + keystr(p): v for p, v in leaves}


def unflatten_like(template: Any, flat: dict[str, Any], prefix: str = "", *, strict: bool = False) -> Any:
    """The inverse of :func:`flatten` for a tree shaped like ``template`` (dtypes of ``template``).

    Every leaf must be in ``flat`` with the template's shape; ``strict``: also its dtype, and no other arrays
    under ``prefix`` (for files someone else wrote)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    missing = [prefix + keystr(p) for p, _ in leaves if prefix + keystr(p) not in flat]
    if missing:
        raise NasqError(f"checkpoint is missing {len(missing)} arrays (e.g. {missing[:3]}); it was written by a "
                        "different model or search space.")
    bad = [f"{prefix + keystr(p)} has shape {tuple(np.shape(flat[prefix + keystr(p)]))}, expected {tuple(np.shape(v))}"
           for p, v in leaves if tuple(np.shape(flat[prefix + keystr(p)])) != tuple(np.shape(v))]
    if strict:
        bad += [f"{prefix + keystr(p)} has dtype {np.asarray(flat[prefix + keystr(p)]).dtype}, expected {v.dtype}"
                for p, v in leaves if np.asarray(flat[prefix + keystr(p)]).dtype != v.dtype]
        names = {prefix + keystr(p) for p, _ in leaves}
        bad += [f"unexpected array {k}" for k in flat if k.startswith(prefix) and k not in names][:3]
    if bad:
        raise NasqError(f"arrays do not fit the model: {'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(flat[prefix + keystr(p)], dtype=v.dtype) for p, v in leaves]
    )
