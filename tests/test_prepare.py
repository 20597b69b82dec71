"""The data pipeline end to end: sources, strict and skip modes with file:line reports, accounting, cache."""

from __future__ import annotations

import json

import pytest

from distsft.config import DataConfig, DataSource
from distsft.data.prepare import prepare
from distsft.data.sources import Source, load_source, resolve_sources
from distsft.errors import DataError

GOOD = {
    "messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]
}
ALPACA = {"instruction": "Reset my password", "input": "", "output": "Click 'Forgot password' on the sign-in page."}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def cfg(tmp_path, path, **kw) -> DataConfig:
    return DataConfig(path=path, cache_dir=str(tmp_path / "cache"), max_seq_len=kw.pop("max_seq_len", 256), **kw)


def test_bad_rows_are_all_reported_with_file_and_line(tmp_path, demo_tokenizer):
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            GOOD,
            "{not json",
            "",
            {"messages": []},
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
            {"question": "no known format"},  # a `text` row is raw text (issue 21), no longer a bad row
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "   "}]},
            GOOD,
        ],
    )
    with pytest.raises(DataError) as e:
        prepare(cfg(tmp_path, str(f)), demo_tokenizer, seed=0)
    msg = str(e.value)
    assert msg.startswith("6 bad data rows")
    for line, reason in [
        (2, "invalid JSON"),
        (4, "empty conversation"),
        (5, "no assistant turn"),
        (6, "unknown role 'robot'"),
        (7, "no recognisable format"),
        (8, "empty content"),
    ]:
        reported = [x for x in msg.splitlines() if x.strip().startswith(f"{f}:{line}: ")]
        assert len(reported) == 1 and reason in reported[0], (line, msg)


def test_skip_mode_writes_rejected_and_accounts_for_every_row(tmp_path, demo_tokenizer):
    long = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, "{bad", long, GOOD, "", "   ", {"messages": []}])
    out = tmp_path / "run"
    data = prepare(cfg(tmp_path, str(f), on_error="skip"), demo_tokenizer, seed=0, output_dir=out)
    s = data.stats
    assert (s.rows_read, s.kept, s.too_long, s.rejected) == (5, 2, 1, 2)
    assert s.kept + s.too_long + s.rejected == s.rows_read
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejected] == [
        (2, "invalid JSON"),
        (7, "empty conversation"),
    ]


def test_truncate_keeps_long_examples_with_supervision(tmp_path, demo_tokenizer):
    long_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes " * 300}]}
    long_prompt = {"messages": [{"role": "user", "content": "hi " * 300}, {"role": "assistant", "content": "yes"}]}
    f = write_jsonl(tmp_path / "d.jsonl", [long_answer, long_prompt])
    data = prepare(cfg(tmp_path, str(f), too_long="truncate", max_seq_len=64), demo_tokenizer, seed=0)
    # the long answer is cut to 64 tokens and kept; the long prompt leaves nothing to learn and is dropped
    assert (data.stats.kept, data.stats.too_long) == (1, 1)
    assert len(data.train[0]["input_ids"]) == 64


def test_every_source_kind_and_per_source_format(tmp_path, demo_tokenizer):
    import datasets

    jsonl = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    (tmp_path / "b.json").write_text(json.dumps([ALPACA, ALPACA], indent=2))
    datasets.Dataset.from_list([{"prompt": "2+2?", "completion": "4"}]).to_parquet(str(tmp_path / "c.parquet"))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(
        [{"conversations": [{"from": "human", "value": "hey"}, {"from": "gpt", "value": "yo"}]}]
    ).save_to_disk(str(saved))
    alpaca_typed = write_jsonl(tmp_path / "typed.jsonl", [ALPACA])
    spec = [
        str(jsonl),
        str(tmp_path / "b.json"),
        str(tmp_path / "c.parquet"),
        str(saved),
        DataSource(path=str(alpaca_typed), format="alpaca"),
    ]
    data = prepare(cfg(tmp_path, spec), demo_tokenizer, seed=0)
    assert (data.stats.rows_read, data.stats.kept) == (6, 6)


def test_json_array_errors_name_the_line(tmp_path, demo_tokenizer):
    (tmp_path / "b.json").write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a"}\n]\n')
    with pytest.raises(DataError, match=r"b.json:3: no recognisable format"):
        prepare(cfg(tmp_path, str(tmp_path / "b.json")), demo_tokenizer, seed=0)


