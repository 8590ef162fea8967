from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opd_megatron.data.dataset import DataError, load_prompt_dataset, load_sft_dataset
from opd_megatron.data.examples import PromptExample

GOOD = {"prompt": "1+2=", "answer": "3"}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_rows(path, rows):
    return write_lines(path, [json.dumps(r) for r in rows])


def test_jsonl_prompt_rows(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [
        GOOD,
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="}],
         "answer": "4", "solution": "2+2=4", "system_prompt": "rule"},
    ])
    ds = load_prompt_dataset(path)
    assert len(ds) == 2 and ds.num_skipped == 0
    assert ds[0] == PromptExample(messages=[{"role": "user", "content": "1+2="}], answer="3", index=0)
    assert ds[1].messages[0] == {"role": "system", "content": "be brief"}
    assert (ds[1].solution, ds[1].system_prompt, ds[1].index) == ("2+2=4", "rule", 1)


def test_blank_lines_are_not_rows(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(GOOD), "", "  ", json.dumps(GOOD)])
    assert len(load_prompt_dataset(path)) == 2


def test_parquet_rows(tmp_path):
    table = pa.Table.from_pylist([
        {"prompt": "1+2=", "answer": "3", "messages": None},
        {"prompt": None, "answer": "4", "messages": [{"role": "user", "content": "2+2="}]},
    ])
    pq.write_table(table, tmp_path / "p.parquet")
    ds = load_prompt_dataset(tmp_path / "p.parquet")
    assert [ex.messages[0]["content"] for ex in ds] == ["1+2=", "2+2="]
    assert [ex.answer for ex in ds] == ["3", "4"]


def test_parquet_error_names_row_number(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": None}]),
                   tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: row 2: field 'answer': missing required field"):
        load_prompt_dataset(tmp_path / "p.parquet")


@pytest.mark.parametrize("bad_line, field", [
    ('{"prompt": "1+2=", ', "<json>"),
    ('[1, 2]', "<json>"),
    ('{"prompt": "1+2="}', "answer"),
    ('{"answer": "3"}', "prompt"),
    ('{"prompt": 12, "answer": "3"}', "prompt"),
    ('{"prompt": "1+2=", "answer": 3}', "answer"),
    ('{"prompt": "1+2=", "answer": "3", "solution": ["x"]}', "solution"),
    ('{"messages": [{"role": "robot", "content": "x"}], "answer": "3"}', r"messages\[0\]\.role"),
    ('{"messages": [{"role": "user", "content": 5}], "answer": "3"}', r"messages\[0\]\.content"),
    ('{"messages": [], "answer": "3"}', "messages"),
    ('{"messages": [{"role": "assistant", "content": "hi"}], "answer": "3"}', "messages"),
])
def test_malformed_row_names_file_line_and_field(tmp_path, bad_line, field):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(GOOD), "", bad_line])
    with pytest.raises(DataError) as info:
        load_prompt_dataset(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:3: field '")
    assert re.search(f"field '{field}'", message)


def test_skip_bad_rows_counts(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(GOOD), "not json", '{"prompt": "x"}',
                                              json.dumps(GOOD)])
    ds = load_prompt_dataset(path, skip_bad_rows=True)
    assert len(ds) == 2 and ds.num_skipped == 2
    assert [ex.index for ex in ds] == [0, 1]


def test_empty_dataset_is_an_error(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=r"empty\.jsonl: dataset has no valid rows$"):
        load_prompt_dataset(path)
    path = write_lines(tmp_path / "bad.jsonl", ["{}", "nope"])
    with pytest.raises(DataError, match=r"bad\.jsonl: dataset has no valid rows \(2 bad rows skipped\)"):
        load_prompt_dataset(path, skip_bad_rows=True)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.jsonl: dataset file not found$"):
        load_prompt_dataset(tmp_path / "nowhere.jsonl")


def test_unknown_extension(tmp_path):
    path = write_rows(tmp_path / "p.csv", [GOOD])
    with pytest.raises(DataError, match=r"p\.csv: unsupported dataset extension '\.csv'"):
        load_prompt_dataset(path)


def test_sft_rows(tmp_path):
    path = write_rows(tmp_path / "s.jsonl", [
        {"prompt": "1+2=", "response": "3"},
        {"messages": [{"role": "system", "content": "r"}, {"role": "user", "content": "2+2="},
                      {"role": "assistant", "content": "4"}]},
    ])
    ds = load_sft_dataset(path)
    assert ds[0].messages == [{"role": "user", "content": "1+2="}] and ds[0].response == "3"
    assert [m["role"] for m in ds[1].messages] == ["system", "user"] and ds[1].response == "4"


@pytest.mark.parametrize("row, field", [
    ({"prompt": "1+2="}, "response"),
    ({"messages": [{"role": "user", "content": "1+2="}]}, "response"),
    ({"messages": [{"role": "assistant", "content": "3"}]}, "messages"),
    ({"prompt": "1+2=", "response": 3}, "response"),
])
def test_malformed_sft_row(tmp_path, row, field):
    path = write_rows(tmp_path / "s.jsonl", [row])
    with pytest.raises(DataError, match=f"s\\.jsonl:1: field '{field}'"):
        load_sft_dataset(path)
