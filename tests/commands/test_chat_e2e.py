"""Instruct models end to end: EOS id lists from generation_config.json (decoding stops at each,
kept through conversion, training and export), then a tiny model on the SmolLM2 tokenizer
trained a few packed steps on a JSONL messages file with template=chat, and generate with the
chat template at two exits (its default template: the training run's)."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
from helpers import FAST, FORCED_2L, SMOL_VOCAB_2L, TINY_CONFIG_FILE, random_params

from sorted_jax import convert, evaluate, generate, train
from sorted_jax.core.errors import ConversionError
from sorted_jax.data import chat_prompt_ids, load_tokenizer
from sorted_jax.decoding import Decoder
from sorted_jax.io import artifacts, model_io
from sorted_jax.io.conversion import hf_to_orbax
from sorted_jax.io.hf_checkpoint import read_hf_checkpoint
from sorted_jax.io.hf_export import export_hf

EOS = [5, 7, 9]


def forced_params(nxt: dict[int, int]) -> dict:
    """Weights whose greedy next token after t is nxt[t] whatever came before: one-hot
    embeddings, layers that add nothing (zero output projections), a head mapping e_t to
    nxt[t]."""
    p = random_params(FORCED_2L)
    v, d = FORCED_2L.vocab_size, FORCED_2L.hidden_size
    p["embed_tokens"]["embedding"] = np.eye(v, d, dtype=np.float32)
    p["layers"]["self_attn"]["o_proj"]["kernel"][...] = 0.0
    p["layers"]["mlp"]["down_proj"]["kernel"][...] = 0.0
    p["norm"]["scale"][...] = 1.0
    head = np.zeros((d, v), np.float32)
    for t in range(v):
        head[t, nxt.get(t, 20)] = 10.0
    p["lm_head"]["kernel"] = head
    return p


def test_generation_config_eos_list_stops_decoding_at_each(tmp_path):
    # chains: 10 -> 11 -> 5 | 12 -> 13 -> 14 -> 7 | 15 -> 9; each EOS would continue to 20
    nxt = {10: 11, 11: 5, 12: 13, 13: 14, 14: 7, 15: 9, 5: 20, 7: 20, 9: 20, 20: 21}
    hf = export_hf(forced_params(nxt), FORCED_2L, tmp_path / "hf", progress=False)
    (hf / "generation_config.json").write_text(json.dumps({"bos_token_id": 1,
                                                           "eos_token_id": EOS}))
    assert json.loads((hf / "config.json").read_text())["eos_token_id"] == 5  # one id there
    out = hf_to_orbax(hf, tmp_path / "model", progress=False)
    params, config, _ = model_io.load_params(out)
    assert config.eos_token_id == EOS
    dec = Decoder(params, config, compiler_options=FAST)
    prompts = [[1, 10], [1, 12], [1, 15], [1, 20]]
    res = dec.generate(prompts, max_new_tokens=6)
    assert res.tokens == [[11, 5], [13, 14, 7], [9], [21, 20, 21, 20, 21, 20]]
    assert dec.generate(prompts[:1], max_new_tokens=4, eos_id=[]).tokens == [[11, 5, 20, 21]]
    # a bad list is a clear error
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": ["x"]}))
    with pytest.raises(ConversionError, match="eos_token_id must be a token id"):
        read_hf_checkpoint(hf, progress=False)


# ---------------------------------------------------------------------------------------------
# end to end on the SmolLM2 tokenizer

SMOL_EOS = [2, 0]  # <|im_end|>, <|endoftext|>


def _conversations(n: int) -> list[dict]:
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    out = []
    for i in range(n):
        a, b = words[i % 8], words[(3 * i + 1) % 8]
        turns = [{"role": "user", "content": f"Say {a}."},
                 {"role": "assistant", "content": a.capitalize() + "."}]
        if i % 2:
            turns += [{"role": "user", "content": f"And {b}?"},
                      {"role": "assistant", "content": f"{b} {b}"}]
        out.append({"messages": turns} if i % 3 else {"conversations": [
            {"from": "human" if t["role"] == "user" else "gpt", "value": t["content"]}
            for t in turns]})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, assets_dir):
    """(hf dir, converted model dir, training workdir): a random HF model with an EOS list in
    its generation_config.json and SmolLM2's tokenizer, converted, then trained 3 packed steps
    with template=chat."""
    root = tmp_path_factory.mktemp("chat_e2e")
    hf = export_hf(random_params(SMOL_VOCAB_2L, seed=1), SMOL_VOCAB_2L, root / "hf",
                   progress=False, tokenizer=assets_dir / "smollm2_tokenizer")
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": SMOL_EOS}))
    assert convert.main(["hf-to-orbax", "--hf", str(hf), "--out", str(root / "base"),
                         "--no-progress"]) == 0
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _conversations(24)))
    wd = root / "run"
    arch = [f"--config.model.{k}=0" for k in ("vocab_size", "hidden_size", "intermediate_size",
                                              "num_hidden_layers", "num_attention_heads",
                                              "num_key_value_heads")]
    rc = train.main(["train", f"--config={TINY_CONFIG_FILE}", f"--workdir={wd}",
                     f"--config.init_from={root / 'base'}", "--config.model.preset=", *arch,
                     "--config.data.tokenizer=", f"--config.data.train={data}",
                     "--config.data.template=chat", "--config.data.eval=none",
                     "--config.data.packing=True", "--config.data.buckets=",
                     "--config.max_len=128", "--config.exits=1,2", "--config.eval_exits=",
                     "--config.batch_size=8", "--config.num_steps=3", "--config.log_every=1",
                     "--config.eval_at_start=False", "--config.optim.warmup_steps=0",
                     "--config.tensorboard=False"])
    assert rc == 0
    return hf, root / "base", wd


@pytest.fixture
def fast_generate(monkeypatch):
    monkeypatch.setattr(generate, "Decoder", functools.partial(Decoder, compiler_options=FAST))


def test_eos_list_and_chat_template_survive_conversion_and_training(trained):
    _, base, wd = trained
    assert model_io.load_config(base).eos_token_id == SMOL_EOS
    assert (base / "chat_template.jinja").is_file()
    assert model_io.load_config(wd).eos_token_id == SMOL_EOS  # the workdir's config.json
    assert (wd / "tokenizer" / "chat_template.jinja").is_file()
    assert json.loads((wd / "train_config.json").read_text())["data"]["template"] == "chat"
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert len(train_rows) == 3 and all(np.isfinite(r["loss"]) for r in train_rows)


def test_generate_chat_at_two_exits(trained, tmp_path, fast_generate, capsys):
    _, _, wd = trained
    art = artifacts.inspect(wd)
    tok = load_tokenizer(wd / "tokenizer")
    args = generate.build_parser().parse_args(["--ckpt", str(wd), "--prompt", "x"])
    assert generate._template(args, art) == "chat"  # the training run's template
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say red."}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "Say cat."}]}) + "\n")
    params, config, _ = model_io.load_params(wd)
    for exit_layer in (1, 2):
        out = tmp_path / f"out{exit_layer}.jsonl"
        rc = generate.main(["--ckpt", str(wd), "--prompts", str(prompts), "--system",
                            "Be brief.", "--exit-layer", str(exit_layer), "--max-new-tokens",
                            "5", "--out", str(out)])
        assert rc == 0, capsys.readouterr().err
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        ids = [chat_prompt_ids(tok, [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": u}])
               for u in ("Say red.", "Say cat.")]
        longest = max(len(i) for i in ids)
        want = Decoder(params, config, pad_multiple=64, compiler_options=FAST).generate(
            ids, exit_layer=exit_layer, max_new_tokens=5, eos_id=tuple(SMOL_EOS),
            max_len=-(-longest // 64) * 64 + 64)
        assert [x["tokens"] for x in lines] == want.tokens
        for x in lines:
            assert x["finish_reason"] == ("eos" if x["tokens"][-1] in SMOL_EOS else "length")
    # --system without the chat template is refused
    assert generate.main(["--ckpt", str(wd), "--prompt", "x", "--template", "none",
                          "--system", "y"]) == 2
    assert "--system needs --template chat" in capsys.readouterr().err


def test_evaluate_dumps_generations_of_conversations(trained, tmp_path, capsys):
    """A conversation is prompted with its turns before its last assistant turn (the
    reference), under the run's chat template, and stops at the model's EOS list."""
    _, _, wd = trained
    data = tmp_path / "two.jsonl"
    records = _conversations(2)  # a ShareGPT single turn, an OpenAI two-turn conversation
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    gens = tmp_path / "gens.jsonl"
    rc = evaluate.main(["--ckpt", str(wd), "--data", str(data), "--exits", "1,2",
                        "--out", str(tmp_path / "out"), "--dump-generations", str(gens),
                        "--num-generations", "2", "--max-new-tokens", "6",
                        "--gen-batch-size", "2"])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in gens.read_text().splitlines()]
    assert [(r["exit"], r["id"]) for r in rows] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    contexts = [[{"role": "user", "content": "Say red."}],
                [{"role": "user", "content": "Say green."},
                 {"role": "assistant", "content": "Green."},
                 {"role": "user", "content": "And dog?"}]]
    for r in rows:
        assert (r["instruction"], r["input"], r["reference"]) == [
            ("Say red.", "", "Red."), ("And dog?", "", "dog dog")][r["id"]]
    tok = load_tokenizer(wd / "tokenizer")
    ids = [chat_prompt_ids(tok, c) for c in contexts]
    params, config, _ = model_io.load_params(wd)
    for e in (1, 2):
        want = Decoder(params, config, pad_multiple=32, compiler_options=FAST).generate(
            ids, exit_layer=e, max_new_tokens=6, eos_id=tuple(SMOL_EOS),
            max_len=-(-max(len(i) for i in ids) // 32) * 32 + 32)
        got = [r for r in rows if r["exit"] == e]
        for r, toks in zip(got, want.tokens, strict=True):
            stopped = bool(toks) and toks[-1] in SMOL_EOS
            assert r["response"] == tok.decode(toks[:-1] if stopped else toks)
            assert r["finished"] == stopped


def test_export_keeps_eos_list_for_hf_and_converted_models_default_to_none(trained, tmp_path):
    import transformers

    _, base, wd = trained
    out = tmp_path / "hf_l1"
    assert convert.main(["orbax-to-hf", "--ckpt", str(wd), "--out", str(out), "--exit-layer",
                         "1", "--no-progress"]) == 0
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == SMOL_EOS
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == SMOL_EOS
    assert transformers.AutoConfig.from_pretrained(out).eos_token_id == SMOL_EOS
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.chat_template and "<|im_start|>" in hf_tok.chat_template
    # a model converted from HF has no training record: generate's default is no template
    args = generate.build_parser().parse_args(["--ckpt", str(base), "--prompt", "x"])
    assert generate._template(args, artifacts.inspect(base)) == "none"
    shutil.rmtree(out)


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
INSTRUCTION = {"instruction": "Say hi.", "output": "hi"}


@pytest.mark.parametrize("records, extra, message", [
    ([GOOD, GOOD, {"messages": [{"role": "bot", "content": "x"}]}], [],
     ":3: record 2: message 0: unknown role 'bot'"),
    ([GOOD, GOOD, {"conversations": []}], [], ":3: record 2: empty conversation"),
    ([GOOD, GOOD, {"messages": [{"role": "user", "content": "x"}]}], [],
     ":3: record 2: no assistant turn"),
    ([GOOD, GOOD, {"messages": [{"role": "user", "content": "x"},
                                {"role": "assistant", "content": 7}]}], [],
     ":3: record 2: message 1: 'content' is a int, expected a string"),
    ([GOOD], ["--config.data.template=chat"],
     "data.template='chat': template 'chat' needs a tokenizer with a chat template, but the "
     "tokenizer 'builtin' has none"),
    ([GOOD], [], ":1: record 0 is a chat record (messages): it needs template 'chat', not 'plain'"),
    ([INSTRUCTION] * 3, ["--config.data.packing=True", "--config.data.buckets="],
     "cannot be packed into one global batch: its 3 examples pack into 1 rows"),
    # (packing with data.buckets set is no longer refused: test_rough_edges.py)
])
def test_bad_chat_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, records, extra,
                                                            message):
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    wd = tmp_path / "run"
    rc = train.main(["train", f"--config={TINY_CONFIG_FILE}", f"--workdir={wd}",
                     f"--config.data.train={data}", "--config.data.eval=none",
                     "--config.data.template=plain", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and message in err, err
    if message.startswith(":"):
        assert f"{data}{message}" in err  # file and line
    elif "data.template" not in message and "buckets" not in message:
        assert f"data.train={str(data)!r}" in err  # the file
    assert not wd.exists()
