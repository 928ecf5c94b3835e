"""HF PyTorch <-> Orbax conversion against real HF `LlamaForCausalLM`s (tiny, fp32, CPU)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ASSETS, random_params, tiny_config, tiny_workdir

from sorted_jax.convert import main
from sorted_jax.io.model_io import load_model_dir, load_params
from sorted_jax.io.safetensors_shards import parse_size, write_shards
from sorted_jax.model.config import LlamaConfig
from sorted_jax.model.hf_mapping import expected_hf_names
from sorted_jax.model.modeling import make_model, slice_layers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")



def save_hf(model, directory: Path, fmt: str) -> Path:
    """Write `model` as an HF dir in one of the layouts the converter reads."""
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "single":
        model.save_pretrained(directory)
        assert (directory / "model.safetensors").is_file()
    elif fmt == "sharded":
        model.save_pretrained(directory, max_shard_size="40KB")
        assert (directory / "model.safetensors.index.json").is_file()
    elif fmt == "bin":  # transformers 5 no longer writes .bin; torch.save is what old repos hold
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    elif fmt == "bin-sharded":
        model.config.save_pretrained(directory)
        sd = model.state_dict()
        names = list(sd)
        weight_map = {}
        for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
            fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
            torch.save({n: sd[n].clone() for n in part}, directory / fname)
            weight_map.update({n: fname for n in part})
        (directory / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(fmt)
    return directory


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def our_logits(params, config: LlamaConfig, ids: np.ndarray, depth: int | None = None):
    k = depth or config.num_hidden_layers
    model = make_model(config.submodel(k))
    p = slice_layers(params, 0, k)
    out = model.apply({"params": p}, jnp.asarray(ids))
    return np.asarray(model.apply({"params": p}, out.hidden[k - 1], method=model.head))


def assert_close(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    err = np.max(np.abs(ours - ref))
    assert err <= rel * np.max(np.abs(ref)), f"max abs err {err}, ref scale {np.abs(ref).max()}"


def st_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def st_tensors_in(f: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(f, framework="numpy") as h:
        return list(h.keys())


def ids_for(config: LlamaConfig, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, (2, 9)).astype(np.int32)


def no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def run(*argv) -> None:
    assert main(["--help"] if not argv else [str(a) for a in argv]) == 0


def fails(*argv, match: str) -> str:
    """The command exits 2 with one `sorted_jax.convert CMD: error: ...` line naming `match`."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    msg = err.getvalue()
    assert rc == 2, msg
    assert msg.startswith(f"sorted_jax.convert {argv[0]}: error: ") and msg.count("\n") == 1, msg
    assert match.lower() in msg.lower(), msg
    return msg


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("kv,tied,fmt", [
    (4, False, "single"),       # MHA, untied head, one safetensors file
    (2, True, "sharded"),       # GQA, tied head, sharded safetensors + index
    (2, False, "bin"),          # GQA, untied, pytorch_model.bin (weights-only pickle)
    (4, True, "bin-sharded"),   # MHA, tied, sharded .bin + index
])
def test_hf_orbax_hf_roundtrip(tmp_path, hf_llama_factory, kv, tied, fmt):
    config = tiny_config(kv=kv, tied=tied)
    model = hf_llama_factory(config, seed=kv + tied)
    hf_dir = save_hf(model, tmp_path / "hf", fmt)
    ids = ids_for(config)
    ref = hf_logits(model, ids)

    run("hf-to-orbax", "--hf", hf_dir, "--out", tmp_path / "md", "--no-progress")
    params, cfg = load_model_dir(tmp_path / "md")
    assert cfg == config
    assert_close(our_logits(params, cfg, ids), ref)

    run("orbax-to-hf", "--ckpt", tmp_path / "md", "--out", tmp_path / "hf2", "--no-progress")
    out = st_tensors(tmp_path / "hf2")
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(out) == set(expected_hf_names(config))
    assert ("lm_head.weight" in out) == (not tied)
    for name, w in out.items():
        assert w.dtype == sd[name].dtype and np.array_equal(w, sd[name]), name
    hf_cfg = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert hf_cfg["dtype"] == "float32" and hf_cfg["tie_word_embeddings"] == tied
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    np.testing.assert_array_equal(hf_logits(reloaded, ids), ref)
    no_leftovers(tmp_path)


