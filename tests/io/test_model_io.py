"""Model dirs and training workdirs: save/load, atomicity, partial restore, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import IO_2L, tiny_workdir

from sorted_jax.io import model_io
from sorted_jax.io.model_io import (
    ModelIOError,
    check_params,
    expected_param_shapes,
    flatten,
    load_model_dir,
    load_params,
    save_model_dir,
    unflatten,
    workdir_steps,
)
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.modeling import abstract_params, make_model

CONFIG = IO_2L


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)
    return unflatten({path: rng.standard_normal(shape).astype(np.float32)
                      for path, shape in expected_param_shapes(CONFIG).items()})


@pytest.mark.parametrize("config", [CONFIG, CONFIG.replace(tie_word_embeddings=True)])
def test_expected_shapes_match_model_init_and_hf_mapping(config):
    """The expected shapes are the model init's, and every HF tensor of the config maps onto
    exactly them (stacked on `layers` for decoder-layer tensors)."""
    import flax.linen as nn

    from sorted_jax.model.hf_mapping import expected_hf_names, hf_shape, hf_tensor_to_ours

    model_params = nn.unbox(abstract_params(make_model(config)))
    want = {path: tuple(x.shape) for path, x in flatten(model_params).items()}
    got = {p: tuple(s) for p, s in expected_param_shapes(config).items()}
    assert want == got
    mapped = {}
    d, v = config.hidden_size, config.vocab_size
    for name in expected_hf_names(config):
        if name.startswith("model.layers."):
            module = name.split(".", 3)[3][:-len(".weight")]
            hf = hf_shape(module, config)
        else:
            hf = (d,) if name == "model.norm.weight" else (v, d)
        path, layer, w = hf_tensor_to_ours(name, np.zeros(hf, np.float32), config)
        mapped[path] = (config.num_hidden_layers, *w.shape) if layer is not None else w.shape
    assert mapped == got


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_model_dir_roundtrip(tmp_path, params):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "unrelated.txt").write_text("x")
    jax_params = jax.tree.map(jnp.asarray, params)  # jax leaves are accepted too
    save_model_dir(tmp_path / "md", jax_params, CONFIG, tokenizer_dir_or_files=tok)
    assert sorted(p.name for p in (tmp_path / "md").iterdir()) == [
        "config.json", "params", "tokenizer.json", "tokenizer_config.json"]
    loaded, cfg = load_model_dir(tmp_path / "md")
    assert cfg == CONFIG
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(loaded))
    assert_tree_equal(loaded, params)
    p, cfg, tok_dir = load_params(tmp_path / "md")
    assert tok_dir == tmp_path / "md"
    # an HF-readable config.json
    assert json.loads((tmp_path / "md" / "config.json").read_text())["model_type"] == "llama"
    no_leftovers(tmp_path)


def test_model_dir_dtype_cast(tmp_path, params):
    save_model_dir(tmp_path / "md", params, CONFIG, tokenizer_dir_or_files=[])
    bf, _ = load_model_dir(tmp_path / "md", dtype="bfloat16")
    assert {str(x.dtype) for x in jax.tree.leaves(bf)} == {"bfloat16"}
    back = jax.tree.map(lambda x: x.astype(np.float32), bf)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-2)


def test_save_is_atomic(tmp_path, params, monkeypatch):
    def boom(path, tree):
        Path(path).mkdir()
        (Path(path) / "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(model_io, "save_params", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model_dir(tmp_path / "md", params, CONFIG)
    assert not (tmp_path / "md").exists()
    no_leftovers(tmp_path)


def test_save_refuses_existing_and_mismatched(tmp_path, params):
    (tmp_path / "md").mkdir()
    with pytest.raises(ModelIOError, match="already exists"):
        save_model_dir(tmp_path / "md", params, CONFIG)
    with pytest.raises(ModelIOError, match="num_hidden_layers|layers"):
        save_model_dir(tmp_path / "md2", params, CONFIG.replace(num_hidden_layers=3))
    assert not (tmp_path / "md2").exists()
    broken = dict(params)
    del broken["norm"]
    with pytest.raises(ModelIOError, match="missing norm/scale"):
        check_params(broken, CONFIG)


def test_load_errors(tmp_path, params):
    with pytest.raises(ModelIOError, match="does not exist"):
        load_params(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelIOError, match="neither a model dir .* nor a training workdir"):
        load_params(tmp_path / "empty")
    with pytest.raises(ModelIOError, match="is not a model dir"):
        load_model_dir(tmp_path / "empty")
    save_model_dir(tmp_path / "md", params, CONFIG)
    (tmp_path / "md" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelIOError, match="not a usable LLaMA config"):
        load_params(tmp_path / "md")


# ---------------------------------------------------------------------------------------------
# training workdirs


def boxed(params):
    """Params still wrapped in Flax logical-axis boxes (saved as `.../value` leaves)."""
    import flax.linen as nn

    return jax.tree.map(lambda x: nn.Partitioned(jnp.asarray(x), names=(None,) * x.ndim), params)


def test_workdir_latest_and_step(tmp_path, params):
    p2 = jax.tree.map(lambda x: x + np.float32(1), params)
    wd = tiny_workdir(tmp_path / "wd", CONFIG, {3: params, 7: p2})
    assert workdir_steps(wd) == [3, 7]
    latest, cfg, tok = load_params(wd)
    assert cfg == CONFIG and tok is None
    assert_tree_equal(latest, p2)
    first, _, _ = load_params(wd, step=3)
    assert_tree_equal(first, params)
    with pytest.raises(ModelIOError, match=r"available steps: \[3, 7\]"):
        load_params(wd, step=5)
    # a tokenizer saved in the workdir is found
    (wd / "tokenizer.model").write_bytes(b"x")
    assert load_params(wd)[2] == wd


def test_workdir_boxed_params(tmp_path, params):
    wd = tiny_workdir(tmp_path / "wd", CONFIG, {1: boxed(params)})
    loaded, _, _ = load_params(wd)
    assert_tree_equal(loaded, params)


def test_workdir_errors(tmp_path, params):
    wd = tiny_workdir(tmp_path / "wd", CONFIG, {})  # stopped before its first save
    with pytest.raises(ModelIOError, match="no finished checkpoint step"):
        load_params(wd)
    wd2 = tiny_workdir(tmp_path / "wd2", CONFIG.replace(num_hidden_layers=3), {1: params})
    with pytest.raises(ModelIOError, match="do not match the model config"):
        load_params(wd2)


def fsdp_tensor_shardings(config: LlamaConfig):
    """The params' shardings on a (1, 4, 2) data x fsdp x tensor mesh of the 8 fake devices."""
    from sorted_jax.parallel import sharding

    boxed = abstract_params(make_model(config))  # leaves carry their logical axis names
    return sharding.tree_shardings(boxed, sharding.make_mesh((1, 4, 2)))


