"""Metadata conditioning (MeCo): derive a short metadata prefix per document, offline.

MeCo (Gao et al. 2025) prepends ``URL: <host>\\n\\n`` to each pretraining document (e.g.
``URL: en.wikipedia.org\\n\\n``), trains the first 90% of steps that way with no loss on the metadata tokens,
then cools down on plain text. This step only *derives* the prefix and stores it in
``doc.metadata["meco_prefix"]``; the text is left unchanged. `TokenizeToIndexed(meco=True)` then writes the
corpus twice, with and without the prefix, masking the prefix tokens out of the loss.

Kinds of metadata (``MetadataConfig.kind``):

- ``url_host``: the URL's host, as MeCo does. We keep the **full host** (``www.`` included) by default
  because that is what the paper conditions on and what a user would type at inference to steer the model;
  ``strip_www: true`` folds ``www.example.com`` into ``example.com`` (one signal per site). Hosts are
  lowercased (``urlsplit(...).hostname``), ports, credentials and a trailing dot are dropped. No registered-
  domain / public-suffix reduction: that needs the public suffix list, which we do not download at run time.
- ``url_hash``: ``URL: <first hash_chars hex of sha256(salt + host)>`` - the paper's hashed-URL variant: the
  same site still gets the same tag, but the tag carries no meaning.
- ``field``: any document metadata field, e.g. a topic label from a classifier: ``Topic: sports``. Lists are
  joined with ``", "``.

A document without usable metadata gets no prefix (it is still kept); it is counted as ``no_metadata`` and
``no_metadata_<reason>`` (``missing_url``, ``bad_url``, ``missing_field``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

META_PREFIX_KEY = "meco_prefix"


@dataclass
class MetadataConfig:
    """The metadata stage (MeCo): the prefix each document gets, kept in ``doc.metadata[output_key]`` (the text is
    unchanged); ``tokenize`` with ``meco: true`` writes the corpus with and without it."""

    # url_host (MeCo), url_hash (the hashed-URL variant) or field (a metadata field)
    kind: Literal["url_host", "url_hash", "field"] = "url_host"
    url_key: str = "url"  # document metadata key holding the source URL
    strip_www: bool = False  # fold www.example.com into example.com
    hash_chars: int = 16  # url_hash: hex characters of sha256(salt + host) kept
    hash_salt: str = ""  # url_hash: salt prepended to the host before hashing
    field: str = "topic"  # for kind "field"
    label: str | None = None  # default: "URL" for url kinds, the capitalised field name for "field"
    template: str = "{label}: {value}\n\n"  # the prefix; {label} and {value} are filled in
    output_key: str = META_PREFIX_KEY  # doc.metadata key that receives the prefix (what tokenize meco reads)

    def validate(self) -> None:
        if not 4 <= self.hash_chars <= 64:
            raise ValueError(f"hash_chars must be between 4 and 64, got {self.hash_chars}")
        if "{value}" not in self.template:
            raise ValueError(f"template must contain {{value}}, got {self.template!r}")
        try:
            self.template.format(label="x", value="y")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"template {self.template!r}: only {{label}} and {{value}} are available ({e})") from None
        if not self.output_key:
            raise ValueError("output_key must not be empty")

    @property
    def resolved_label(self) -> str:
        if self.label is not None:
            return self.label
        if self.kind == "field":
            return self.field.replace("_", " ").capitalize()
        return "URL"

    def prefix_for(self, metadata: dict) -> tuple[str | None, str]:
        """(prefix, "") or (None, reason) for one document's metadata."""
        if self.kind == "field":
            value = metadata.get(self.field)
            if isinstance(value, (list, tuple)):
                value = ", ".join(str(v).strip() for v in value if str(v).strip())
            value = "" if value is None else str(value).strip()
            if not value:
                return None, "missing_field"
            return self.template.format(label=self.resolved_label, value=value), ""
        url = metadata.get(self.url_key)
        if not isinstance(url, str) or not url.strip():
            return None, "missing_url"
        host = url_host(url, strip_www=self.strip_www)
        if host is None:
            return None, "bad_url"
        if self.kind == "url_hash":
            host = hashlib.sha256((self.hash_salt + host).encode()).hexdigest()[: self.hash_chars]
        return self.template.format(label=self.resolved_label, value=host), ""


def url_host(url: str, strip_www: bool = False) -> str | None:
    """``https://WWW.Example.com:8080/a`` -> ``www.example.com`` (``example.com`` with strip_www); None if no host.

    A URL without a scheme (``example.com/page``) is read as a host followed by a path."""
    url = url.strip()
    if "://" not in url and not url.startswith("//"):
        url = "//" + url
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    if not host:
        return None
    host = host.rstrip(".")
    if any(c.isspace() for c in host) or "." not in host and host != "localhost":
        return None
    if strip_www and host.startswith("www.") and host.count(".") >= 2:
        host = host[4:]
    return host


class AddMetadata(PipelineStep):
    """Store the MeCo metadata prefix of each document in ``doc.metadata[cfg.output_key]``; drops nothing."""

    name = "🏷️ MeCo metadata"
    type = "✂️ - FORMAT"

    def __init__(self, cfg: MetadataConfig | None = None):
        super().__init__()
        self.cfg = cfg or MetadataConfig()
        self.cfg.validate()

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            with self.track_time():
                prefix, reason = self.cfg.prefix_for(doc.metadata)
                if prefix is None:
                    doc.metadata.pop(self.cfg.output_key, None)
                    self.stat_update("no_metadata", f"no_metadata_{reason}")
                else:
                    doc.metadata[self.cfg.output_key] = prefix
                    self.stat_update("metadata_added")
            yield doc
