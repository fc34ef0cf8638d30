"""Tokenization, length bucketing and deterministic, resumable batch iteration.

Shapes are static: every batch is ``[batch_size, bucket_len]`` with ``bucket_len`` taken from a fixed tuple of
bucket lengths, so a jitted step compiles at most ``len(buckets)`` times. A short batch is filled with dummy
rows (``weights == 0``, ``index == -1``, all-pad tokens, ``attention_mask == 0``); losses and metrics must be
weighted by ``weights``.

`Batch` is registered as a JAX pytree (``jax.tree_util.register_dataclass``), so it can be passed straight
into jitted functions.

Order: an epoch's plan is a pure function of ``(seed, epoch)``. Each example goes to the smallest bucket
``b >= length``; indices are permuted within each bucket, cut into batches, and the batch order is permuted.
The number of batches per epoch does not depend on the seed, so global step ``s`` is batch
``s mod steps_per_epoch`` of epoch ``s // steps_per_epoch`` and resuming at ``start_step`` is exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jax
import numpy as np

from nasq.data.glue import TaskSpec, get_task
from nasq.errors import NasqError

DEFAULT_BUCKETS: tuple[int, ...] = (16, 32, 64, 128)
_TOKENIZE_CHUNK = 16384


@dataclass(frozen=True)
class Encoded:
    """A tokenized split: per-example unpadded int32 token arrays (object arrays) plus labels and lengths."""

    input_ids: np.ndarray  # object [N] of int32 [len_i]
    token_type_ids: np.ndarray  # object [N] of int32 [len_i]
    labels: np.ndarray  # int32 [N] (classification) or float32 [N] (regression)
    lengths: np.ndarray  # int32 [N]
    pad_id: int = 0
    truncated: np.ndarray | None = None  # bool [N]: the example was cut to max_len (None: not recorded)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_truncated(self) -> int:
        return 0 if self.truncated is None else int(self.truncated.sum())

    def select(self, indices: Sequence[int] | np.ndarray) -> Encoded:
        """The examples at ``indices`` (in that order), as a new `Encoded`."""
        idx = np.asarray(indices, dtype=np.int64)
        return Encoded(self.input_ids[idx], self.token_type_ids[idx], self.labels[idx], self.lengths[idx],
                       self.pad_id, None if self.truncated is None else self.truncated[idx])


def _object_array(seqs: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(seqs), dtype=object)
    out[:] = seqs
    return out


def _texts(dataset, spec: TaskSpec) -> tuple[list[str], list[str] | None]:
    return list(dataset["text_a"]), (list(dataset["text_b"]) if spec.is_pair else None)


def _tokenized(tokenizer, text_a: list[str], text_b: list[str] | None, **kwargs):
    """The tokenizer's output for ``text_a`` (paired with ``text_b``) in chunks of ``_TOKENIZE_CHUNK`` rows."""
    for start in range(0, len(text_a), _TOKENIZE_CHUNK):
        b = text_b[start:start + _TOKENIZE_CHUNK] if text_b is not None else None
        yield tokenizer(text_a[start:start + _TOKENIZE_CHUNK], b, return_attention_mask=False, **kwargs)


def encode(dataset, tokenizer, task: TaskSpec | str, max_len: int) -> Encoded:
    """Tokenize ``dataset`` (columns text_a[, text_b], label) with a (fast) HF tokenizer.

    Sequences include the special tokens and are truncated to ``max_len`` (pairs: ``longest_first``);
    ``Encoded.truncated`` marks the examples that were cut (only rows that came out exactly ``max_len`` long are
    tokenized again, untruncated, to tell).
    """
    spec = get_task(task)
    if max_len < 4:
        raise NasqError(f"max_len={max_len} is too small; need room for [CLS]/[SEP] and text (>= 4)")
    text_a, text_b = _texts(dataset, spec)
    ids: list[np.ndarray] = []
    tts: list[np.ndarray] = []
    for enc in _tokenized(tokenizer, text_a, text_b, truncation=True, max_length=max_len,
                          return_token_type_ids=True):
        chunk_ids = [np.asarray(seq, dtype=np.int32) for seq in enc["input_ids"]]
        chunk_tts = enc.get("token_type_ids")
        if chunk_tts is None:
            tts.extend(np.zeros(len(x), np.int32) for x in chunk_ids)
        else:
            tts.extend(np.asarray(x, dtype=np.int32) for x in chunk_tts)
        ids.extend(chunk_ids)
    labels = np.asarray(dataset["label"], dtype=np.float32 if spec.is_regression else np.int32)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    truncated = np.zeros(len(ids), bool)
    full = np.flatnonzero(lengths >= max_len)
    if full.size:
        a = [text_a[i] for i in full]
        b = [text_b[i] for i in full] if text_b is not None else None
        truncated[full] = _untruncated_lengths(tokenizer, a, b) > max_len
    return Encoded(_object_array(ids), _object_array(tts), labels, lengths, int(pad_id), truncated)


