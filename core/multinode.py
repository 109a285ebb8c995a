"""``python -m core.multinode [torchrun arguments]``: torchrun whose c10d rendezvous puts the claiming host at
node rank 0, for a job that spans hosts (``training.nnodes > 1``).

Why: torch's c10d rendezvous numbers the nodes of a round by sorting their descriptors, (address, agent pid,
counter), where the address is ``--local-addr`` or the host's FQDN
(``dynamic_rendezvous._mark_rendezvous_complete``: ``sorted(state.participants)``); the agents then give node
``g`` the global ranks ``g * nproc ..``. So which host gets global rank 0 is an accident of host names (of pids,
on one machine), and ``--node-rank`` is ignored by every backend but ``static`` (pytorch/pytorch#99684 asks
for rank 0 on a chosen node; still open). trainbox needs rank 0 on the host that claimed the job: rank 0 writes
the status file its daemon's watchdog reads (naming that daemon's child, the agent, as its pid), result.json,
checkpoints and DB rows, and takes the run folder's lock for its host.

How: the backend ``trainbox-c10d`` is c10d's own handler (the same TCP store at ``--rdzv-endpoint``, heartbeats,
timeouts and shared worker store), wrapped so that ``next_rendezvous`` rotates the node ranks: the node started
with ``--rdzv-conf is_host=1`` (the claiming host, which also hosts the rendezvous store) publishes its c10d
rank in the round's store, every node reads it and subtracts it modulo the number of nodes. The store address
the workers use (MASTER_ADDR) was already agreed through the store, so it stays valid. The ``static`` backend
would give the ranks directly but makes every joining host know its node rank in advance; with the rotation a
joining host needs only the endpoint and the job's id.
"""

from __future__ import annotations

import sys

from torch.distributed import Store
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    rendezvous_handler_registry,
)
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

BACKEND = "trainbox-c10d"
CLAIM_KEY = "trainbox/claiming_node_rank"


class TwoClaimingNodes(RuntimeError):
    """Two nodes of one rendezvous were started as the claiming host: node ranks would collide."""


def rotated(rank: int, claiming: int, world: int) -> int:
    """The node rank of c10d's node ``rank`` once the claiming node (c10d's ``claiming``) is node 0."""
    return (rank - claiming) % world


def claiming_rank(store: Store, rank: int, is_host: bool) -> int:
    """The claiming node's c10d rank in this round: published by that node (once: a second claimer raises),
    read by the others (waiting up to the store's read timeout for it)."""
    if is_host:
        got = store.compare_set(CLAIM_KEY, "", str(rank)).decode()
        if got != str(rank):
            raise TwoClaimingNodes(f"node {got} already claimed this job's rendezvous; this node is {rank}")
        return rank
    return int(store.get(CLAIM_KEY).decode())


class ClaimingHostFirst(RendezvousHandler):
    """c10d's rendezvous handler with the claiming host as node rank 0 (module docstring)."""

    def __init__(self, inner: RendezvousHandler, is_host: bool) -> None:
        self.inner, self.is_host = inner, is_host

    def next_rendezvous(self) -> RendezvousInfo:
        info = self.inner.next_rendezvous()
        claiming = claiming_rank(info.store, info.rank, self.is_host)
        rank = rotated(info.rank, claiming, info.world_size)
        print(  # one line in the agent's log (the worker log) for whoever wonders where rank 0 went
            f"{BACKEND}: c10d made this node {info.rank} of {info.world_size}; node {rank} with the claiming host "
            f"(c10d's node {claiming}) first",
            file=sys.stderr,
            flush=True,
        )
        store_info = info.bootstrap_store_info
        assert store_info is not None  # c10d's handler always gives one
        return RendezvousInfo(info.store, rank, info.world_size, store_info)

    def get_backend(self) -> str:
        return BACKEND

    @property
    def use_agent_store(self) -> bool:
        return self.inner.use_agent_store

    def is_closed(self) -> bool:
        return self.inner.is_closed()

    def set_closed(self) -> None:
        self.inner.set_closed()

    def num_nodes_waiting(self) -> int:
        return self.inner.num_nodes_waiting()

    def get_run_id(self) -> str:
        return self.inner.get_run_id()

    def shutdown(self) -> bool:
        return self.inner.shutdown()


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    """The registry's creator for ``trainbox-c10d``: c10d's handler for the same parameters, wrapped."""
    c10d = RendezvousParameters(
        "c10d", params.endpoint, params.run_id, params.min_nodes, params.max_nodes, params.local_addr, **params.config
    )
    return ClaimingHostFirst(get_rendezvous_handler(c10d), bool(params.get_as_bool("is_host", False)))


def main(argv: list[str] | None = None) -> None:
    from torch.distributed import run

    rendezvous_handler_registry.register(BACKEND, create_handler)
    run.main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
