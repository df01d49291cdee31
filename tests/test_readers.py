"""Readers (data_pipeline/readers): documents, ids, urls, and the exact accounting of every kind of bad input."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import zlib
from pathlib import Path

import dill
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.logging import logger
from warcio.archiveiterator import ArchiveIterator
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from kiln.config import ConfigError, build_dataclass
from kiln.data_pipeline.readers import (
    REJECT_REASONS,
    InputConfig,
    JsonlReader,
    ParquetReader,
    TextLinesReader,
    WarcReader,
    build_input_steps,
)

from conftest import shared_file


# ---------------------------------------------------------------------------------------------------------------
# helpers
def read(cfg: InputConfig, rejects: Path, rank: int = 0, world_size: int = 1, data=None):
    """Run the input's steps in-process; (documents, stats of the reader step as {name: total})."""
    [step] = build_input_steps(cfg, str(rejects))
    docs = list(step.run(data, rank=rank, world_size=world_size))
    return docs, stats_of(step)


def stats_of(step: PipelineStep) -> dict[str, int]:
    return {name: int(metric.total) for name, metric in step.stats.stats.items() if name not in ("doc_len",)}


def rejects_of(folder: Path, rank: int = 0) -> list[dict]:
    path = folder / f"{rank:05d}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def jl(obj) -> bytes:
    return orjson.dumps(obj) + b"\n"


GOOD = [{"id": f"doc-{i}", "text": f"document number {i}", "url": f"https://example.org/{i}"} for i in range(3)]
GOOD_BYTES = b"".join(jl(r) for r in GOOD)


# ---------------------------------------------------------------------------------------------------------------
# JSONL: one bad line costs one record
def test_jsonl_every_bad_line_is_rejected_by_reason_and_good_lines_survive(tmp_path):
    lines = [
        jl({"id": "a", "text": "first good document", "url": "https://a.example/x"}),  # 1 good
        b'{"id": "b", "text": "unterminated\n',  # 2 malformed_json
        b"[1, 2, 3]\n",  # 3 not_an_object
        b'{"id": "c", "text": "caf\xe9 latin-1 byte"}\n',  # 4 invalid_utf8
        jl({"content": "the text is under another key", "url": "https://c.example"}),  # 5 missing_text
        jl({"id": "e", "text": ""}),  # 6 empty_text
        b"\n",  # 7 blank line: not a record
        jl({"id": "f", "text": " \t\n  "}),  # 8 empty_text (whitespace only)
        jl({"id": "g", "text": "x" * 101}),  # 9 too_large (max_doc_bytes=100)
        jl({"id": "h", "text": None}),  # 10 missing_text (null)
        jl({"id": "i", "text": "é" * 51}),  # 11 too_large: 51 characters but 102 bytes
        b'{"text": "second good document, no id, no trailing newline", "metadata": {"url": "https://m.example"}}',
    ]
    path = tmp_path / "in" / "bad.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"".join(lines))
    rejects = tmp_path / "rejects"
    docs, stats = read(InputConfig(kind="jsonl", path=str(path), max_doc_bytes=100), rejects)

    assert [d.id for d in docs] == ["a", "bad.jsonl:12"]
    assert [d.text for d in docs] == ["first good document", "second good document, no id, no trailing newline"]
    assert [d.metadata["url"] for d in docs] == ["https://a.example/x", "https://m.example"]
    assert docs[0].metadata["source_file"] == str(path)
    assert stats == {
        "input_files": 1,
        "documents": 2,
        "rejected": 9,
        "rejected_malformed_json": 1,
        "rejected_not_an_object": 1,
        "rejected_invalid_utf8": 1,
        "rejected_missing_text": 2,
        "rejected_empty_text": 2,
        "rejected_too_large": 2,
    }
    records = rejects_of(rejects)
    assert [(r["line"], r["reason"]) for r in records] == [
        (2, "malformed_json"),
        (3, "not_an_object"),
        (4, "invalid_utf8"),
        (5, "missing_text"),
        (6, "empty_text"),
        (8, "empty_text"),
        (9, "too_large"),
        (10, "missing_text"),
        (11, "too_large"),
    ]
    assert all(r["file"] == str(path) for r in records)
    by_line = {r["line"]: r for r in records}
    assert by_line[5]["message"] == "no 'text' field; keys present: ['content', 'url']"
    assert by_line[10]["message"] == "'text' is null, expected a string"
    assert by_line[3]["message"] == "line is JSON an array, expected an object"
    assert by_line[4]["message"] == "line is not valid UTF-8 (invalid continuation byte at byte 24 of 40)"
    assert by_line[8]["message"] == "'text' is whitespace only (5 characters)"
    assert by_line[9]["message"] == "'text' is 101 bytes, over max_doc_bytes=100"
    assert by_line[11]["message"] == "'text' is 102 bytes, over max_doc_bytes=100"
    assert by_line[2]["message"].startswith("not valid JSON: ")
    # raw keeps the whole line; an invalid byte is escaped, not lost
    assert by_line[4]["raw"] == '{"id": "c", "text": "caf\\xe9 latin-1 byte"}'
    assert by_line[2]["raw"] == '{"id": "b", "text": "unterminated'
    assert by_line[9]["raw"] == lines[8].decode().rstrip("\n")