def token_lengths(dataset, tokenizer, task: TaskSpec | str) -> np.ndarray:
    """Untruncated token counts (special tokens included) of every example of ``dataset``."""
    return _untruncated_lengths(tokenizer, *_texts(dataset, get_task(task)))


def _untruncated_lengths(tokenizer, text_a: list[str], text_b: list[str] | None) -> np.ndarray:
    enc = _tokenized(tokenizer, text_a, text_b, truncation=False, return_token_type_ids=False)
    return np.asarray([len(x) for chunk in enc for x in chunk["input_ids"]], np.int64)


def buckets_for(max_len: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """Bucket lengths ``< max_len`` from ``buckets``, then ``max_len`` itself as the last bucket.

    ``buckets_for(128) == (16, 32, 64, 128)``, ``buckets_for(100) == (16, 32, 64, 100)``,
    ``buckets_for(256) == (16, 32, 64, 128, 256)``.
    """
    if max_len < 1:
        raise NasqError(f"max_len must be >= 1, got {max_len}")
    return tuple(sorted({int(b) for b in buckets if b < max_len})) + (int(max_len),)


@jax.tree_util.register_dataclass
@dataclass
class Batch:
    """One fixed-shape batch. ``[B, L]`` int32 token arrays; ``[B]`` labels, weights (float32), index (int32)."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    index: np.ndarray


def _bucket_of(lengths: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    b = np.asarray(buckets)
    if len(lengths) and int(lengths.max()) > int(b[-1]):
        raise NasqError(
            f"an example has {int(lengths.max())} tokens but the largest bucket is {int(b[-1])}; "
            f"use buckets_for(max_len) with the max_len used for encode()"
        )
    return np.searchsorted(b, lengths, side="left")


def epoch_plan(encoded: Encoded, batch_size: int, buckets: Sequence[int], seed: int, epoch: int,
               shuffle: bool = True) -> list[tuple[int, np.ndarray]]:
    """The batches of one epoch as ``[(bucket_len, indices), ...]``; deterministic in ``(seed, epoch)``.

    With ``shuffle=False`` indices stay ascending within each bucket and batches go bucket by bucket.
    """
    if batch_size < 1:
        raise NasqError(f"batch_size must be >= 1, got {batch_size}")
    buckets = tuple(int(b) for b in buckets)
    if list(buckets) != sorted(set(buckets)):
        raise NasqError(f"buckets must be strictly increasing, got {buckets}")
    which = _bucket_of(encoded.lengths, buckets)
    rng = np.random.default_rng([int(seed), int(epoch)]) if shuffle else None
    plan: list[tuple[int, np.ndarray]] = []
    for k, blen in enumerate(buckets):
        idx = np.flatnonzero(which == k)
        if rng is not None:
            idx = rng.permutation(idx)
        for s in range(0, len(idx), batch_size):
            plan.append((blen, idx[s:s + batch_size].astype(np.int64)))
    if rng is not None:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def make_batch(encoded: Encoded, indices: np.ndarray, bucket_len: int, batch_size: int) -> Batch:
    """Pad the examples at ``indices`` to ``[batch_size, bucket_len]``; extra rows are weight-0 dummies."""
    n = len(indices)
    if n > batch_size:
        raise ValueError(f"{n} indices do not fit a batch of {batch_size}")
    ids = np.full((batch_size, bucket_len), encoded.pad_id, dtype=np.int32)
    tts = np.zeros((batch_size, bucket_len), dtype=np.int32)
    mask = np.zeros((batch_size, bucket_len), dtype=np.int32)
    for r, i in enumerate(indices):
        seq = encoded.input_ids[i]
        m = len(seq)
        if m > bucket_len:
            raise ValueError(f"example {i} has {m} tokens > bucket_len {bucket_len}")
        ids[r, :m] = seq
        tts[r, :m] = encoded.token_type_ids[i]
        mask[r, :m] = 1
    labels = np.zeros((batch_size,), dtype=encoded.labels.dtype)
    labels[:n] = encoded.labels[np.asarray(indices, dtype=np.int64)]
    weights = np.zeros((batch_size,), dtype=np.float32)
    weights[:n] = 1.0
    index = np.full((batch_size,), -1, dtype=np.int32)
    index[:n] = indices
    return Batch(ids, tts, mask, labels, weights, index)


def steps_per_epoch(encoded: Encoded, batch_size: int, buckets: Sequence[int]) -> int:
    """Batches per epoch (independent of seed and epoch)."""
    which = _bucket_of(encoded.lengths, buckets)
    counts = np.bincount(which, minlength=len(buckets))
    return int(sum(-(-int(c) // batch_size) for c in counts))


def iterate_batches(encoded: Encoded, batch_size: int, buckets: Sequence[int], seed: int,
                    start_step: int = 0, shuffle: bool = True) -> Iterator[tuple[int, int, Batch]]:
    """Infinite ``(global_step, epoch, Batch)`` stream starting at ``start_step``.

    Yields exactly the batches an uninterrupted run from step 0 would yield from ``start_step`` on.
    """
    if len(encoded) == 0:
        raise NasqError("cannot iterate batches over an empty dataset")
    if start_step < 0:
        raise NasqError(f"start_step must be >= 0, got {start_step}")
    spe = steps_per_epoch(encoded, batch_size, buckets)
    step = int(start_step)
    epoch, offset = divmod(step, spe)
    while True:
        plan = epoch_plan(encoded, batch_size, buckets, seed, epoch, shuffle=shuffle)
        for blen, idx in plan[offset:]:
            yield step, epoch, make_batch(encoded, idx, blen, batch_size)
            step += 1
        epoch += 1
        offset = 0


def eval_batches(encoded: Encoded, batch_size: int, buckets: Sequence[int]) -> Iterator[Batch]:
    """One ordered pass over all examples (each exactly once, ``weights`` marks the real rows)."""
    for blen, idx in epoch_plan(encoded, batch_size, buckets, seed=0, epoch=0, shuffle=False):
        yield make_batch(encoded, idx, blen, batch_size)


def heldout_split(n: int, heldout: float, seed: int,
                  subset: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split train rows ``0..n-1`` into ``(train_idx, heldout_idx)``, both sorted int64, disjoint.

    ``subset`` first draws that many rows (seeded) from the ``n``; ``heldout`` is a fraction in (0, 1) of
    the (sub)set, rounded, or an int count. Deterministic in ``(n, heldout, seed, subset)``.
    """
    rng = np.random.default_rng([int(seed), 0x4E41])
    if subset is not None:
        if isinstance(subset, bool) or not 1 <= int(subset) <= n:
            raise NasqError(f"subset must be an int in [1, {n}], got {subset!r}")
        pool = np.sort(rng.choice(n, size=int(subset), replace=False))
    else:
        pool = np.arange(n)
    m = len(pool)
    if isinstance(heldout, bool):
        raise NasqError(f"heldout must be a fraction in (0, 1) or an int count, got {heldout!r}")
    if isinstance(heldout, (int, np.integer)):
        k = int(heldout)
        if not 0 <= k < m:
            raise NasqError(f"heldout count must be in [0, {m}) for {m} rows, got {k}")
    else:
        h = float(heldout)
        if not 0.0 < h < 1.0:
            raise NasqError(f"heldout fraction must be in (0, 1), got {heldout!r}")
        k = min(max(round(h * m), 1), m - 1) if m >= 2 else 0
    perm = rng.permutation(pool)
    return np.sort(perm[k:]).astype(np.int64), np.sort(perm[:k]).astype(np.int64)
