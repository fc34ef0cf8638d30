"""Search-space YAML schema and resolution against model shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nasq.contract.space import (
    SearchedTensor,
    group_sizes,
    load_space,
    parse_space,
    resolve,
    search_spaces_dir,
)
from nasq.errors import NasqError
from nasq.testing import bert_shapes

SHIPPED = sorted(p.stem for p in search_spaces_dir().glob("*.yaml"))  # every space the package ships


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def base() -> dict:
    return yaml.safe_load((search_spaces_dir() / "tiny.yaml").read_text())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spaces_load_and_resolve_on_minilm(name):
    space = load_space(name)
    assert space.name == name
    ts = resolve(space, bert_shapes(), num_heads=12)
    assert len(ts) == 36 + name.startswith("whole_model")
    for t in ts:
        assert sum(t.group_sizes) == t.rows and list(t.choices) == sorted(t.choices)


def test_load_by_path_equals_by_name():
    a = load_space("aqbert_128g")
    b = load_space(search_spaces_dir() / "aqbert_128g.yaml")
    assert a == b and b.source.endswith("aqbert_128g.yaml")


def test_unknown_name_lists_available():
    with pytest.raises(NasqError, match="aqbert_128g"):
        load_space("no_such_space")


def test_aqbert_minilm_groups():
    ts = resolve(load_space("aqbert_128g"), bert_shapes(), num_heads=12)
    assert len(ts) == 36
    by = {t.path: t for t in ts}
    q = by["encoder.layer.0.attention.self.query"]
    assert q.group_sizes == (3,) * 128 and q.cols == 384 and q.has_bias and q.kind == "linear"
    assert q.choices == (0, 2, 4, 8) and q.rule == "attention_qkv"
    assert by["encoder.layer.5.attention.output.dense"].group_sizes == (3,) * 128
    assert by["encoder.layer.2.intermediate.dense"].group_sizes == (12,) * 128
    fo = by["encoder.layer.2.output.dense"]
    assert fo.group_sizes == (3,) * 128 and fo.cols == 1536
    # order follows the shapes dict
    assert [t.path for t in ts] == [p for p in bert_shapes() if p in by]


def test_per_head_and_per_channel_and_per_matrix():
    shapes = bert_shapes()
    by = {t.path: t for t in resolve(load_space("per_head"), shapes, num_heads=12)}
    assert by["encoder.layer.0.attention.self.key"].group_sizes == (32,) * 12
    assert by["encoder.layer.0.intermediate.dense"].num_groups == 128
    pc = resolve(load_space("per_channel"), shapes, num_heads=12)
    assert all(t.group_sizes == (1,) * t.rows for t in pc)
    pm = resolve(load_space("per_matrix"), shapes, num_heads=12)
    assert all(t.group_sizes == (t.rows,) for t in pm)


def test_whole_model_embeddings():
    ts = resolve(load_space("whole_model"), bert_shapes(), num_heads=12)
    emb = ts[0]
    assert emb.path == "embeddings.word_embeddings" and emb.kind == "embedding" and not emb.has_bias
    assert (emb.rows, emb.cols, emb.num_groups) == (30522, 384, 256)
    assert emb.group_sizes[0] == 120 and emb.group_sizes[-1] == 119  # 30522 = 256*119 + 58
    assert emb.choices == (2, 4, 8)  # vocabulary rows are never pruned (a pruned row embeds its tokens to zero)
    assert all(0 in t.choices for t in ts[1:])  # encoder linears may still be pruned


def test_whole_model_w1234_prunes_nothing():
    """The whole-artifact space of the protocol's 8 / 10 MB budgets: whole_model's groups, no 0 bits anywhere, and
    uniform 2 and 3 bits inside it (the baselines those budgets compare against)."""
    ts = resolve(load_space("whole_model_w1234"), bert_shapes(), num_heads=12)
    ref = resolve(load_space("whole_model"), bert_shapes(), num_heads=12)
    assert [(t.path, t.group_sizes) for t in ts] == [(t.path, t.group_sizes) for t in ref]
    assert ts[0].choices == (2, 3, 4) and all(t.choices == (1, 2, 3, 4) for t in ts[1:])


def test_tiny_space_on_tiny_bert():
    ts = resolve(load_space("tiny"), bert_shapes(layers=2, hidden=32, ffn=64, vocab=100), num_heads=2)
    assert len(ts) == 12 and all(t.group_sizes == (8,) * 4 or t.group_sizes == (16,) * 4 for t in ts)


def test_group_sizes_matches_array_split():
    import numpy as np

    for rows, g in [(10, 3), (384, 128), (30522, 256), (5, 5), (7, 1)]:
        assert group_sizes(rows, g) == tuple(len(a) for a in np.array_split(np.arange(rows), g))


def test_groups_clamped_to_rows():
    # aqbert's 128 groups on a hidden-32 model: one row per group
    ts = resolve(load_space("aqbert_128g"), bert_shapes(layers=1, hidden=32, ffn=64, vocab=50), num_heads=2)
    by = {t.path: t for t in ts}
    assert by["encoder.layer.0.attention.self.query"].group_sizes == (1,) * 32
    assert by["encoder.layer.0.intermediate.dense"].group_sizes == (1,) * 64


def test_has_bias_override():
    shapes = bert_shapes(layers=1, hidden=32, ffn=64, vocab=50)
    ts = resolve(load_space("tiny"), shapes, 2, has_bias={"encoder.layer.0.output.dense": False})
    assert [t.has_bias for t in ts] == [True] * 5 + [False]


def test_searched_tensor_is_frozen():
    t = resolve(load_space("tiny"), bert_shapes(1, 32, 64, 50), 2)[0]
    assert isinstance(t, SearchedTensor)
    with pytest.raises(AttributeError):
        t.rows = 3  # type: ignore[misc]


# ------------------------------------------------------------------------------------------ schema errors


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.update(bogus=1), r"bogus: unknown key"),
        (lambda d: d["rules"][1].update(group=4), r"rules\[1\]\.group: unknown key"),
        (lambda d: d["fixed"].update(word_embeddings_bits=4), r"fixed\.word_embeddings_bits"),
        (lambda d: d["rules"][1].update(choices=[0, 2, 9]), r"rules\[1\]\.choices: .*\[9\] outside 0\.\.8"),
        (lambda d: d["rules"][1].update(choices=[2, 4, 2]), r"rules\[1\]\.choices: duplicate choices"),
        (lambda d: d["rules"][0].update(choices=[]), r"rules\[0\]\.choices: choices is empty"),
        (lambda d: d["rules"][0].update(choices=[0]), r"rules\[0\]\.choices: .*non-zero"),
        (lambda d: d["rules"][0].update(choices=[True, 2]), r"rules\[0\]\.choices\[0\]"),
        (lambda d: d["rules"][0].update(groups=0), r"rules\[0\]\.groups: groups must be >= 1"),
        (lambda d: d["rules"][0].update(groups="per_row"), r"rules\[0\]\.groups: must be an integer"),
        (lambda d: d["rules"][1].update(name="attention"), r"duplicate rule name"),
        (lambda d: d.pop("name"), r"name: required key is missing"),
        (lambda d: d.update(quant_mode="asym"), r"quant_mode"),
        (lambda d: d.update(rules=[]), r"rules"),
    ],
)
def test_schema_errors_name_file_and_key(tmp_path, mutate, needle):
    d = base()
    mutate(d)
    path = write(tmp_path, d)
    with pytest.raises(NasqError, match=needle) as e:
        load_space(path)
    assert str(path) in str(e.value)


def test_bad_yaml_and_non_mapping(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(NasqError, match="not valid YAML"):
        load_space(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(NasqError, match="must be a mapping"):
        load_space(p)


def test_pattern_matching_nothing(tmp_path):
    d = base()
    d["rules"][1]["patterns"].append("encoder.layer.*.ffn.dense")
    path = write(tmp_path, d)
    with pytest.raises(
        NasqError, match=r"rules\[1\]\.patterns\[2\] 'encoder\.layer\.\*\.ffn\.dense' matches no"
    ):
        resolve(load_space(path), bert_shapes(1, 32, 64, 50), 2)


def test_tensor_matched_by_two_rules(tmp_path):
    d = base()
    d["rules"][1]["patterns"].append("encoder.layer.0.attention.*.query")
    path = write(tmp_path, d)
    with pytest.raises(
        NasqError, match=r"encoder\.layer\.0\.attention\.self\.query is matched by rules\[0\]"
    ):
        resolve(load_space(path), bert_shapes(1, 32, 64, 50), 2)


def test_per_head_indivisible_rows_and_embedding():
    with pytest.raises(NasqError, match="divisible"):
        resolve(load_space("per_head"), bert_shapes(1, 30, 64, 50), num_heads=4)
    d = base()
    d["rules"].append(
        {"name": "emb", "patterns": ["embeddings.word_embeddings"], "groups": "per_head", "choices": [2, 8]}
    )
    with pytest.raises(NasqError, match="per_head does not apply to embedding"):
        resolve(parse_space(d), bert_shapes(1, 32, 64, 50), 2)


def test_match_path_is_component_wise():
    from nasq.contract.space import match_path

    assert match_path("encoder.layer.3.output.dense", "encoder.layer.*.output.dense")
    assert not match_path("encoder.layer.3.attention.output.dense", "encoder.layer.*.output.dense")
    assert match_path("encoder.layer.3.attention.output.dense", "encoder.layer.**.output.dense")
    assert match_path("encoder.layer.3.output.dense", "encoder.layer.**.output.dense")
    assert match_path("encoder.layer.11.attention.self.key", "encoder.layer.1?.attention.self.[kq]*")
    assert not match_path("encoder.layer.1.attention.self.key", "encoder.layer.1?.attention.self.key")
    assert match_path("pooler.dense", "**") and not match_path("pooler.dense", "*")
