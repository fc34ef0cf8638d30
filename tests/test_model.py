"""Flax BERT: checkpoint loading, errors, surgery purity, and parity with transformers' PyTorch BERT."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from nasq.errors import NasqError
from nasq.models.bert import BertConfig, BertForSequenceClassification, Linear
from nasq.models.loading import load_bert_weights, load_pretrained, read_safetensors, resolve_model_dir
from nasq.models.surgery import iter_named, linear_shapes, replace_modules


def _batch(n=2, seq=12, vocab=30522, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, (n, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, seq // 2:] = 0
    return ids, np.zeros_like(ids), mask


def test_tiny_loads_and_reports_new_head(tiny_model_dir):
    model, cfg, rep = load_pretrained(tiny_model_dir, 3)
    assert cfg.hidden_size == 32 and cfg.num_hidden_layers == 2
    assert set(rep.new_head) == {"classifier.weight", "classifier.bias"}
    ids, tt, mask = _batch()
    logits = model(jnp.asarray(ids), jnp.asarray(tt), jnp.asarray(mask))
    assert logits.shape == (2, 3) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("seed", [0, 5])
def test_load_pretrained_equals_random_init_then_load(tiny_model_dir, seed):
    """load_pretrained builds no random encoder (empty_model) but gives exactly the model a random initialisation
    with the same seed and a load would: the same weights, and the same new head."""
    model, cfg, rep = load_pretrained(tiny_model_dir, 3, seed=seed)
    assert rep.new_head
    ref = BertForSequenceClassification(cfg, 3, rngs=nnx.Rngs(seed))
    load_bert_weights(ref, read_safetensors(tiny_model_dir), str(tiny_model_dir))
    got, want = nnx.state(model, nnx.Param).flat_state(), nnx.state(ref, nnx.Param).flat_state()
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want, strict=True):
        assert isinstance(a[...], jax.Array), path  # nothing left on the host
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    other = load_pretrained(tiny_model_dir, 3, seed=seed + 1)[0]
    assert not np.array_equal(np.asarray(other.classifier.kernel[...]), np.asarray(model.classifier.kernel[...]))


def test_weights_are_loaded_transposed(tiny_model_dir):
    model, _, _ = load_pretrained(tiny_model_dir, 2)
    t = load_file(str(tiny_model_dir / "model.safetensors"))
    np.testing.assert_array_equal(np.asarray(model.bert.encoder.layer[1].intermediate.dense.kernel[...]),
                                  t["encoder.layer.1.intermediate.dense.weight"].T)


def test_bert_prefix_accepted(tiny_model_dir, tmp_path):
    t = load_file(str(tiny_model_dir / "model.safetensors"))
    d = tmp_path / "prefixed"
    d.mkdir()
    save_file({"bert." + k: v for k, v in t.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    model, _, _ = load_pretrained(d, 2)
    np.testing.assert_array_equal(np.asarray(model.bert.pooler.dense.bias[...]), t["pooler.dense.bias"])


def test_missing_and_unexpected_tensors_are_errors(tiny_model_dir, tmp_path):
    t = load_file(str(tiny_model_dir / "model.safetensors"))
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    broken = {k: v for k, v in t.items() if k != "encoder.layer.0.attention.self.key.weight"}
    broken["encoder.layer.0.attention.self.mystery.weight"] = np.zeros((2, 2), np.float32)
    save_file(broken, str(d / "model.safetensors"))
    with pytest.raises(NasqError) as e:
        load_pretrained(d, 2)
    msg = str(e.value)
    assert "encoder.layer.0.attention.self.key.weight" in msg and "mystery" in msg and "never initialises" in msg


def test_shape_mismatch_is_error(tiny_model_dir, tmp_path):
    d = tmp_path / "bigger"
    d.mkdir()
    (d / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NasqError, match="shape mismatch"):
        load_pretrained(d, 2)


def test_bad_references(tmp_path):
    with pytest.raises(NasqError, match="does not exist"):
        resolve_model_dir("./no/such/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NasqError, match="no config.json"):
        resolve_model_dir(tmp_path / "empty")
    with pytest.raises(NasqError, match="model_type"):
        BertConfig.from_dict({"model_type": "gpt2"})


def test_offline_hub_id_gives_local_path_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NasqError, match="--model PATH"):
        resolve_model_dir("some-org/some-model-that-is-not-cached")


def test_surgery_is_pure(tiny_model_dir):
    model, _, _ = load_pretrained(tiny_model_dir, 2)
    shapes = linear_shapes(model.bert)
    assert shapes["encoder.layer.0.intermediate.dense"] == (64, 32)
    assert shapes["embeddings.word_embeddings"] == (30522, 32)

    class Doubled(nnx.Module):
        def __init__(self, lin):
            self.lin = lin

        def __call__(self, x):
            return 2 * self.lin(x)

    new = replace_modules(model, lambda p, m: Doubled(m) if p.endswith("pooler.dense") else None)
    assert isinstance(model.bert.pooler.dense, Linear)  # input untouched
    assert isinstance(new.bert.pooler.dense, Doubled)
    assert len(list(iter_named(new))) == len(list(iter_named(model))) 


def test_dropout_is_deterministic_per_key(tiny_model_dir):
    import jax

    model, _, _ = load_pretrained(tiny_model_dir, 2)
    ids, tt, mask = (jnp.asarray(a) for a in _batch())
    a = model(ids, tt, mask, key=jax.random.key(1))
    b = model(ids, tt, mask, key=jax.random.key(1))
    c = model(ids, tt, mask, key=jax.random.key(2))
    d = model(ids, tt, mask)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c)) and not np.allclose(np.asarray(a), np.asarray(d))


@pytest.mark.parity
def test_parity_with_transformers_minilm():
    """Hidden states, attention distributions and pooled output vs transformers' PyTorch BertModel on the real
    MiniLM checkpoint."""
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, BertModel

    model, _cfg, rep = load_pretrained("minilm-l6", 2)
    tok = AutoTokenizer.from_pretrained(str(rep.model_dir))
    enc = tok(["a gripping, funny and moving film", "the plot is thin, but the cast saves it.", "meh"],
              ["second segment here", "another one", "x"], padding="max_length", max_length=24,
              return_tensors="np")
    ids, tt, mask = enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]
    seq, pooled, internals = model.bert(jnp.asarray(ids), jnp.asarray(tt), jnp.asarray(mask), return_internals=True)
    ref = BertModel.from_pretrained(str(rep.model_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(tt), attention_mask=torch.tensor(mask),
                  output_hidden_states=True, output_attentions=True)
    # Compared at real tokens: padded positions' outputs are never used and differ in rounding only
    # (measured: <= 4.3e-6 at real tokens, <= 1.6e-4 at padding, values up to ~10).
    real = mask.astype(bool)
    assert len(internals.hidden) == len(out.hidden_states) and len(internals.attention) == len(out.attentions)
    for ours, theirs in zip(internals.hidden, out.hidden_states, strict=True):
        assert np.abs(np.asarray(ours) - theirs.numpy())[real].max() <= 1e-4
    # attention [batch, heads, query, key] at real queries; padded keys get probability 0 in both
    for ours, theirs in zip(internals.attention, out.attentions, strict=True):
        ours = np.asarray(ours)
        assert np.abs(ours - theirs.numpy()).transpose(0, 2, 1, 3)[real].max() <= 1e-5
        np.testing.assert_allclose(ours.sum(-1), 1.0, rtol=1e-5)
        assert (ours.transpose(0, 3, 1, 2)[~real] == 0).all()
    assert np.abs(np.asarray(seq) - out.last_hidden_state.numpy())[real].max() <= 1e-4
    assert np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max() <= 1e-4


@pytest.mark.parity
def test_parity_classifier_logits(tiny_model_dir, tmp_path):
    """Logits of a sequence classifier (incl. head) vs BertForSequenceClassification."""
    torch = pytest.importorskip("torch")
    from transformers import BertForSequenceClassification as TorchCls

    t = load_file(str(tiny_model_dir / "model.safetensors"))
    rng = np.random.default_rng(3)
    t = {"bert." + k: v for k, v in t.items()}
    t["classifier.weight"] = rng.standard_normal((3, 32)).astype(np.float32)
    t["classifier.bias"] = rng.standard_normal(3).astype(np.float32)
    d = tmp_path / "cls"
    d.mkdir()
    save_file(t, str(d / "model.safetensors"))
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["num_labels"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    model, _, rep = load_pretrained(d, 3)
    assert rep.new_head == ()
    ids, tt, mask = _batch()
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(tt), jnp.asarray(mask)))
    ref = TorchCls.from_pretrained(str(d)).eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids, dtype=torch.long), token_type_ids=torch.tensor(tt, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4
