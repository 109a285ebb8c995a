"""``training.compile``: ``torch.compile`` of the model where it pays, and never a failed job because of it.

- auto: on a GPU, on; on the CPU only when the job's estimated training time is ``CPU_PAYBACK`` times the
  compile time (measured here: the embedded model compiles in 38 s on one core with a cold cache, 10 s with
  a warm one, and trains an epoch of 600 texts in about 3 s: compiling would multiply a small job's time).
  The estimate is 6 FLOPs per parameter and trained token at ``CPU_FLOPS_PER_THREAD`` per torch thread.
  Not under sharding 'fsdp' (FSDP2's hooks and compile together are untested here).
- What is compiled is the module the loss calls: the body under the chunked loss (the fused head loss stays
  eager), else the whole model; in place (``Module.compile``), so ``save_pretrained``, peft and the checkpoint
  keys are unchanged.
- Shapes: dynamic from the first call, since packed rows vary in width and count; one compile instead of a
  static one followed by recompiles (measured: 38 s once, against 47 + 27 + 29 s with automatic dynamic).
- Artefacts: the home's ``cache/inductor`` (``TORCHINDUCTOR_CACHE_DIR``, set by the worker), so the next job
  of the same model finds its kernels.
- Failure: dynamo's ``suppress_errors`` runs any frame it cannot compile eagerly and logs a warning; graph
  breaks split the graph. Either way the job trains.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

log = logging.getLogger("core.compiling")

CPU_COMPILE_SECONDS = 40.0  # the embedded model, one core, cold cache; larger models take longer
CPU_PAYBACK = 10.0
CPU_FLOPS_PER_THREAD = 5e10  # above what training reaches on one core here (about 3.6e10): errs toward eager


def estimated_cpu_seconds(params: int, tokens: int, threads: int) -> float:
    """Training time on the CPU: 6 FLOPs per parameter and trained token."""
    return 6.0 * params * tokens / (CPU_FLOPS_PER_THREAD * max(threads, 1))


def decide(setting: bool | Literal["auto"], device_type: str, sharded: bool, cpu_seconds: float) -> tuple[bool, str]:
    """(compile, why not when auto says no: a line for the log, else '')."""
    if setting is not True and setting is not False:
        if sharded:
            return False, "compile off: not with sharding 'fsdp'"
        if device_type == "cpu" and cpu_seconds < CPU_PAYBACK * CPU_COMPILE_SECONDS:
            return False, (
                f"compile off: training is estimated at {cpu_seconds:.0f} s on the CPU, under {CPU_PAYBACK:g} "
                f"times the compile time (about {CPU_COMPILE_SECONDS:g} s)"
            )
        return True, ""
    return bool(setting), ""


def compile_in_place(module: torch.nn.Module) -> None:
    """Compile ``module`` for dynamic shapes; frames that fail to compile run eagerly (a logged warning)."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    module.compile(dynamic=True)
    log.info("compiling %s (torch.compile, dynamic shapes) at its first call", type(module).__name__)
