"""Chat data on the real SmolLM2 tokenizer: ids equal `apply_chat_template`, the loss mask is
exactly the assistant turns plus their `<|im_end|>`, BOS follows the tokenizer, and every bad
conversation is a clear error naming the file and the line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sorted_jax.data import (
    ByteTokenizer,
    ChatTemplateError,
    DataError,
    HFTokenizer,
    SentencePieceTokenizer,
    chat_prompt_ids,
    encode_chat,
    load_tokenizer,
    prompt_ids,
    read_json_records,
    save_tokenizer_files,
    tokenize_records,
)
from sorted_jax.data.sources import map_fields

SINGLE = [{"role": "user", "content": "Name three colors."},
          {"role": "assistant", "content": "Red, green and blue."}]
MULTI = [{"role": "system", "content": "You answer briefly."},
         {"role": "user", "content": "Hi there"},
         {"role": "assistant", "content": "Hello! How can I help?\n"},
         {"role": "user", "content": "What is 2 + 2?"},
         {"role": "assistant", "content": "4"},
         {"role": "user", "content": "And <|im_end|> in text?"},
         {"role": "assistant", "content": "  spaced  reply with émoji 🤗 "}]
CONVERSATIONS = [SINGLE, MULTI, MULTI[1:5], MULTI[:3]]


@pytest.fixture(scope="module")
def smol(assets_dir) -> HFTokenizer:
    return load_tokenizer(assets_dir / "smollm2_tokenizer")


def _reference(tok: HFTokenizer, messages, **kw) -> list[int]:
    return list(tok.hf.apply_chat_template(messages, tokenize=True, **kw)["input_ids"])


def _masked_runs(tok: HFTokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The text of each contiguous run of target tokens (special tokens kept)."""
    runs, start = [], None
    for t, m in enumerate([*mask.tolist(), False]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            runs.append(tok.hf.decode(ids[start:t].tolist(), skip_special_tokens=False))
            start = None
    return runs


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["single", "multi", "middle", "system"])
def test_ids_equal_apply_chat_template_and_mask_is_assistant_turns(smol, conv):
    ids, mask = encode_chat(smol, conv)
    assert ids.tolist() == _reference(smol, conv)
    im_start = smol.hf.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start and ids[1] != im_start  # the template's own start, no extra BOS
    assert smol.add_bos is False
    _assert_assistant_runs(smol, ids, mask, conv)


def _assert_assistant_runs(tok, ids, mask, conv):
    """Each run of targets is one assistant turn's content + <|im_end|>; a token that straddles
    the turn's start (the header's newline merged with a leading space) is a target too."""
    runs = _masked_runs(tok, ids, mask)
    want = [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
    assert len(runs) == len(want)
    for run, w in zip(runs, want, strict=True):
        assert run == w or (w[0].isspace() and run == "\n" + w), (run, w)


def test_generation_markers_give_the_same_mask(smol, tmp_path):
    """A template with {% generation %} blocks: its own assistant mask is used, and it equals
    the mask derived from rendered prefixes."""
    d = tmp_path / "tok"
    shutil.copytree(smol.directory, d)
    template = (d / "chat_template.jinja").read_text()
    marked = template.replace(
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
        "{% generation %}{{message['content'] + '<|im_end|>'}}{% endgeneration %}{% else %}"
        "{{message['content'] + '<|im_end|>'}}{% endif %}{{'\n'}}")
    assert marked != template
    (d / "chat_template.jinja").write_text(marked)
    tok = load_tokenizer(d)
    for conv in CONVERSATIONS[:3]:
        ids, mask = encode_chat(tok, conv)
        ref_ids, ref_mask = encode_chat(smol, conv)
        assert ids.tolist() == ref_ids.tolist()
        assert mask.tolist() == ref_mask.tolist()


def test_pipeline_chat_records_from_jsonl_both_formats(smol, tmp_path, assets_dir):
    f = tmp_path / "chat.jsonl"
    sharegpt = {"conversations": [{"from": "human", "value": "Hi there"},
                                  {"from": "gpt", "value": "Hello!"}]}
    alpaca = json.loads((assets_dir / "alpaca_en_demo.json").read_text())[:3]
    rows = [{"messages": SINGLE}, {"messages": MULTI}, sharegpt, *alpaca]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = read_json_records(f)
    assert records[2] == {"messages": [{"role": "user", "content": "Hi there"},
                                       {"role": "assistant", "content": "Hello!"}]}
    ds = tokenize_records(records, smol, max_len=4096, template="chat")
    assert len(ds) == len(rows) and ds.num_dropped == ds.num_truncated == 0
    convs = [SINGLE, MULTI, records[2]["messages"]] + [
        [{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"]
                                                         else "")},
         {"role": "assistant", "content": r["output"]}] for r in alpaca]
    for conv, toks, mask in zip(convs, ds.tokens, ds.loss_masks, strict=True):
        assert toks.tolist() == _reference(smol, conv)
        _assert_assistant_runs(smol, toks, mask, conv)
    # truncation: cut from the right; a conversation with no assistant token left is dropped
    first = [int(np.argmax(m)) for m in ds.loss_masks[:2]]  # SINGLE's default system prompt
    cut = first[1] + 2  # is longer than MULTI's own: cut inside MULTI's first answer
    assert cut <= first[0]
    short = tokenize_records(records[:2], smol, max_len=cut, template="chat")
    assert short.num_dropped == 1 and short.num_truncated == 1
    assert short.tokens[0].tolist() == _reference(smol, MULTI)[:cut]
    assert short.loss_masks[0].tolist() == ds.loss_masks[1][:cut].tolist()


