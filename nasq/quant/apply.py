"""Apply a plan to a model: the fixed-plan (QAT) model as a pure function of an fp32 BERT and a ``Plan``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from flax import nnx

from nasq.errors import NasqError
from nasq.models.bert import Embedding, Linear
from nasq.models.surgery import module_shapes, replace_modules, strip_root
from nasq.quant.layers import QuantEmbedding, QuantLinear
from nasq.quant.quantizer import init_plan_scales

if TYPE_CHECKING:  # the plan format lives in the contract layer, above this one
    from nasq.contract.plan import Plan

__all__ = ["apply_plan", "check_plan_matches"]


def check_plan_matches(plan: Plan, model: nnx.Module) -> None:
    """Raise ``NasqError`` unless every plan tensor exists in ``model`` with the same kind and (rows, cols)."""
    shapes = module_shapes(model)
    problems = []
    for t in plan.tensors:
        got = shapes.get(t.path)
        if got is None:
            problems.append(f"{t.path}: not in the model")
        elif got != (t.kind, t.rows, t.cols):
            problems.append(f"{t.path}: plan has {t.kind} {t.rows}x{t.cols}, model has {got[0]} {got[1]}x{got[2]}")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems) - 6} more)" if len(problems) > 6 else "")
        raise NasqError(f"plan {plan.source} was made for another model: {shown}. Use a plan finalized for "
                        "this model (same architecture and search space)")


def apply_plan(model: nnx.Module, plan: Plan, scales: Mapping[str, np.ndarray] | None = None, *,
               init_steps: bool = True) -> nnx.Module:
    """A copy of ``model`` (``BertForSequenceClassification``) quantized as ``plan`` says (pure).

    * plan tensors: ``QuantLinear`` / ``QuantEmbedding`` with the plan's groups and bits (pruned groups give
      zero rows and zero bias);
    * unsearched embeddings: ``embeddings.word_embeddings*`` at ``fixed.word_embeddings_bits``, other
      embeddings at ``fixed.other_embeddings_bits``; unsearched linears (pooler, classifier) at
      ``fixed.unsearched_linear_bits``. At 8 bits: one group per row (int8, one step per vocabulary entry /
      output feature, as :func:`nasq.contract.cost.fixed_nbytes` counts); at 32 the module stays fp32.

    ``scales`` (``{plan path: [G] steps}``, e.g. from the search) initialise the searched tensors' steps;
    otherwise (and for the fixed int8 tensors) each group's step is the MSE-optimal one; without ``init_steps``
    every step not given is 1.0 (for a model whose state is loaded right after: the MSE search costs seconds).
    """
    check_plan_matches(plan, model)
    scales = dict(scales or {})
    unknown = sorted(set(scales) - set(plan.paths))
    if unknown:
        raise NasqError(f"scales given for tensors not in plan {plan.source}: {', '.join(unknown[:5])}")
    by_path = {t.path: t for t in plan.tensors}
    for path, s in list(scales.items()):
        s = np.asarray(s, np.float32).reshape(-1)
        if s.shape != (by_path[path].num_groups,):
            raise NasqError(f"scales for {path} have {s.size} entries, the plan has {by_path[path].num_groups} "
                            "groups")
        scales[path] = s
    mode = plan.quant_mode

    def fn(mpath: str, mod):
        if not isinstance(mod, Linear | Embedding):
            return None
        path = strip_root(mpath)
        w_rows = np.asarray(mod.kernel[...]).T if isinstance(mod, Linear) else np.asarray(mod.embedding[...])
        t = by_path.get(path)
        if t is not None:
            sizes, bits = t.group_sizes, t.bits
            s = scales.get(path)
        else:
            if isinstance(mod, Embedding):
                fixed_bits = (plan.fixed.word_embeddings_bits if path.startswith("embeddings.word_embeddings")
                              else plan.fixed.other_embeddings_bits)
            else:
                fixed_bits = plan.fixed.unsearched_linear_bits
            if fixed_bits == 32:
                return None
            sizes, bits, s = (1,) * w_rows.shape[0], (fixed_bits,) * w_rows.shape[0], None
        if s is None:
            s = init_plan_scales(w_rows, sizes, bits, mode) if init_steps else np.ones(len(sizes), np.float32)
        cls = QuantLinear if isinstance(mod, Linear) else QuantEmbedding
        return cls(mod, path, sizes, bits, mode=mode, scales=s)

    return replace_modules(model, fn)
