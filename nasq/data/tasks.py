"""A task's data as the config says: train (optionally a seeded subset), held-out rows for the search's gates, dev."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from nasq.config import Config
from nasq.data.batching import Encoded, buckets_for, encode, heldout_split, token_lengths
from nasq.data.glue import TaskSpec, get_task, load_split
from nasq.models.loading import load_tokenizer, resolve_model_dir

__all__ = ["TaskData", "fitting_max_len", "load_task_data"]


@dataclasses.dataclass
class TaskData:
    task: TaskSpec
    train: Encoded  # rows used for weight updates
    heldout: Encoded | None  # rows held out of train for gate updates (search only)
    dev: Encoded  # reporting only
    buckets: tuple[int, ...]
    model_dir: Path

    def truncation_note(self, max_len: int) -> str | None:
        """A warning when ``max_len`` cut any example of a split (None when nothing was cut)."""
        parts = [f"{enc.num_truncated:,} of {len(enc):,} {name} rows"
                 for name, enc in (("train", self.train), ("held-out", self.heldout), ("dev", self.dev))
                 if enc is not None and enc.num_truncated]
        if not parts:
            return None
        return (f"warning: model.max_len {max_len} truncates {', '.join(parts)} of {self.task.name}; "
                f"raise it (e.g. --set model.max_len={min(512, 2 * max_len)}) to keep them whole")


def load_task_data(cfg: Config, *, with_heldout: bool = False, model_dir: Path | None = None) -> TaskData:
    """Read, tokenize and split the task's train/dev data as the config says."""
    task = get_task(cfg.data.task)
    model_dir = model_dir or resolve_model_dir(cfg.model.name)
    tok = load_tokenizer(model_dir)
    buckets = buckets_for(cfg.model.max_len, cfg.data.buckets)
    train_ds = load_split(task, "train", cfg.data.data_dir)
    dev = encode(load_split(task, "dev", cfg.data.data_dir), tok, task, cfg.model.max_len)
    heldout = None
    # Draw the rows first, tokenize only those (the same rows as encoding everything, then selecting).
    if with_heldout:
        tr_idx, ho_idx = heldout_split(len(train_ds), cfg.data.heldout, cfg.train.seed, cfg.data.train_subset)
        heldout = encode(train_ds.select(ho_idx), tok, task, cfg.model.max_len)
    elif cfg.data.train_subset is not None:
        tr_idx, _ = heldout_split(len(train_ds), 0, cfg.train.seed, cfg.data.train_subset)
    else:
        tr_idx = None
    train = encode(train_ds if tr_idx is None else train_ds.select(tr_idx), tok, task, cfg.model.max_len)
    return TaskData(task, train, heldout, dev, buckets, model_dir)


def fitting_max_len(cfg: Config, *, sample: int = 8000, multiple: int = 16, cap: int = 512) -> tuple[int, int]:
    """``(max_len, longest)``: the smallest multiple of ``multiple`` that holds the longest example (special tokens
    included) of the dev split and of a seeded sample of ``sample`` train rows, at most ``cap`` (the position
    table of BERT-family models). A rarer longer train row beyond the sample is cut, and the stage that loads
    the data says so (:meth:`TaskData.truncation_note`)."""
    task = get_task(cfg.data.task)
    tok = load_tokenizer(resolve_model_dir(cfg.model.name))
    train = load_split(task, "train", cfg.data.data_dir)
    idx, _ = heldout_split(len(train), 0, cfg.train.seed, min(sample, len(train)))
    lengths = np.concatenate([token_lengths(load_split(task, "dev", cfg.data.data_dir), tok, task),
                              token_lengths(train.select(idx), tok, task)])
    longest = int(lengths.max(initial=4))
    return min(cap, -(-longest // multiple) * multiple), longest
