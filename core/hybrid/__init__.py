"""The hybrid-predict engine (issue 3): plain training steps plus rare, verified weight-extrapolation jumps.

Pure parts, each testable alone:
- ``extrapolate``: per-parameter trajectory fits over recent weight snapshots (linear least squares,
  geometric/Aitken) and the snapshot ring buffer (``TrajectoryPredictor``);
- ``acceptance``: the probe-verification rule (accept a jump, how many steps it earned);
- ``bandit``: LinUCB over (horizon, scale) arms, rewarded by net steps saved;
- ``divergence``: NaN/Inf, loss and gradient-norm spikes, prediction error;
- ``phases``: the state machine warmup -> full -> predict -> correct (-> plain fallback);
- ``engine``: ``HybridEngine``, the hooks ``core.train.Trainer`` calls when ``engine = "hybrid"``.
Its settings are ``trainbox.config.HybridConfig`` (``[training.hybrid]``), re-exported here.
"""

from core.hybrid.engine import HybridEngine
from trainbox.config import HybridConfig

__all__ = ["HybridConfig", "HybridEngine"]
