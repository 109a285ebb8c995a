"""LinUCB (disjoint arms, Li et al. 2010) choosing how aggressive the engine is: the share of examples kept.

Each arm is a keep share. The context says where training is (a bias and the share of the run done); the reward
is the validation progress per unit of cost over the interval the arm ran (between two evaluations), relative to
the progress rate of full steps measured before skipping began. Each arm keeps ``A = ridge I + sum x x^T`` and
``b = sum r x``; it is chosen by ``theta^T x + alpha sqrt(x^T A^-1 x)`` with ``theta = A^-1 b``.
Plain numpy in float64; the state is lists, so it goes into a checkpoint as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class LinUCB:
    def __init__(self, arms: Sequence[float], dim: int, alpha: float = 0.5, ridge: float = 1.0) -> None:
        if not arms:
            raise ValueError("LinUCB needs at least one arm")
        self.arms = [float(a) for a in arms]
        self.dim, self.alpha, self.ridge = dim, alpha, ridge
        self.A = [np.eye(dim) * ridge for _ in self.arms]
        self.b = [np.zeros(dim) for _ in self.arms]
        self.pulls = [0 for _ in self.arms]

    def scores(self, context: Sequence[float]) -> list[float]:
        x = self._x(context)
        out = []
        for A, b in zip(self.A, self.b, strict=True):
            inv = np.linalg.inv(A)
            theta = inv @ b
            out.append(float(theta @ x + self.alpha * np.sqrt(max(float(x @ inv @ x), 0.0))))
        return out

    def choose(self, context: Sequence[float]) -> int:
        """Each arm once, in order (list the safest first), then the highest upper confidence bound: an arm never
        pulled has no estimate, and its bonus alone can lose to a pulled arm's mean, so it would never be tried."""
        for arm, pulls in enumerate(self.pulls):
            if pulls == 0:
                return arm
        s = self.scores(context)
        return int(np.argmax(s))  # ties: the first arm

    def update(self, arm: int, context: Sequence[float], reward: float) -> None:
        x = self._x(context)
        self.A[arm] += np.outer(x, x)
        self.b[arm] += reward * x
        self.pulls[arm] += 1

    def expected(self, arm: int, context: Sequence[float]) -> float:
        """The arm's mean reward estimate (no exploration bonus)."""
        x = self._x(context)
        return float(np.linalg.solve(self.A[arm], self.b[arm]) @ x)

    def _x(self, context: Sequence[float]) -> np.ndarray:
        x = np.asarray(context, dtype=np.float64)
        if x.shape != (self.dim,):
            raise ValueError(f"context has shape {x.shape}, expected ({self.dim},)")
        return x

    def state_dict(self) -> dict[str, Any]:
        return {
            "arms": list(self.arms),
            "dim": self.dim,
            "alpha": self.alpha,
            "ridge": self.ridge,
            "A": [a.tolist() for a in self.A],
            "b": [v.tolist() for v in self.b],
            "pulls": list(self.pulls),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.arms = [float(a) for a in state["arms"]]
        self.dim, self.alpha, self.ridge = int(state["dim"]), float(state["alpha"]), float(state["ridge"])
        self.A = [np.asarray(a, dtype=np.float64) for a in state["A"]]
        self.b = [np.asarray(v, dtype=np.float64) for v in state["b"]]
        self.pulls = [int(p) for p in state["pulls"]]