def test_generation_prompt_ids(smol):
    rec = {"instruction": "Name three colors."}
    ids = prompt_ids(smol, rec, "chat")
    assert ids == _reference(smol, SINGLE[:1], add_generation_prompt=True)
    with_system = prompt_ids(smol, rec, "chat", system="Be brief.")
    assert with_system == _reference(smol, [{"role": "system", "content": "Be brief."},
                                            SINGLE[0]], add_generation_prompt=True)
    msgs = prompt_ids(smol, {"messages": MULTI[:4]}, "chat")
    assert msgs == chat_prompt_ids(smol, MULTI[:4]) == _reference(
        smol, MULTI[:4], add_generation_prompt=True)
    # text templates: no BOS for a tokenizer that adds none, BOS for those that do
    assert prompt_ids(smol, rec, "none") == smol.encode("Name three colors.")
    assert prompt_ids(ByteTokenizer(), rec, "none")[0] == ByteTokenizer.BOS
    with pytest.raises(DataError, match="system prompt needs the chat template"):
        prompt_ids(smol, rec, "alpaca", system="x")
    with pytest.raises(DataError, match=r"conversation \(messages\) needs the chat template"):
        prompt_ids(smol, {"messages": SINGLE}, "none")


def test_bos_follows_the_tokenizer(smol, assets_dir, tmp_path):
    """SmolLM2 adds no BOS, so its alpaca-template sequences have none; LLaMA-2 keeps its BOS,
    through SentencePiece and through an HF dir, with ids unchanged."""
    records = json.loads((assets_dir / "alpaca_en_demo.json").read_text())[:20]
    ds = tokenize_records(records, smol, max_len=1024, template="alpaca")
    assert all(t[0] != smol.bos_id for t in ds.tokens)
    assert all(t[-1] == smol.eos_id for t in ds.tokens)
    sp = SentencePieceTokenizer(assets_dir / "llama2_tokenizer.model")
    save_tokenizer_files(assets_dir / "llama2_tokenizer.model", tmp_path / "llama2")
    hf = load_tokenizer(tmp_path / "llama2")
    assert sp.add_bos and hf.add_bos
    a = tokenize_records(records, sp, max_len=1024)
    b = tokenize_records(records, hf, max_len=1024)
    prompt = sp.encode("Below is an instruction")
    for ta, tb in zip(a.tokens, b.tokens, strict=True):
        assert ta[0] == sp.bos_id and ta[1:1 + len(prompt)].tolist() == prompt  # one BOS
        assert ta.tolist() == tb.tolist()


def test_no_chat_template_is_a_clear_error(assets_dir):
    sp = SentencePieceTokenizer(assets_dir / "llama2_tokenizer.model")
    for tok in (sp, ByteTokenizer()):
        with pytest.raises(ChatTemplateError, match="template 'chat' needs a tokenizer with a "
                                                    "chat template"):
            tokenize_records([{"messages": SINGLE}], tok, 64, "chat")


def test_chat_record_with_a_text_template_is_refused(smol):
    with pytest.raises(DataError, match="record 0 is a chat record .* needs template 'chat'"):
        tokenize_records([{"messages": SINGLE}], smol, 64, "alpaca")


BAD = [
    ({"messages": [{"role": "robot", "content": "x"}]}, "message 0: unknown role 'robot'"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "message 0: unknown role 'bot'"),
    ({"messages": []}, "empty conversation"),
    ({"conversations": []}, "empty conversation"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": ["a", "b"]}]},
     "message 1: 'content' is a list, expected a string"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}]},
     "message 0: 'value' is a int, expected a string"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
     "message 0 is an assistant turn before any user turn"),
    ({"messages": "hello"}, "'messages' is a str, expected a list"),
]


@pytest.mark.parametrize("bad,message", BAD)
def test_bad_conversations_name_file_and_line(tmp_path, bad, message):
    good = {"messages": SINGLE}
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        read_json_records(f)
    assert str(e.value).startswith(f"{f}:3: record 1")
    assert message in str(e.value)
    g = tmp_path / "d.json"
    g.write_text("[\n" + json.dumps(good) + ",\n" + json.dumps(bad) + "\n]\n")
    with pytest.raises(DataError, match=f"{g}:3: record 1"):
        read_json_records(g)


def test_tfds_conversation_feature_maps_to_messages():
    example = {"messages": {"role": np.array([b"user", b"assistant"]),
                            "content": np.array([b"hi", "caf\u00e9".encode()])}}
    rec = map_fields(example, {"messages": "messages"}, "tfds:x[train] example 0")
    assert rec == {"messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "caf\u00e9"}]}


def test_tokenizer_without_bos_token(smol, tmp_path):
    """Qwen-style tokenizers have no BOS token at all: nothing is prepended, chat still works."""
    d = tmp_path / "nobos"
    shutil.copytree(smol.directory, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["bos_token"] = None
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    assert tok.bos_id is None and tok.add_bos is False
    ds = tokenize_records([{"instruction": "a", "input": "", "output": "b"}], tok, 64, "plain")
    assert ds.tokens[0].tolist() == [*tok.encode("a\nb"), tok.eos_id]
    assert encode_chat(tok, SINGLE)[0].tolist() == _reference(smol, SINGLE)
