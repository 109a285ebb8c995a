"""``<home>/cache/microbatch.json``: the micro-batch that worked for a (device, model, max_length).

Written when OOM back-off found a smaller micro-batch that trains; read at a job's first start so
the next job on the same model and length starts there instead of failing its way down again.
Best effort: a missing or unreadable file means "no hint".
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from trainbox.atomic import atomic_write_json, read_json

CACHE_FILE = "microbatch.json"
_SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)

log = logging.getLogger("core.worker")


def cache_key(device: str, model_config: Any, n_params: int, max_length: int, bf16: bool) -> str:
    """What decides a step's memory: the device, the model's shape, the precision and the length."""
    c = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    shape = {k: c.get(k) for k in _SHAPE_KEYS}
    digest = hashlib.sha256(json.dumps({**shape, "params": n_params}, sort_keys=True).encode()).hexdigest()[:12]
    return f"{device}|{c.get('model_type')}-{n_params}-{digest}|{'bf16' if bf16 else 'fp32'}|max_length={max_length}"


class MicroBatchCache:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _entries(self) -> dict[str, Any]:
        try:
            data = read_json(self.path)
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", self.path, e)
            return {}
        entries = data.get("entries") if isinstance(data, dict) else None
        return entries if isinstance(entries, dict) else {}

    def get(self, key: str) -> int | None:
        entry = self._entries().get(key)
        m = entry.get("micro_batch") if isinstance(entry, dict) else None
        return m if isinstance(m, int) and m >= 1 else None

    def record(self, key: str, micro_batch: int, **info: Any) -> None:
        try:
            entries = self._entries()
            entries[key] = {"micro_batch": micro_batch, "time": time.time(), **info}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"version": 1, "entries": entries})
        except OSError as e:  # a hint only; never a reason to fail a job
            log.warning("could not record micro-batch in %s: %s", self.path, e)


class MicroBatchMemory:
    """The cache seen from one job: where a fresh run starts (``start``), and, on rank 0, recording a smaller
    micro-batch once one trained (``worked``: the OOM back-off found it), so the next job on this device,
    model and length starts there instead of failing its way down again."""

    def __init__(self, cache: MicroBatchCache, key: str, writes: bool, **info: Any) -> None:
        self.cache, self.key, self.writes, self.info = cache, key, writes, info
        self.recorded = 0  # the micro-batch training started with, then the last one recorded

    def start(self, configured: int, estimated: int) -> tuple[int, str]:
        """(micro-batch, why): the smallest of the configured one, the memory estimate's and the cached one."""
        cached = self.cache.get(self.key)
        start = min(configured, estimated, cached or configured)
        why = "it worked before for this model and max_length" if start == cached else "the memory estimate"
        return start, why

    def worked(self, micro: int) -> None:
        if self.writes and micro != self.recorded:
            self.recorded = micro
            self.cache.record(self.key, micro, **self.info)
