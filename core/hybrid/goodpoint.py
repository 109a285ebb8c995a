"""The last good point the divergence monitor returns to: the trainable weights and AdamW's state, copied.

Taken when skipping begins (the weights are then full training's) and at every evaluation that is the best since;
restored when a validation or re-measured loss says skipping went wrong. It rides in the engine's checkpoint state
(on the CPU), so a resumed run can roll back to the same point as an uninterrupted one. Its cost is three copies
of the trainable parameters (weights and the two moments), counted by ``core.memory.hybrid_copies``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class GoodPoint:
    step: int
    weights: list[torch.Tensor]  # one per trainable parameter, in the model's order
    optimizer: dict[int, dict[str, Any]]  # AdamW's state per trainable parameter index (absent: none yet)

    @classmethod
    def take(cls, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> GoodPoint:
        params = trainable(model)
        opt_state = {
            i: {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
            for i, p in enumerate(params)
            if (st := optimizer.state.get(p))
        }
        return cls(step, [p.detach().clone() for p in params], opt_state)

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for i, (p, w) in enumerate(zip(trainable(model), self.weights, strict=True)):
                p.copy_(w)
                saved = self.optimizer.get(i)
                if saved is None:
                    optimizer.state.pop(p, None)
                    continue
                live = optimizer.state[p]
                for k, v in saved.items():
                    if torch.is_tensor(v) and torch.is_tensor(live.get(k)):
                        live[k].copy_(v)
                    else:
                        live[k] = v.clone() if torch.is_tensor(v) else v

    def state_dict(self) -> dict[str, Any]:
        cpu = {
            i: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in st.items()} for i, st in self.optimizer.items()
        }
        return {"step": self.step, "weights": [w.cpu() for w in self.weights], "optimizer": cpu}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> GoodPoint:
        opt = {
            int(i): {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in st.items()}
            for i, st in state["optimizer"].items()
        }
        return cls(int(state["step"]), [w.to(device) for w in state["weights"]], opt)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
