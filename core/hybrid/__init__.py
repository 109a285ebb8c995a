"""The hybrid-predict engine (issue 16): skip the passes of examples predicted learned, stop where the curve flattens.

Pure parts, each testable alone:
- ``selection``: the per-example loss table and Selective-Backprop's keep rule (by loss percentile, seeded);
- ``rows``: which example each position of a forward pass's loss belongs to (padded or packed rows);
- ``curve``: the validation-curve fit and the plateau stop rule;
- ``bandit``: LinUCB over keep shares, rewarded by validation progress per second;
- ``divergence``: when a re-measured or validation loss says skipping went wrong;
- ``phases``: the state machine warmup -> full -> predict <-> correct (-> plain after a rollback);
- ``goodpoint``: the weights and AdamW state a rollback returns to;
- ``engine``: ``HybridEngine``, the hooks ``core.train.Trainer`` calls when ``engine = "hybrid"``.
Its settings are ``trainbox.config.HybridConfig`` (``[training.hybrid]``), re-exported here.
"""

from core.hybrid.engine import HybridEngine
from trainbox.config import HybridConfig

__all__ = ["HybridConfig", "HybridEngine"]
