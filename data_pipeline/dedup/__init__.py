"""Deduplication for the curation pipeline: exact (normalised content), URL (normalised URL) and MinHash-LSH.

Three stages, all datatrove ``PipelineStep``s, each run with any datatrove executor::

    cfg = DedupConfig()                                   # exact + url + MinHash 14 x 8, 5-grams
    LocalPipelineExecutor([reader, DedupSignatures(cfg, work)], tasks=N).run()
    for pipeline, tasks in find_duplicate_stages(cfg, work, num_input_tasks=N):
        LocalPipelineExecutor(pipeline, tasks=tasks).run()
    LocalPipelineExecutor([reader, DedupFilter(cfg, work, exclusion_writer), writer], tasks=N).run()

Among duplicates, the document with the smallest (rank, index) is kept; a document that is several kinds of
duplicate is dropped once, with reason precedence exact > url > minhash.
"""

from .config import DedupConfig, MinhashConfig
from .filter import DedupFilter
from .hashing import MinHasher, content_hash, normalize_url, url_hash
from .signatures import DedupSignatures
from .stages import ClusterDuplicates, FindDuplicatePairs, find_duplicate_stages, union_find
from .storage import REASONS

__all__ = [
    "REASONS",
    "ClusterDuplicates",
    "DedupConfig",
    "DedupFilter",
    "DedupSignatures",
    "FindDuplicatePairs",
    "MinHasher",
    "MinhashConfig",
    "content_hash",
    "find_duplicate_stages",
    "normalize_url",
    "union_find",
    "url_hash",
]