@pytest.mark.parametrize("box", [False, True])
def test_sharded_load_places_each_leaf(tmp_path, params, box):
    """With shardings, leaves come back as jax.Arrays split over the mesh, equal to the disk."""
    shardings = fsdp_tensor_shardings(CONFIG)
    save_model_dir(tmp_path / "md", params, CONFIG, tokenizer_dir_or_files=[])
    wd = tiny_workdir(tmp_path / "wd", CONFIG, {2: boxed(params) if box else params})
    for source in (tmp_path / "md", wd):
        loaded, cfg, _ = load_params(source, shardings=shardings, dtype="bfloat16")
        assert cfg == CONFIG
        flat, want_shardings = flatten(loaded), flatten(shardings)
        assert set(flat) == set(want_shardings)
        for path, x in flat.items():
            assert isinstance(x, jax.Array) and x.dtype == jnp.bfloat16
            assert x.sharding.is_equivalent_to(want_shardings[path], x.ndim), path
        # really split: the embedding's rows/columns are spread over several devices
        emb = loaded["embed_tokens"]["embedding"]
        assert len({str(s.index) for s in emb.addressable_shards}) > 1
        expect = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16)), params)
        assert_tree_equal(jax.tree.map(np.asarray, loaded), expect)


def test_sharded_load_checks_shapes_before_reading(tmp_path, params):
    other = CONFIG.replace(hidden_size=64, intermediate_size=128)
    save_model_dir(tmp_path / "md", params, CONFIG, tokenizer_dir_or_files=[])
    other.to_json_file(tmp_path / "md" / "config.json")  # now disagrees with the weights
    with pytest.raises(ModelIOError, match=r"embed_tokens/embedding has shape \(96, 32\), the "
                                           r"config implies \(96, 64\)"):
        load_params(tmp_path / "md", shardings=fsdp_tensor_shardings(other))
