"""Content keys of stored results: what a cached trace or a stored setting was computed
from, so a rerun reuses exactly what still holds and recomputes the rest.

    content_hash("live", fingerprint, ..., requests_hash(taskset, task))
    source_hash("threshold", dirs)   # the strategy file's bytes
"""

from __future__ import annotations

import hashlib
import json
import re


def content_hash(*parts) -> str:
    """A short digest of JSON-able parts (anything else by its text)."""
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(),
                           digest_size=10).hexdigest()


def _stable(o) -> str:
    """Functions by name, never by address: a rerun must find its settings."""
    name = getattr(o, "__qualname__", None)
    return f"{getattr(o, '__module__', '')}.{name}" if name else re.sub(r" at 0x[0-9a-f]+", "", str(o))


def requests_hash(taskset, task: str) -> str:
    """What a stored result of `task` was computed and scored from: the requests lm-eval
    builds (contexts with their few-shot examples and chat rendering, generation
    arguments), each request's document (its answer) and the task's config (metrics,
    filters, targets). Made once per task set."""
    from ouro_lab.scoring import scorer_for

    memo = taskset.request_keys
    if task not in memo:
        config = dict(taskset.tasks[task].dump_config())
        # where the files are (paths, a cache named by their mtimes) is not what they hold:
        # the documents below are; a moved checkout or a re-downloaded copy keeps its key
        config.pop("dataset_path", None)
        config["dataset_kwargs"] = {k: v for k, v in (config.get("dataset_kwargs") or {}).items()
                                    if k not in ("cache_dir", "data_files", "data_dir")}
        config["metadata"] = {k: v for k, v in (config.get("metadata") or {}).items() if k != "config_source"}
        config = json.dumps(config, sort_keys=True, default=_stable)
        # the requests a Scorer already built (the trace pass's, every loglikelihood task), else its own
        scorer = next((sc for names, sc in taskset.scorers.items() if task in names), None)
        scorer = scorer or scorer_for(taskset, [task])
        memo[task] = content_hash(config, [(i.doc_id, i.idx, i.request_type, repr(i.arguments), repr(i.doc))
                                           for i in scorer.instances[task]])
    return memo[task]


def source_hash(name: str, dirs) -> str:
    """The digest of strategy `name`'s file (its name where it has no file)."""
    from ouro_lab.registry import discover

    info = discover(dirs).get(name)
    if info is None or info.path is None:
        return name
    return hashlib.blake2b(info.path.read_bytes(), digest_size=8).hexdigest()
