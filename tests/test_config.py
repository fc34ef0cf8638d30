"""Typed config: YAML + --set overrides, precedence, clear errors."""

import pytest

from nasq.config import Config, build_config, load_config, parse_set
from nasq.errors import NasqError


def test_defaults_and_roundtrip(tmp_path):
    cfg = Config()
    assert cfg.model.name == "minilm-l6" and cfg.train.lr == 5e-5 and cfg.train.batch_size == 32
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg


def test_set_parsing_types():
    d = parse_set(["train.lr=1e-4", "search.gumbel=true", "data.buckets=[16, 32]", "kd.teacher=runs/t"])
    assert d == {"train": {"lr": 1e-4}, "search": {"gumbel": True}, "data": {"buckets": [16, 32]},
                 "kd": {"teacher": "runs/t"}}
    with pytest.raises(NasqError, match="KEY=VALUE"):
        parse_set(["train.lr"])


def test_precedence_later_layers_win():
    cfg = build_config(("preset", {"train": {"lr": 1.0, "seed": 3}}), ("file", {"train": {"lr": 2.0}}),
                       ("--set", {"train": {"lr": 3.0}}))
    assert cfg.train.lr == 3.0 and cfg.train.seed == 3


def test_unknown_key_names_source_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(NasqError) as e:
        load_config(p)
    assert "bad.yaml" in str(e.value) and "train.learning_rate" in str(e.value) and "unknown key" in str(e.value)


def test_invalid_value_and_two_budgets():
    with pytest.raises(NasqError, match="train.batch_size"):
        build_config(("--set", {"train": {"batch_size": 0}}))
    with pytest.raises(NasqError, match="exactly one budget"):
        build_config(("flags", {"search": {"avg_bits": 2, "budget_mb": 3}}))


def test_bad_yaml(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("train: [1, 2\n")
    with pytest.raises(NasqError, match="invalid YAML"):
        load_config(p)
    with pytest.raises(NasqError, match="not found"):
        load_config(tmp_path / "missing.yaml")