def test_sharded_export_and_bf16(tmp_path, hf_llama_factory):
    config = tiny_config(kv=2)
    model = hf_llama_factory(config, seed=3)
    hf_dir = save_hf(model, tmp_path / "hf", "single")
    run("hf-to-orbax", "--hf", hf_dir, "--out", tmp_path / "md", "--dtype", "bfloat16",
        "--no-progress")
    params, _ = load_model_dir(tmp_path / "md")
    assert all(str(v.dtype) == "bfloat16" for v in _leaves(params))
    run("orbax-to-hf", "--ckpt", tmp_path / "md", "--out", tmp_path / "hf2",
        "--shard-size", "30KB", "--dtype", "float32", "--no-progress")
    index = json.loads((tmp_path / "hf2" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "hf2").glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert all(f.stat().st_size <= 30_000 + 4096 or len(st_tensors_in(f)) == 1
               for f in (tmp_path / "hf2").glob("model-*.safetensors"))
    out = st_tensors(tmp_path / "hf2")
    for name, w in model.state_dict().items():
        if name in out:  # bf16-rounded, then widened back to fp32 exactly
            want = w.to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(out[name], want)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    assert_close(hf_logits(reloaded, ids_for(config)),
                 our_logits(params, config, ids_for(config)).astype(np.float32), rel=2e-2)

    run("orbax-to-hf", "--ckpt", tmp_path / "md", "--out", tmp_path / "hf3", "--no-progress")
    assert json.loads((tmp_path / "hf3" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {str(v.dtype) for v in st_tensors(tmp_path / "hf3").values()} == {"bfloat16"}


def test_bf16_source(tmp_path, hf_llama_factory):
    """A bf16 HF checkpoint: widened exactly to fp32, and exported back to the same bits."""
    config = tiny_config(kv=2, tied=True, layers=2)
    model = hf_llama_factory(config, seed=4).to(torch.bfloat16)
    hf_dir = save_hf(model, tmp_path / "hf", "single")
    run("hf-to-orbax", "--hf", hf_dir, "--out", tmp_path / "md", "--no-progress")
    params, _ = load_model_dir(tmp_path / "md")
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"],
                                  model.model.embed_tokens.weight.detach().float().numpy())
    run("orbax-to-hf", "--ckpt", tmp_path / "md", "--out", tmp_path / "hf2", "--dtype",
        "bfloat16", "--no-progress")
    out = safetensors_torch.load_file(tmp_path / "hf2" / "model.safetensors")
    sd = model.state_dict()
    assert set(out) == set(expected_hf_names(config))
    for name, w in out.items():
        assert w.dtype == torch.bfloat16 and torch.equal(w, sd[name]), name


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


@pytest.mark.parametrize("tied", [False, True])
def test_export_submodel_matches_our_exit(tmp_path, hf_llama_factory, tied):
    config = tiny_config(kv=2, tied=tied, layers=4)
    model = hf_llama_factory(config, seed=7)
    hf_dir = save_hf(model, tmp_path / "hf", "single")
    run("hf-to-orbax", "--hf", hf_dir, "--out", tmp_path / "md", "--no-progress")
    params, cfg = load_model_dir(tmp_path / "md")
    ids = ids_for(config, 1)
    k = 2
    run("orbax-to-hf", "--ckpt", tmp_path / "md", "--out", tmp_path / "sub", "--exit-layer", k,
        "--no-progress")
    sub_cfg = json.loads((tmp_path / "sub" / "config.json").read_text())
    assert sub_cfg["num_hidden_layers"] == k
    gen = json.loads((tmp_path / "sub" / "generation_config.json").read_text())
    assert gen["bos_token_id"] == config.bos_token_id and gen["eos_token_id"] == config.eos_token_id
    names = set(st_tensors(tmp_path / "sub"))
    assert names == set(expected_hf_names(config.submodel(k)))
    sub = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sub").eval()
    assert sub.config.num_hidden_layers == k
    assert_close(hf_logits(sub, ids), our_logits(params, cfg, ids, depth=k))
    # the sub-model is a different function than the full model
    assert not np.allclose(hf_logits(sub, ids), hf_logits(model, ids), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# training workdirs


def test_workdir_export(tmp_path, hf_llama_factory):
    import jax

    config = tiny_config(kv=2, layers=3)
    model = hf_llama_factory(config, seed=11)
    run("hf-to-orbax", "--hf", save_hf(model, tmp_path / "hf", "single"), "--out",
        tmp_path / "md", "--no-progress")
    p1, _ = load_model_dir(tmp_path / "md")
    p2 = jax.tree.map(lambda x: x * np.float32(1.01), p1)
    wd = tiny_workdir(tmp_path / "wd", config, {10: p1, 20: p2})

    params, cfg, tok = load_params(wd)
    assert cfg == config and tok is None
    for a, b in zip(_leaves(params), _leaves(p2), strict=True):
        np.testing.assert_array_equal(a, b)

    ids = ids_for(config, 2)
    run("orbax-to-hf", "--ckpt", wd, "--out", tmp_path / "latest", "--no-progress")
    latest = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "latest").eval()
    assert_close(hf_logits(latest, ids), our_logits(p2, config, ids))

    run("orbax-to-hf", "--ckpt", wd, "--out", tmp_path / "s10", "--step", 10, "--exit-layer", 2,
        "--no-progress")
    s10 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s10").eval()
    assert_close(hf_logits(s10, ids), our_logits(p1, config, ids, depth=2))

    fails("orbax-to-hf", "--ckpt", wd, "--out", tmp_path / "bad", "--step", 15,
          match="available steps: [10, 20]")
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------
# tokenizer files


def test_tokenizer_copied_and_vocab_checked(tmp_path, hf_llama_factory):
    spm_file = ASSETS / "tok512.model"
    if not spm_file.is_file():
        pytest.skip(f"{spm_file} not found")
    # model vocab 512 >= tokenizer's 512: accepted, tokenizer travels with the weights
    config = tiny_config(vocab=512, layers=2)
    hf_dir = save_hf(hf_llama_factory(config, seed=1), tmp_path / "hf", "single")
    shutil.copyfile(spm_file, hf_dir / "tokenizer.model")
    run("hf-to-orbax", "--hf", hf_dir, "--out", tmp_path / "md", "--no-progress")
    assert (tmp_path / "md" / "tokenizer.model").read_bytes() == spm_file.read_bytes()
    _, _, tok = load_params(tmp_path / "md")
    assert tok == tmp_path / "md"
    run("orbax-to-hf", "--ckpt", tmp_path / "md", "--out", tmp_path / "hf2", "--exit-layer", 1,
        "--no-progress")
    assert (tmp_path / "hf2" / "tokenizer.model").read_bytes() == spm_file.read_bytes()
    import sentencepiece as spm

    text = "Once upon a time there was a cat."
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")
    ids = [i for i in hf_tok(text)["input_ids"] if i != config.bos_token_id]
    assert ids == spm.SentencePieceProcessor(model_file=str(spm_file)).encode(text)

    # tokenizer with 512 pieces, model vocab 300: must fail before writing anything
    small = tiny_config(vocab=300, layers=2)
    hf_small = save_hf(hf_llama_factory(small, seed=1), tmp_path / "hf_small", "single")
    shutil.copyfile(spm_file, hf_small / "tokenizer.model")
    fails("hf-to-orbax", "--hf", hf_small, "--out", tmp_path / "md_small", "--no-progress",
          match="has 512 token ids but the model's vocab_size is 300")
    assert not (tmp_path / "md_small").exists()
    no_leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------
# failures: clean message, non-zero exit, nothing at --out


@pytest.fixture
def hf_dir(tmp_path, hf_llama_factory) -> Path:
    config = tiny_config(kv=2, layers=2)
    return save_hf(hf_llama_factory(config, seed=5), tmp_path / "hf", "single")


def _rewrite(hf_dir: Path, edit) -> None:
    f = hf_dir / "model.safetensors"
    sd = safetensors_torch.load_file(f)
    edit(sd)
    safetensors_torch.save_file(sd, f, metadata={"format": "pt"})


def _h2o_fails(tmp_path: Path, hf: Path, match: str) -> str:
    out = tmp_path / "out"
    msg = fails("hf-to-orbax", "--hf", hf, "--out", out, "--no-progress", match=match)
    assert not out.exists()
    no_leftovers(tmp_path)
    return msg


def test_truncated_safetensors(tmp_path, hf_dir):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-1000])
    _h2o_fails(tmp_path, hf_dir, "truncated")
    f.write_bytes(data[:5])
    _h2o_fails(tmp_path, hf_dir, "not a safetensors file")


