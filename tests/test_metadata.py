"""MeCo metadata derivation (data_pipeline/metadata.py)."""

from __future__ import annotations

import hashlib
import json

import pytest
from datatrove.data import Document

from kiln.config import ConfigError, build_dataclass
from kiln.data_pipeline.metadata import AddMetadata, MetadataConfig, url_host

from conftest import shared_file


@pytest.mark.parametrize(
    "url, strip_www, host",
    [
        ("https://en.wikipedia.org/wiki/Kiln", False, "en.wikipedia.org"),
        ("https://WWW.Example.com:8080/a?b=1#c", False, "www.example.com"),
        ("https://WWW.Example.com:8080/a?b=1#c", True, "example.com"),
        ("http://user:pw@host.org./x", False, "host.org"),
        ("en.wikipedia.org/wiki/X", False, "en.wikipedia.org"),
        ("//cdn.example.net/x.js", False, "cdn.example.net"),
        ("http://www.com/", True, "www.com"),  # "www.com" is the site itself, not a www. subdomain
        ("http://192.168.0.1/admin", False, "192.168.0.1"),
        ("not a url", False, None),
        ("http://", False, None),
        ("mailto:someone", False, None),
    ],
)
def test_url_host(url, strip_www, host):
    assert url_host(url, strip_www=strip_www) == host


def test_prefix_kinds():
    meta = {"url": "https://en.wikipedia.org/wiki/Kiln", "topic": "ceramics", "tags": ["a", " b ", ""]}
    assert MetadataConfig().prefix_for(meta) == ("URL: en.wikipedia.org\n\n", "")
    digest = hashlib.sha256(b"en.wikipedia.org").hexdigest()
    assert MetadataConfig(kind="url_hash").prefix_for(meta) == (f"URL: {digest[:16]}\n\n", "")
    salted = hashlib.sha256(b"s1en.wikipedia.org").hexdigest()[:8]
    assert MetadataConfig(kind="url_hash", hash_chars=8, hash_salt="s1").prefix_for(meta) == (f"URL: {salted}\n\n", "")
    assert MetadataConfig(kind="field").prefix_for(meta) == ("Topic: ceramics\n\n", "")
    assert MetadataConfig(kind="field", field="tags").prefix_for(meta) == ("Tags: a, b\n\n", "")
    assert MetadataConfig(kind="field", field="tags", label="T", template="[{label}={value}] ").prefix_for(meta) == (
        "[T=a, b] ",
        "",
    )
    assert MetadataConfig(kind="field", field="missing").prefix_for(meta) == (None, "missing_field")
    assert MetadataConfig().prefix_for({}) == (None, "missing_url")
    assert MetadataConfig().prefix_for({"url": "not a url"}) == (None, "bad_url")


def test_config_validation_through_the_config_layer():
    cfg = build_dataclass(MetadataConfig, {"kind": "url_host", "strip_www": True})
    assert cfg.strip_www is True
    with pytest.raises(ConfigError, match="expected one of"):
        build_dataclass(MetadataConfig, {"kind": "url_hots"})
    with pytest.raises(ConfigError, match="hash_chars"):
        build_dataclass(MetadataConfig, {"kind": "url_hash", "hash_chars": 2})
    with pytest.raises(ConfigError, match="template"):
        build_dataclass(MetadataConfig, {"template": "{label}: no value"})


def test_add_metadata_step_counts_and_keeps_every_document():
    docs = [
        Document(text="a", id="0", metadata={"url": "https://www.nytimes.com/2024/x"}),
        Document(text="b", id="1", metadata={}),
        Document(text="c", id="2", metadata={"url": "::::"}),
        Document(text="d", id="3", metadata={"url": "en.wikipedia.org/wiki/A", "meco_prefix": "stale"}),
        Document(text="e", id="4", metadata={"url": "   ", "meco_prefix": "stale"}),
    ]
    step = AddMetadata(MetadataConfig())
    out = list(step.run(iter(docs)))
    assert [d.id for d in out] == ["0", "1", "2", "3", "4"]
    assert [d.metadata.get("meco_prefix") for d in out] == [
        "URL: www.nytimes.com\n\n",
        None,
        None,
        "URL: en.wikipedia.org\n\n",
        None,
    ]
    assert step.stats.to_dict()["stats"] == {
        "metadata_added": 2,
        "no_metadata": 3,
        "no_metadata_missing_url": 2,
        "no_metadata_bad_url": 1,
    }


@pytest.mark.shared_data
def test_wceb_urls_all_get_a_host():
    path = shared_file("web/wceb_modern_1000_url_text.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for _, line in zip(range(200), f)]
    docs = [Document(text=r["text"], id=r["id"], metadata={"url": r["url"]}) for r in rows]
    out = list(AddMetadata().run(iter(docs)))
    prefixes = [d.metadata.get("meco_prefix") for d in out]
    assert prefixes[0] == "URL: scratchculinary.com\n\n"
    assert sum(p is not None for p in prefixes) == 200
    assert all(p.startswith("URL: ") and p.endswith("\n\n") and "/" not in p for p in prefixes)
