"""`python -m sorted_jax.generate`: model dir + builtin tokenizer, JSONL in/out, streaming,
clear errors for bad arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import BYTE_4L_W64

CFG = BYTE_4L_W64


@pytest.fixture(autouse=True)
def fast_compile(monkeypatch):
    """The CLI's decoder compiles with XLA's cheap optimisation level (as test_generate's)."""
    import functools

    from helpers import FAST

    import sorted_jax.generate as gen
    from sorted_jax.decoding import Decoder

    monkeypatch.setattr(gen, "Decoder", functools.partial(Decoder, compiler_options=FAST))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_generate import random_params

    from sorted_jax.data.tokenizers import save_tokenizer_files
    from sorted_jax.io.model_io import save_model_dir

    d = tmp_path_factory.mktemp("gen") / "model"
    params = random_params(CFG, 0)
    save_model_dir(d, {k: np.asarray(v) if not isinstance(v, dict) else v
                       for k, v in params.items()}, CFG)
    save_tokenizer_files("builtin", d)
    return d


def test_cli_jsonl_matches_decoder(model_dir, tmp_path, capsys):
    from sorted_jax.data.tokenizers import ByteTokenizer
    from sorted_jax.decoding import Decoder
    from sorted_jax.generate import main
    from sorted_jax.io.model_io import load_params

    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi there"}\n\n{"instruction": "abc", "input": "de"}\n')
    out = tmp_path / "out.jsonl"
    rc = main(["--ckpt", str(model_dir), "--prompts", str(src), "--template", "none",
               "--max-new-tokens", "6", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x.get("prompt", x.get("instruction")) for x in lines] == ["hi there", "abc"]
    tok = ByteTokenizer()
    params, config, _ = load_params(model_dir)
    ids = [[1] + tok.encode("hi there"), [1] + tok.encode("abc\nde")]
    from helpers import FAST

    # same padding and cache length as the CLI: the compiled program is shared
    want = Decoder(params, config, pad_multiple=64, compiler_options=FAST).generate(
        ids, max_new_tokens=6, max_len=128)
    assert [x["tokens"] for x in lines] == want.tokens
    assert all(x["finish_reason"] in ("eos", "length") for x in lines)
    assert "tokens in" in capsys.readouterr().err


def test_cli_streams_single_prompt(model_dir, capsys):
    from sorted_jax.generate import main

    rc = main(["--ckpt", str(model_dir), "--prompt", "hello", "--template", "none",
               "--mode", "speculative", "--draft-layer", "2", "--max-new-tokens", "5"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.endswith("\n")
    assert "acceptance" in captured.err and "full-model passes" in captured.err


@pytest.mark.parametrize("args,match", [
    (["--prompt", "x", "--exit-layer", "9"], "exit_layer must be an integer in 1..4"),
    (["--prompt", "   "], "empty prompt"),
    (["--prompt", "x" * 100, "--template", "none"], "exceeds the model's context of 96"),
    (["--prompt", "x", "--mode", "early-exit", "--exits", "1", "3", "--thresholds", "0.9",
      "0.8", "0.7"], "2 exits need 1 thresholds"),
    (["--prompt", "x", "--mode", "early-exit", "--exits", "3,1"], "strictly increasing"),
    (["--prompt", "x", "--exit-layer", "2", "--mode", "speculative"], "applies to --mode fixed"),
    (["--prompt", "x", "--top-p", "0"], "top_p must be in"),
])
def test_cli_bad_arguments(model_dir, capsys, args, match):
    from sorted_jax.generate import main

    rc = main(["--ckpt", str(model_dir), *args])
    assert rc == 2
    assert match in capsys.readouterr().err


def test_cli_missing_checkpoint(tmp_path, capsys):
    from sorted_jax.generate import main

    assert main(["--ckpt", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The job's pieces (sorted_jax.decoding.batch_job), without a model


def test_prompt_records_of_a_file(tmp_path):
    from sorted_jax.core.errors import DataError, MissingFileError
    from sorted_jax.decoding.batch_job import read_prompt_records

    src = tmp_path / "in.jsonl"
    src.write_text('"bare"\n{"instruction": "a", "input": "b"}\n')
    assert read_prompt_records(str(src)) == [{"prompt": "bare"},
                                             {"instruction": "a", "input": "b"}]
    with pytest.raises(MissingFileError, match="does not exist"):
        read_prompt_records(str(tmp_path / "nope.jsonl"))
    for text, match in [('{"text": "x"}\n', r"in\.jsonl:1: expected an object"),
                        ('{"prompt": 3}\n', "field 'prompt' is a int, expected a string"),
                        ("\n", "holds no records")]:
        src.write_text(text)
        with pytest.raises(DataError, match=match):
            read_prompt_records(str(src))


def test_options_from_flags_refuse_another_modes_flags():
    from sorted_jax.core.errors import UsageError
    from sorted_jax.decoding.batch_job import options_from_flags

    base = dict(exit_layer=None, exits=None, thresholds=None, draft_layer=None,
                max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0, seed=0)
    opts = options_from_flags("early-exit", **{**base, "exits": ["1,3", "4"],
                                               "thresholds": ["0.9", "0.8"]})
    assert opts.exits == (1, 3, 4) and opts.thresholds == (0.9, 0.8)
    for mode, flag, value, match in [
            ("fixed", "draft_layer", 2, "--draft-layer applies to --mode speculative"),
            ("speculative", "exits", ["2"], "--exits / --thresholds apply"),
            ("early-exit", "exit_layer", 2, "--exit-layer applies to --mode fixed")]:
        with pytest.raises(UsageError, match=match):
            options_from_flags(mode, **{**base, flag: value})
    with pytest.raises(UsageError, match="--exits must be layer numbers, got 'x'"):
        options_from_flags("early-exit", **{**base, "exits": ["x"]})


def test_cache_length_result_line_and_summary():
    from sorted_jax.data.tokenizers import ByteTokenizer
    from sorted_jax.decoding import DecodeOptions
    from sorted_jax.decoding.batch_job import cache_length, result_line, summary
    from sorted_jax.decoding.results import SpeculativeStats

    assert cache_length([[1] * 10, [1] * 65], 64) == 128 + 64
    opts = DecodeOptions(mode="fixed", eos_id=(9, 2))  # any of them ends a row
    tok = ByteTokenizer()
    line = result_line({"prompt": "p"}, tok, [3 + ord("o"), 2], opts)
    assert line == {"prompt": "p", "output": "o", "tokens": [3 + ord("o"), 2],
                    "finish_reason": "eos", "mode": "fixed"}
    assert result_line({}, tok, [3 + ord("o")], opts)["finish_reason"] == "length"
    stats = SpeculativeStats("speculative", 10, 0.5, draft_layer=2, drafted=8, accepted=6,
                             acceptance_rate=0.75, committed_drafts=6, full_passes=3,
                             draft_passes=9, tokens_per_full_pass=10 / 3)
    text = summary(stats, 2.0)
    assert text.startswith("10 tokens in 2.00s (5.0 tok/s")
    assert "acceptance 0.750 (6/8 drafts)" in text and "full-model passes 3" in text
