"""Record sources: JSON/JSONL files (with located errors), TFDS mapping, holdout split."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from sorted_jax.data.sources import (
    DataError,
    holdout_split,
    load_records,
    read_json_records,
    read_tfds_records,
)

ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets"
GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}


def _asset(name: str) -> Path:
    path = ASSETS / name
    if not path.is_file():
        pytest.skip(f"asset {name} not found at {path}")
    return path


def test_json_list_file_real_records():
    path = _asset("alpaca_en_demo.json")
    records = read_json_records(path)
    assert records == json.loads(path.read_text())
    assert len(records) == 999
    assert load_records(str(path)) == records


def test_jsonl_file_and_defaults(tmp_path):
    records = json.loads(_asset("alpaca_fixture_2.json").read_text())
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r) for r in records] + ["", json.dumps({"instruction": "a", "output": "b"})]
    path.write_text("\n".join(lines) + "\n")
    got = read_json_records(path)
    assert got[:2] == records
    assert got[2] == {"instruction": "a", "input": "", "output": "b"}


def _json_list_text(records_text: list[str]) -> str:
    return "[\n" + ",\n".join(records_text) + "\n]\n"


GOOD_TEXT = json.dumps(GOOD, indent=2)  # 5 lines per record


@pytest.mark.parametrize(
    "bad_text, message",
    [
        ('{"instruction": "x", "input": ""}', "no 'output' field"),
        ('{"output": "x"}', "no 'instruction' field"),
        ('{"instruction": "x", "output": 3}', "'output' is a int"),
        ('{"instruction": "x", "input": null, "output": "y"}', "'input' is a NoneType"),
        ('["instruction", "output"]', "is a list"),
    ],
)
def test_malformed_record_in_json_list_names_file_and_line(tmp_path, bad_text, message):
    path = tmp_path / "bad.json"
    # Records 0 and 1 take lines 2-11; the bad record 2 starts on line 12.
    path.write_text(_json_list_text([GOOD_TEXT, GOOD_TEXT, bad_text, GOOD_TEXT]))
    with pytest.raises(DataError) as err:
        read_json_records(path)
    assert f"{path}:12: record 2" in str(err.value)
    assert message in str(err.value)


def test_invalid_json_syntax_in_list_names_line(tmp_path):
    path = tmp_path / "bad.json"
    broken = '{\n  "instruction": "x",\n  "output": "y",,\n}'  # error on its 3rd line
    path.write_text(_json_list_text([GOOD_TEXT, broken]))
    with pytest.raises(DataError, match=rf"{path}:9: record 1: invalid JSON"):
        read_json_records(path)


def test_missing_comma_between_records(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[\n" + GOOD_TEXT + "\n" + GOOD_TEXT + "\n]")
    with pytest.raises(DataError, match=rf"{path}:7: after record 0"):
        read_json_records(path)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"instruction": "x", "output": "y"', "invalid JSON"),
        ('"just a string"', "is a str"),
        ('{"instruction": ["x"], "output": "y"}', "'instruction' is a list"),
        ('{"instruction": "x"}', "no 'output' field"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n" + bad_line + "\n")
    with pytest.raises(DataError) as err:
        read_json_records(path)
    assert f"{path}:4: record 2" in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_file_that_is_not_utf8_names_the_file_and_byte(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    good = json.dumps(GOOD).encode()
    path.write_bytes(good + b"\n" + '{"instruction": "caf\u00e9", "output": "x"}'.encode("latin-1"))
    with pytest.raises(DataError) as err:
        read_json_records(path)
    offset = len(good) + 1 + len('{"instruction": "caf')
    assert str(err.value).startswith(f"{path}: not UTF-8 text (byte {offset} is 0xe9)")
    assert "must be UTF-8" in str(err.value)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.json").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        read_json_records(tmp_path / "empty.json")
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(DataError, match="no records"):
        read_json_records(tmp_path / "none.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_records(str(tmp_path / "missing.json"))


def test_holdout_split_disjoint_and_deterministic():
    records = [{"instruction": str(i), "input": "", "output": str(i)} for i in range(100)]
    train, held = holdout_split(records, 10, seed=3)
    assert len(train) == 90 and len(held) == 10
    assert {r["instruction"] for r in train}.isdisjoint(r["instruction"] for r in held)
    assert holdout_split(records, 10, seed=3) == (train, held)
    assert holdout_split(records, 10, seed=4)[1] != held
    with pytest.raises(ValueError):
        holdout_split(records, 100)


def _fake_tfds(monkeypatch, examples, calls):
    def data_source(name, split, data_dir=None):
        calls.append((name, split, data_dir))
        return examples

    monkeypatch.setitem(
        sys.modules, "tensorflow_datasets", types.SimpleNamespace(data_source=data_source)
    )


def test_tfds_field_mapping_decodes_bytes(monkeypatch):
    """TFDS array_record sources return text features as bytes; nested features as dicts."""
    examples = [
        {"question": b"Who wrote Hamlet?", "answer": {"value": np.bytes_(b"Shakespeare")}},
        {"question": np.array(b"2 + 2?", dtype=object), "answer": {"value": "4"}},
    ]
    calls: list = []
    _fake_tfds(monkeypatch, examples, calls)
    fmap = {"instruction": "question", "output": "answer/value"}
    records = load_records("tfds:trivia_qa/rc:1.1.0", "validation", data_dir="/d", field_map=fmap)
    assert calls == [("trivia_qa/rc:1.1.0", "validation", "/d")]
    assert records == [
        {"instruction": "Who wrote Hamlet?", "input": "", "output": "Shakespeare"},
        {"instruction": "2 + 2?", "input": "", "output": "4"},
    ]
    with pytest.raises(DataError, match=r"example 0: no feature 'response'"):
        read_tfds_records("x", field_map={"instruction": "question", "output": "response"})


def test_tfds_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="tensorflow-datasets"):
        read_tfds_records("alpaca")


def test_tfds_array_record_roundtrip(tmp_path):
    """A real TFDS dataset written as array_record and read back without TensorFlow."""
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(5)]

    class TinyQa(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        pkg_dir_path = tmp_path  # a test module is not a package TFDS can read metadata from

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(
                    {"q": tfds.features.Text(), "a": tfds.features.Text()}
                )
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield from enumerate(rows)

    TinyQa(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    records = read_tfds_records(
        "tiny_qa", "train", data_dir=str(tmp_path), field_map={"instruction": "q", "output": "a"}
    )
    got = sorted((r["instruction"], r["output"]) for r in records)
    assert got == sorted((r["q"], r["a"]) for r in rows)


def test_alpaca_tfds_builder_from_manual_dir(tmp_path):
    """The Stanford Alpaca builder prepares offline from a manually placed alpaca_data.json."""
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    from sorted_jax.data.alpaca_tfds import ALPACA_FILE, prepare_alpaca

    manual = tmp_path / "manual"
    manual.mkdir()
    src = _asset("alpaca_en_demo.json")
    (manual / ALPACA_FILE).write_bytes(src.read_bytes())
    prepare_alpaca(str(tmp_path / "data"), manual_dir=str(manual))
    records = load_records("tfds:stanford_alpaca", "train", data_dir=str(tmp_path / "data"))
    key = lambda r: (r["instruction"], r["input"], r["output"])
    assert sorted(map(key, records)) == sorted(map(key, read_json_records(src)))