def test_truncated_shard(tmp_path, hf_llama_factory):
    hf = save_hf(hf_llama_factory(tiny_config(layers=2), seed=0), tmp_path / "hf", "sharded")
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-64])
    _h2o_fails(tmp_path, hf, f"{shard.name} is truncated")
    shard.unlink()
    _h2o_fails(tmp_path, hf, "shard files that are missing")


def test_missing_tensor(tmp_path, hf_dir):
    _rewrite(hf_dir, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    _h2o_fails(tmp_path, hf_dir, "1 tensors missing: model.layers.1.mlp.up_proj.weight")


def test_unexpected_tensor(tmp_path, hf_dir):
    _rewrite(hf_dir, lambda sd: sd.__setitem__("model.layers.0.self_attn.q_proj.bias",
                                               torch.zeros(64)))
    _h2o_fails(tmp_path, hf_dir, "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'")


def test_wrong_shape(tmp_path, hf_dir):
    _rewrite(hf_dir, lambda sd: sd.__setitem__("model.layers.0.mlp.down_proj.weight",
                                               torch.zeros(64, 95)))
    _h2o_fails(tmp_path, hf_dir, "'model.layers.0.mlp.down_proj.weight' has shape (64, 95)")


@pytest.mark.parametrize("change,match", [
    ({"num_hidden_layers": 1}, "is for layer 1, but the config has num_hidden_layers=1"),
    ({"num_hidden_layers": 3}, "tensors missing: model.layers.2."),
    ({"intermediate_size": 128}, "the config implies (128, 64)"),
    ({"vocab_size": 100}, "'model.embed_tokens.weight' has shape (128, 64)"),
    ({"model_type": "mistral"}, "model_type 'llama'"),
])
def test_config_mismatch(tmp_path, hf_dir, change, match):
    cfg_file = hf_dir / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **change}))
    _h2o_fails(tmp_path, hf_dir, match)