def test_directory_expands_to_its_data_files(tmp_path):
    (tmp_path / "x").mkdir()
    write_jsonl(tmp_path / "x" / "1.jsonl", [GOOD])
    write_jsonl(tmp_path / "x" / "2.jsonl", [GOOD])
    (tmp_path / "x" / "notes.txt").write_text("ignored")
    assert [s.path.split("/")[-1] for s in resolve_sources(str(tmp_path / "x"))] == ["1.jsonl", "2.jsonl"]


def test_hub_loading_code_path_on_a_local_copy(tmp_path):
    """`datasets.load_dataset(id)` is the hub path; a local directory exercises the same call offline."""
    import datasets

    repo = tmp_path / "org_dataset"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_list([GOOD, GOOD]).to_parquet(str(repo / "data" / "train-00000.parquet"))
    ds = load_source(Source(str(repo), "hub", "auto", "train"), tmp_path / "hf")
    assert len(ds) == 2 and ds[1]["__line"] == 2
    assert resolve_sources("hf://some-org/some-dataset")[0].kind == "hub"
    with pytest.raises(DataError, match="probe/nope: no such file or directory; for the Hugging Face Hub dataset "
                       "probe/nope, write hf://probe/nope"):  # fmt: skip
        resolve_sources("probe/nope")  # a mistyped local path is never fetched from the network


def test_missing_path_is_an_error():
    with pytest.raises(DataError, match="no such file or directory"):
        resolve_sources("./nope/data.jsonl")


def test_cache_hit_and_invalidation(tmp_path, demo_tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, ALPACA])
    c = cfg(tmp_path, str(f))
    first = prepare(c, demo_tokenizer, seed=0)
    again = prepare(c, demo_tokenizer, seed=0)
    assert not first.cache_hit and again.cache_hit and again.cache_dir == first.cache_dir
    assert again.train[:] == first.train[:]

    changed_cfg = prepare(cfg(tmp_path, str(f), max_seq_len=128), demo_tokenizer, seed=0)
    assert not changed_cfg.cache_hit

    write_jsonl(f, [GOOD, ALPACA, GOOD])
    changed_data = prepare(c, demo_tokenizer, seed=0)
    assert not changed_data.cache_hit and changed_data.stats.kept == 3

    import copy

    tok2 = copy.deepcopy(demo_tokenizer)
    tok2.chat_template = demo_tokenizer.chat_template.replace("\\n", "\\n\\n", 1)
    assert not prepare(c, tok2, seed=0).cache_hit
    assert not prepare(c, demo_tokenizer, seed=1).cache_hit


def test_eval_fraction_holds_out_examples(tmp_path, demo_tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 10 + [ALPACA] * 10)
    data = prepare(cfg(tmp_path, str(f), eval_fraction=0.2, packing=False), demo_tokenizer, seed=0)
    assert len(data.eval) == 4 and len(data.train) == 16


def test_bytes_that_are_not_utf8_and_damaged_parquet_are_named_not_replaced(tmp_path, demo_tokenizer):
    """A Latin-1 byte in a JSONL row was replaced by U+FFFD and trained on; in a .json file, or a truncated
    Parquet file, it was a traceback. Each is now named by file and line."""
    good = json.dumps(GOOD).encode()
    bad = json.dumps(GOOD).replace("Hello", "H\\u00e9llo").encode().replace(b"H\\u00e9llo", b"H\xe9llo")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")
    with pytest.raises(DataError, match=rf"{jsonl}:2: not UTF-8 text \(byte 0xe9"):
        prepare(cfg(tmp_path, str(jsonl)), demo_tokenizer, seed=0)
    array = tmp_path / "d.json"
    array.write_bytes(b"[\n" + good + b",\n" + bad + b"\n]\n")
    with pytest.raises(DataError, match=rf"{array}:3: not UTF-8 text"):
        prepare(cfg(tmp_path, str(array)), demo_tokenizer, seed=0)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"messages": [GOOD["messages"]] * 4}), table)
    table.write_bytes(table.read_bytes()[:-40])  # cut short, as a copy that died midway leaves it
    with pytest.raises(DataError, match=rf"{table}: not a readable Parquet file"):
        prepare(cfg(tmp_path, str(table)), demo_tokenizer, seed=0)