def test_jsonl_metadata_and_url_fallbacks(tmp_path):
    path = tmp_path / "dolma.jsonl"
    path.write_bytes(
        jl({"id": "http://id-is-a-url.example/page", "text": "cc_net style", "source": "cc"})
        + jl({"id": "d2", "text": "dolma style", "metadata": {"url": "https://meta.example/", "lang": "en"}})
        + jl({"id": "d3", "text": "no url at all", "url": ""})
        + jl({"id": 17, "text": "custom keys", "link": "https://link.example/"})
    )
    docs, _ = read(InputConfig(kind="jsonl", path=str(path)), tmp_path / "rej")
    assert [d.id for d in docs] == ["http://id-is-a-url.example/page", "d2", "d3", "17"]
    assert [d.metadata.get("url") for d in docs] == [
        "http://id-is-a-url.example/page",
        "https://meta.example/",
        None,
        None,
    ]
    assert docs[0].metadata["source"] == "cc"
    assert docs[1].metadata["lang"] == "en"
    docs, _ = read(InputConfig(kind="jsonl", path=str(path), url_key="link"), tmp_path / "rej")
    assert docs[3].metadata["url"] == "https://link.example/"


@pytest.mark.parametrize(
    "name, compress",
    [
        ("docs.jsonl.gz", gzip.compress),
        ("docs.jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
        ("docs.jsonl.bz2", bz2.compress),
        ("gzip_without_extension.jsonl", gzip.compress),
        ("multi_member.jsonl.gz", lambda b: gzip.compress(b[:40]) + gzip.compress(b[40:])),
        (
            "multi_frame.jsonl.zst",
            lambda b: zstandard.ZstdCompressor().compress(b[:40]) + zstandard.ZstdCompressor().compress(b[40:]),
        ),
    ],
)
def test_jsonl_compressed_inputs_read_fine(tmp_path, name, compress):
    path = tmp_path / name
    path.write_bytes(compress(GOOD_BYTES))
    rejects = tmp_path / "rej"
    docs, stats = read(InputConfig(kind="jsonl", path=str(path)), rejects)
    assert [d.id for d in docs] == ["doc-0", "doc-1", "doc-2"]
    assert [d.text for d in docs] == ["document number 0", "document number 1", "document number 2"]
    assert stats == {"input_files": 1, "documents": 3}
    assert rejects_of(rejects) == []


def _lines(n: int) -> bytes:
    return b"".join(jl({"id": f"r{i}", "text": f"record {i} " + "lorem ipsum " * (i % 7)}) for i in range(n))


def test_truncated_gzip_keeps_every_complete_line_then_one_truncated_reject(tmp_path):
    data = _lines(2000)
    packed = gzip.compress(data, mtime=0)
    cut = packed[: len(packed) // 2]
    # what an independent decoder recovers from the first half
    recovered = zlib.decompressobj(wbits=31).decompress(cut)
    complete = recovered.count(b"\n")
    partial = recovered[recovered.rfind(b"\n") + 1 :]
    assert 0 < complete < 2000 and partial  # the cut is inside a line

    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(cut)
    rejects = tmp_path / "rej"
    docs, stats = read(InputConfig(kind="jsonl", path=str(path)), rejects)
    assert [d.id for d in docs] == [f"r{i}" for i in range(complete)]
    assert stats == {
        "input_files": 1,
        "documents": complete,
        "rejected": 1,
        "rejected_truncated_file": 1,
    }
    [record] = rejects_of(rejects)
    assert record["line"] == complete + 1
    assert record["reason"] == "truncated_file"
    assert record["raw"] == partial.decode()
    assert record["message"].startswith("gzip stream ends before its end-of-stream marker (file cut short)")


def test_truncated_zstd_is_reported_not_silently_short(tmp_path):
    first, second = _lines(1500), _lines(3000)[len(_lines(1500)) :]
    first_frame = zstandard.ZstdCompressor().compress(first)
    path = tmp_path / "cut.jsonl.zst"
    # the first frame whole, the second one cut in the middle
    path.write_bytes(first_frame + zstandard.ZstdCompressor().compress(second)[:100])
    rejects = tmp_path / "rej"
    docs, stats = read(InputConfig(kind="jsonl", path=str(path)), rejects)
    assert [d.id for d in docs] == [f"r{i}" for i in range(1500)]
    assert stats["rejected_truncated_file"] == 1 and stats["rejected"] == 1
    [record] = rejects_of(rejects)
    assert (record["line"], record["raw"]) == (1501, "")
    assert record["message"] == "zstd frame ends before its end (file cut short)"


def test_corrupt_gzip_keeps_lines_before_the_damage_and_other_files_go_on(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    first = gzip.compress(GOOD_BYTES, mtime=0)
    # a valid member, then a second member whose deflate data is garbage
    second = gzip.compress(_lines(50), mtime=0)
    (folder / "a_corrupt.jsonl.gz").write_bytes(first + second[:20] + b"\xff" * 200 + second[220:])
    (folder / "b_good.jsonl").write_bytes(jl({"id": "b", "text": "after the broken file"}))
    rejects = tmp_path / "rej"
    docs, stats = read(InputConfig(kind="jsonl", path=str(folder)), rejects)
    assert [d.id for d in docs] == ["doc-0", "doc-1", "doc-2", "b"]
    assert [d.metadata["source_file"] for d in docs] == [str(folder / "a_corrupt.jsonl.gz")] * 3 + [
        str(folder / "b_good.jsonl")
    ]
    assert stats == {
        "input_files": 2,
        "documents": 4,
        "rejected": 1,
        "rejected_unreadable_file": 1,
    }
    [record] = rejects_of(rejects)
    assert (record["file"], record["line"], record["reason"]) == (
        str(folder / "a_corrupt.jsonl.gz"),
        4,
        "unreadable_file",
    )
    assert record["message"].startswith("gzip data is corrupt: ")


def test_rejects_are_logged_a_few_per_file_then_summed_up(tmp_path):
    path = tmp_path / "noisy.jsonl"
    path.write_bytes(b"not json\n" * 12 + jl({"text": "survivor"}))
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    try:
        docs, stats = read(InputConfig(kind="jsonl", path=str(path)), tmp_path / "rej")
    finally:
        logger.remove(sink)
    assert [d.text for d in docs] == ["survivor"]
    assert stats["rejected_malformed_json"] == 12
    individual = [m for m in messages if m.startswith("rejected (malformed_json)")]
    assert [m.split(": ")[0] for m in individual] == [f"rejected (malformed_json) {path}:{i}" for i in range(1, 6)]
    [summary] = [m for m in messages if "only the first" in m]
    assert summary == (
        f"{path}: 12 records rejected ({{'malformed_json': 12}}); only the first 5 were logged, "
        f"all are in {tmp_path / 'rej' / '00000.jsonl'}"
    )
    assert len(rejects_of(tmp_path / "rej")) == 12


# ---------------------------------------------------------------------------------------------------------------
# plain text
def test_text_one_document_per_non_empty_line(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_bytes(
        b"Anarchism is a political philosophy.\n"
        b"\n"
        b"   \n"
        b"Autism is a neurodevelopmental condition.\r\n"
        b"bad \xff byte\n" + b"y" * 60 + b"\n"
        b"Last article without newline"
    )
    rejects = tmp_path / "rej"
    docs, stats = read(InputConfig(kind="text", path=str(path), max_doc_bytes=50), rejects)
    assert [(d.id, d.text) for d in docs] == [
        ("wiki.txt:1", "Anarchism is a political philosophy."),
        ("wiki.txt:4", "Autism is a neurodevelopmental condition."),
        ("wiki.txt:7", "Last article without newline"),
    ]
    assert all(d.metadata == {"source_file": str(path)} for d in docs)
    assert stats == {
        "input_files": 1,
        "documents": 3,
        "rejected": 2,
        "rejected_invalid_utf8": 1,
        "rejected_too_large": 1,
    }
    assert [(r["line"], r["reason"], r["raw"]) for r in rejects_of(rejects)] == [
        (5, "invalid_utf8", "bad \\xff byte"),
        (6, "too_large", "y" * 60),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Parquet
def test_parquet_bad_rows_missing_column_and_non_parquet_file(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    table = pa.table(
        {
            "id": ["p0", "p1", "p2", "p3", None],
            "text": ["good row zero", None, "", "z" * 80, "good row four"],
            "url": ["https://p.example/0", None, None, None, None],
        }
    )
    pq.write_table(table, folder / "a.parquet", row_group_size=2)  # 3 row groups
    pq.write_table(pa.table({"content": ["x"], "url": ["u"]}), folder / "b_no_text.parquet")
    (folder / "c_not_parquet.parquet").write_bytes(b"this is not a parquet file at all")
    pq.write_table(pa.table({"text": [b"binary ok", b"\xff\xfe"]}), folder / "d_binary.parquet")
    (folder / "_SUCCESS").write_bytes(b"")  # Spark bookkeeping: ignored without a glob
    rejects = tmp_path / "rej"
    docs, stats = read(InputConfig(kind="parquet", path=str(folder), max_doc_bytes=50), rejects)

    assert [(d.id, d.text) for d in docs] == [
        ("p0", "good row zero"),
        ("a.parquet:5", "good row four"),
        ("d_binary.parquet:1", "binary ok"),
    ]
    assert docs[0].metadata["url"] == "https://p.example/0"
    assert "url" not in docs[1].metadata
    assert stats == {
        "input_files": 4,
        "documents": 3,
        "rejected": 6,
        "rejected_missing_text": 1,
        "rejected_empty_text": 1,
        "rejected_too_large": 1,
        "rejected_unreadable_file": 2,
        "rejected_invalid_utf8": 1,
    }
    records = [(Path(r["file"]).name, r["line"], r["reason"]) for r in rejects_of(rejects)]
    assert records == [
        ("a.parquet", 2, "missing_text"),
        ("a.parquet", 3, "empty_text"),
        ("a.parquet", 4, "too_large"),
        ("b_no_text.parquet", 0, "unreadable_file"),
        ("c_not_parquet.parquet", 0, "unreadable_file"),
        ("d_binary.parquet", 2, "invalid_utf8"),
    ]
    by_file = {(Path(r["file"]).name, r["line"]): r for r in rejects_of(rejects)}
    assert by_file[("b_no_text.parquet", 0)]["message"] == "no 'text' column; columns present: ['content', 'url']"
    assert by_file[("c_not_parquet.parquet", 0)]["message"].startswith("not a readable Parquet file: ")
    assert json.loads(by_file[("a.parquet", 2)]["raw"]) == {"id": "p1", "text": None, "url": None}


# ---------------------------------------------------------------------------------------------------------------
# WARC
ARTICLE = (
    "<html><head><title>Bread</title></head><body><nav><a href='/'>Home</a> <a href='/about'>About</a></nav>"
    "<article><h1>How to bake bread</h1>"
    + "".join(
        f"<p>Step {i}: knead the dough for ten minutes, let it rise in a warm place for an hour, then shape "
        "the loaf and bake it at two hundred degrees until the crust is golden brown.</p>"
        for i in range(5)
    )
    + "</article><footer>Copyright</footer></body></html>"
)


def write_warc(path: Path, gz: bool = True) -> None:
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=gz)

        def response(url: str, body: bytes, content_type: str) -> None:
            http = StatusAndHeaders("200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1")
            record = writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http)
            writer.write_record(record)

        writer.write_record(writer.create_warcinfo_record(path.name, {"software": "kiln tests"}))
        request = io.BytesIO(b"GET /bread HTTP/1.1\r\nHost: example.org\r\n\r\n")
        writer.write_record(writer.create_warc_record("https://example.org/bread", "request", payload=request))
        response("https://example.org/bread", ARTICLE.encode("utf-8"), "text/html; charset=utf-8")
        response("https://example.org/empty", b"<html><body><div></div></body></html>", "text/html")
        response("https://example.org/paper.pdf", b"%PDF-1.4 not html", "application/pdf")


@pytest.mark.parametrize("gz", [True, False])
def test_warc_extracts_main_text_and_counts_every_response(tmp_path, gz):
    path = tmp_path / ("crawl.warc.gz" if gz else "crawl.warc")
    write_warc(path, gz=gz)
    rejects = tmp_path / "rej"
    docs, stats = read(InputConfig(kind="warc", path=str(path)), rejects)
    [doc] = docs
    assert doc.metadata["url"] == "https://example.org/bread"
    assert doc.metadata["source_file"] == str(path)
    assert doc.id.startswith("<urn:uuid:")
    assert doc.text.startswith("How to bake bread\nStep 0: knead the dough")
    assert "Home" not in doc.text and "Copyright" not in doc.text  # boilerplate removed
    assert stats == {
        "input_files": 1,
        "warc_records": 3,
        "documents": 1,
        "dropped": 2,
        "dropped_extraction_empty": 1,
        "dropped_not_html": 1,
    }
    assert rejects_of(rejects) == []


def test_warc_extraction_timeout_is_counted(tmp_path):
    path = tmp_path / "crawl.warc.gz"
    write_warc(path)
    # 0.1 ms: the extraction process cannot even start in time
    docs, stats = read(InputConfig(kind="warc", path=str(path), extraction_timeout_s=1e-4), tmp_path / "rej")
    assert docs == []
    assert stats == {
        "input_files": 1,
        "warc_records": 3,
        "dropped": 3,
        "dropped_extraction_timeout": 2,
        "dropped_not_html": 1,
    }


def test_warc_cut_short_rejects_the_partial_record(tmp_path):
    whole = tmp_path / "whole.warc.gz"
    write_warc(whole)
    data = whole.read_bytes()
    offsets = record_offsets(whole)
    assert len(offsets) == 5  # warcinfo, request, article, empty page, pdf
    path = tmp_path / "cut.warc.gz"
    path.write_bytes(data[: offsets[3] - 100])  # inside the 3rd record (the article)
    rejects = tmp_path / "rej"
    docs, stats = read(InputConfig(kind="warc", path=str(path)), rejects)
    assert docs == []
    assert stats == {"input_files": 1, "warc_records": 1, "rejected": 1, "rejected_truncated_file": 1}
    [record] = rejects_of(rejects)
    assert (record["line"], record["reason"]) == (3, "truncated_file")
    assert record["message"].startswith("record 3 (https://example.org/bread): gzip stream ends")
    assert "WARC-Target-URI: https://example.org/bread" in record["raw"]


def test_wet_conversion_records_and_too_large_payloads(tmp_path):
    path = tmp_path / "crawl.warc.wet.gz"
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        for url, text in (("https://a.example/", "plain extracted text"), ("https://b.example/", "t" * 500)):
            record = writer.create_warc_record(
                url, "conversion", payload=io.BytesIO(text.encode()), warc_content_type="text/plain"
            )
            writer.write_record(record)
    rejects = tmp_path / "rej"
    docs, stats = read(InputConfig(kind="warc", path=str(path), max_doc_bytes=100), rejects)
    assert [(d.metadata["url"], d.text) for d in docs] == [("https://a.example/", "plain extracted text")]
    assert stats == {"input_files": 1, "warc_records": 2, "documents": 1, "rejected": 1, "rejected_too_large": 1}
    [record] = rejects_of(rejects)
    assert (record["line"], record["reason"]) == (2, "too_large")
    assert record["message"] == "record 2 (https://b.example/): payload is over max_doc_bytes=100"


def record_offsets(path: Path) -> list[int]:
    with open(path, "rb") as fh:
        records = ArchiveIterator(fh)
        return [records.get_record_offset() for _ in records]


# ---------------------------------------------------------------------------------------------------------------
# chaining, sharding, limit, executor
def test_readers_chain_and_shard_files_the_datatrove_way(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        (folder / name).write_bytes(jl({"text": f"from {name}"}) + jl({"text": f"more from {name}"}))
    (folder / ".hidden.jsonl").write_bytes(b"not json\n")
    wiki = tmp_path / "wiki.txt"
    wiki.write_text("an article\n")
    rejects = tmp_path / "rej"
    got = {}
    for rank in (0, 1):
        [jsonl] = build_input_steps(InputConfig(kind="jsonl", path=str(folder)), str(rejects))
        [text] = build_input_steps(InputConfig(kind="text", path=str(wiki)), str(rejects))
        docs = list(text.run(jsonl.run(None, rank, 2), rank, 2))
        got[rank] = ([d.id for d in docs], stats_of(jsonl)["documents"], stats_of(text).get("documents", 0))
    # rank 0: files 0 and 2 of the sorted listing, then the text file (single file: rank 0 only)
    assert got[0] == (["a.jsonl:1", "a.jsonl:2", "c.jsonl:1", "c.jsonl:2", "wiki.txt:1"], 4, 1)
    assert got[1] == (["b.jsonl:1", "b.jsonl:2"], 2, 0)
    assert rejects_of(rejects) == []  # the hidden file was not read


def test_limit_caps_documents_per_task(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_bytes(_lines(100))
    [step] = build_input_steps(InputConfig(kind="jsonl", path=str(path), limit=7), str(tmp_path), progress=True)
    docs = list(step.run(None, rank=0, world_size=1))
    assert [d.id for d in docs] == [f"r{i}" for i in range(7)]
    assert stats_of(step) == {"input_files": 1, "documents": 7}
    # the step survives pickling, as datatrove executors ship it to workers
    clone = dill.loads(dill.dumps(step))
    assert [d.id for d in clone.run(None, rank=0, world_size=1)][-1] == "r6"


def test_executor_writes_stats_and_per_rank_rejects(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(GOOD_BYTES + b"{oops\n")
    (folder / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"[]\n" + GOOD_BYTES))
    rejects = tmp_path / "rej"
    steps = build_input_steps(InputConfig(kind="jsonl", path=str(folder)), str(rejects))
    LocalPipelineExecutor(pipeline=steps, tasks=2, workers=1, logging_dir=str(tmp_path / "logs")).run()
    for rank, reason in ((0, "malformed_json"), (1, "not_an_object")):
        [reader_stats] = json.loads((tmp_path / "logs" / "stats" / f"{rank:05d}.json").read_text())
        totals = {k: v["total"] if isinstance(v, dict) else v for k, v in reader_stats["stats"].items()}
        assert totals["documents"] == 3
        assert totals["rejected"] == 1 and totals[f"rejected_{reason}"] == 1
        [record] = rejects_of(rejects, rank)
        assert record["reason"] == reason


# ---------------------------------------------------------------------------------------------------------------
# config
def test_input_config_validation(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(GOOD_BYTES)
    with pytest.raises(ValueError, match="input path does not exist: /nonexistent/data"):
        InputConfig(kind="jsonl", path="/nonexistent/data").validate()
    with pytest.raises(ValueError, match="glob '\\*.gz' applies only when path is a folder"):
        InputConfig(kind="jsonl", path=str(tmp_path / "x.jsonl"), glob="*.gz").validate()
    with pytest.raises(ValueError, match="no input files in folder .* matching glob '\\*.parquet'"):
        InputConfig(kind="parquet", path=str(tmp_path), glob="*.parquet").validate()
    with pytest.raises(ValueError, match="limit must be -1"):
        InputConfig(kind="jsonl", path=str(tmp_path), limit=0).validate()
    with pytest.raises(ValueError, match="kind must be one of"):
        InputConfig(kind="csv", path=str(tmp_path)).validate()  # type: ignore[arg-type]
    # through the recipe loader: the message names the key path
    with pytest.raises(ConfigError, match="key 'input': input path does not exist: /nope"):
        build_dataclass(InputConfig, {"kind": "jsonl", "path": "/nope"}, path="input")
    with pytest.raises(ConfigError, match="Did you mean 'jsonl'"):
        build_dataclass(InputConfig, {"kind": "jsonlines", "path": str(tmp_path)})
    cfg = build_dataclass(InputConfig, {"kind": "jsonl", "path": str(tmp_path), "glob": "*.jsonl"})
    steps = build_input_steps(cfg, str(tmp_path / "rej"))
    assert [type(s) for s in steps] == [JsonlReader]
    assert {
        k: type(build_input_steps(InputConfig(kind=k, path=str(tmp_path)), "r")[0]) for k in ("parquet", "warc", "text")
    } == {
        "parquet": ParquetReader,
        "warc": WarcReader,
        "text": TextLinesReader,
    }
    assert REJECT_REASONS == (
        "malformed_json",
        "not_an_object",
        "invalid_utf8",
        "missing_text",
        "empty_text",
        "too_large",
        "truncated_file",
        "unreadable_file",
    )


# ---------------------------------------------------------------------------------------------------------------
# real data (skips without ../shared/data)
@pytest.mark.shared_data
def test_shared_wceb_jsonl(tmp_path):
    path = shared_file("web/wceb_modern_1000_url_text.jsonl")
    docs, stats = read(InputConfig(kind="jsonl", path=str(path)), tmp_path / "rej")
    assert len(docs) == 1000 and stats == {"input_files": 1, "documents": 1000}
    without_url = [d.id for d in docs if "url" not in d.metadata]
    assert without_url == ["wceb-0551"]  # its url is "" in the source ("Making sure you're not a bot!" page)
    # the reader passes URLs through as the source gives them; one source url is relative
    relative = {
        d.id: d.metadata["url"] for d in docs if "url" in d.metadata and not d.metadata["url"].startswith("http")
    }
    assert relative == {"wceb-0701": "/bigquery"}
    assert docs[0].id == "wceb-0001" and docs[0].metadata["title"].startswith("Top Nutrition Trends")


@pytest.mark.shared_data
def test_shared_dolma_jsonl_gz_urls_from_metadata(tmp_path):
    path = shared_file("web/dolma_provided_documents_000.jsonl.gz")
    docs, stats = read(InputConfig(kind="jsonl", path=str(path)), tmp_path / "rej")
    assert stats == {"input_files": 1, "documents": 10}
    assert all(d.metadata["url"].startswith("http") for d in docs)
    folder = shared_file("web/dolma_cc_en_head-0091.jsonl").parent
    docs, stats = read(InputConfig(kind="jsonl", path=str(folder), glob="dolma_cc_en_head-*.jsonl"), tmp_path / "r")
    assert stats == {"input_files": 2, "documents": 20}
    assert all(d.metadata["url"].startswith("http") for d in docs)


@pytest.mark.shared_data
def test_shared_warc_files(tmp_path):
    paths = [shared_file("web/dolma_sample-0000.warc.gz"), shared_file("web/dolma_sample-0001.warc.gz")]
    responses = 0
    for path in paths:
        with open(path, "rb") as fh:
            responses += sum(1 for record in ArchiveIterator(fh) if record.rec_type == "response")
    assert responses == 37
    rejects = tmp_path / "rej"
    docs, stats = read(InputConfig(kind="warc", path=str(paths[0].parent), glob="dolma_sample-*.warc.gz"), rejects)
    assert stats["warc_records"] == responses
    assert stats["documents"] + stats.get("dropped", 0) + stats.get("rejected", 0) == responses
    assert stats == {"input_files": 2, "warc_records": 37, "documents": 37}
    assert len(docs) == 37
    assert all(d.metadata["url"].startswith("http") and d.text.strip() for d in docs)
    assert docs[0].metadata["url"] == "https://www.semanticscholar.org/research/research-team"
    assert docs[0].text.startswith("Meet Our Team\nSemantic Scholar Research Team")
    assert rejects_of(rejects) == []