def test_missing_config_and_weights(tmp_path, hf_dir):
    (hf_dir / "model.safetensors").unlink()
    _h2o_fails(tmp_path, hf_dir, "no weights found")
    (hf_dir / "config.json").unlink()
    _h2o_fails(tmp_path, hf_dir, "config.json is missing")
    _h2o_fails(tmp_path, tmp_path / "nope", "does not exist")


class NotAStateDict(dict):
    """A dict subclass: harmless, but not on torch's weights-only allow list."""


def test_pickle_bin_refused_unless_allowed(tmp_path, hf_llama_factory):
    config = tiny_config(kv=2, layers=2)
    model = hf_llama_factory(config, seed=2)
    hf = save_hf(model, tmp_path / "hf", "bin")
    torch.save(NotAStateDict(model.state_dict()), hf / "pytorch_model.bin")
    msg = _h2o_fails(tmp_path, hf, "not a weights-only PyTorch checkpoint")
    assert "--allow-pickle" in msg
    run("hf-to-orbax", "--hf", hf, "--out", tmp_path / "md", "--allow-pickle", "--no-progress")
    params, _ = load_model_dir(tmp_path / "md")
    assert_close(our_logits(params, config, ids_for(config)), hf_logits(model, ids_for(config)))


def test_corrupt_bin(tmp_path, hf_llama_factory):
    hf = save_hf(hf_llama_factory(tiny_config(layers=2), seed=2), tmp_path / "hf", "bin")
    f = hf / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _h2o_fails(tmp_path, hf, "cannot read")


