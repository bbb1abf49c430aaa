"""Hand-made cost tables and workloads for the simulator tests."""

from rlhfspec.sim import AcceptanceProfile, Cluster, TableCost, Workload

BATCHES = (1, 2, 4, 8, 16, 32, 64)
QS = (1, 3, 5, 9)


def table_cost(f, draft=lambda b, n: 1e-4 * n):
    """A TableCost with verify(B, q) = f(B, q) and a "draft" drafter costing draft(B, n)."""
    return TableCost({(b, q): f(b, q) for b in BATCHES for q in QS}, {"draft": {(b, n): draft(b, n) for b in BATCHES for n in (1, 8)}})


def workload(lengths, prompt_len=16, cap=None, acceptance="draft=0.8", seed=0):
    return Workload([prompt_len] * len(lengths), list(lengths), cap or max(lengths), AcceptanceProfile.parse(acceptance, seed))


def cluster(k=1, batch=64, **kw):
    return Cluster(k, batch, **kw)