def test_export_errors(tmp_path, hf_dir):
    run("hf-to-orbax", "--hf", hf_dir, "--out", tmp_path / "md", "--no-progress")
    for k in (0, 3, -1):
        fails("orbax-to-hf", "--ckpt", tmp_path / "md", "--out", tmp_path / "x", "--exit-layer",
              k, match="--exit-layer must be in 1..2")
        assert not (tmp_path / "x").exists()
    fails("orbax-to-hf", "--ckpt", tmp_path / "md", "--out", tmp_path / "x", "--step", 3,
          match="training workdirs only")
    fails("orbax-to-hf", "--ckpt", tmp_path / "md", "--out", tmp_path / "x", "--shard-size",
          "lots", match="cannot parse size")
    # an HF dir is a checkpoint too (read in place): its depth-1 sub-model, straight from it
    run("orbax-to-hf", "--ckpt", hf_dir, "--out", tmp_path / "x", "--exit-layer", 1,
        "--no-progress")
    sub, src = st_tensors(tmp_path / "x"), st_tensors(hf_dir)
    assert sorted(sub) == sorted(n for n in src if not n.startswith("model.layers.1."))
    assert all(np.array_equal(sub[n], src[n]) for n in sub)
    shutil.rmtree(tmp_path / "x")
    (tmp_path / "empty").mkdir()
    fails("orbax-to-hf", "--ckpt", tmp_path / "empty", "--out", tmp_path / "x",
          match="neither a model dir")
    assert not (tmp_path / "x").exists()
    # config.json that does not describe the stored params
    bad = tmp_path / "md_bad"
    shutil.copytree(tmp_path / "md", bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    fails("orbax-to-hf", "--ckpt", bad, "--out", tmp_path / "x", match="has shape (2,")
    assert not (tmp_path / "x").exists()
    no_leftovers(tmp_path)


def test_existing_out_is_kept_unless_overwrite(tmp_path, hf_dir):
    """A dir the command did not write is never replaced, not even with --overwrite; its own
    earlier output is, with --overwrite only."""
    out = tmp_path / "md"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails("hf-to-orbax", "--hf", hf_dir, "--out", out, match="not an output of")
    fails("hf-to-orbax", "--hf", hf_dir, "--out", out, "--overwrite", match="not an output of")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    run("hf-to-orbax", "--hf", hf_dir, "--out", out, "--no-progress")  # empty: fine
    fails("hf-to-orbax", "--hf", hf_dir, "--out", out, match="pass --overwrite")
    run("hf-to-orbax", "--hf", hf_dir, "--out", out, "--overwrite", "--no-progress")
    assert (out / "params").is_dir()
    no_leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------
# pieces


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("20KB") == 20_000
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size("123") == 123


def test_safetensors_writer_readable_by_safetensors(tmp_path):
    """Shards as HF writes them: one file, or shards + index; bf16 stays bf16; a strided view
    (which the library would write scrambled) is refused."""
    import ml_dtypes
    from safetensors import safe_open

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.linspace(-1, 1, 7, dtype=np.float32)
    one = tmp_path / "one"
    one.mkdir()
    tensors = {"a": np.ascontiguousarray(a.T), "b": b}
    assert write_shards(one, tensors, 10**9) == {"a": "model.safetensors",
                                                  "b": "model.safetensors"}
    assert tensors == {}  # consumed as written
    with safe_open(one / "model.safetensors", framework="np") as f:
        np.testing.assert_array_equal(f.get_tensor("a"), a.T)
        np.testing.assert_array_equal(f.get_tensor("b"), b)
        assert f.metadata() == {"format": "pt"}
    two = tmp_path / "two"
    two.mkdir()
    weight_map = write_shards(two, {"a": a.astype(ml_dtypes.bfloat16), "b": b}, 40)
    assert weight_map == {"a": "model-00001-of-00002.safetensors",
                          "b": "model-00002-of-00002.safetensors"}
    index = json.loads((two / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": 12 * 2 + 7 * 4}, "weight_map": weight_map}
    y = safetensors_torch.load_file(two / "model-00001-of-00002.safetensors")["a"]
    assert y.dtype == torch.bfloat16
    np.testing.assert_array_equal(y.float().numpy(), a)
    with pytest.raises(ValueError, match="C-contiguous"):
        write_shards(tmp_path, {"a": a.T}, 10**9)


def test_export_layout_frees_each_stored_array_as_it_goes():
    """HF's tensors come out C-contiguous, in HF's order, equal to the views (cast if asked);
    once the caller lets go of its params the views are the only holders of the stored arrays,
    so each one copied (transposed or cast) is freed, and only those written as they are
    stay."""
    import weakref

    from sorted_jax.io.hf_export import in_hf_layout, submodel_tensors
    from sorted_jax.io.model_io import flatten

    config = tiny_config(kv=2, layers=3)
    for dtype, kept in ((None, {"embed_tokens/embedding", "norm/scale",
                                "layers/input_layernorm/scale",
                                "layers/post_attention_layernorm/scale"}),
                        (np.dtype(np.float16), set())):
        params = random_params(config, seed=0)
        stored = {"/".join(p): weakref.ref(leaf) for p, leaf in flatten(params).items()}
        views, sub_config = submodel_tensors(params, config, exit_layer=2)
        del params
        assert sub_config.num_hidden_layers == 2
        assert list(views) == expected_hf_names(sub_config)
        want = {name: np.array(w, dtype=dtype) for name, w in views.items()}
        out = in_hf_layout(views, dtype)
        assert views == {} and list(out) == list(want)
        for name, w in out.items():
            assert w.flags.c_contiguous and w.dtype == want[name].dtype, name
            np.testing.assert_array_equal(w, want[name])
        assert {p for p, ref in stored.items() if ref() is not None} == kept
        del out, want


def test_import_does_not_pull_torch():
    code = ("import sys, sorted_jax.convert, sorted_jax.io.model_io, sorted_jax.io.hf_export; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
