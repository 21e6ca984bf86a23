"""One rank of the DDP tests in ``tests/test_distributed.py``; not a test module.

    python tests/_ddp_worker.py RANK WORLD PORT OUT_DIR CASE [CASE ...]

For each case (an optimizer on a small float64 model, see ``CASES``) the rank trains
the model wrapped in ``DistributedDataParallel`` (gloo, ``tcp://127.0.0.1:PORT``) on
its share of every batch, recording the active rank of each low-rank layer after every
step, and saves the final parameters. Rank 0 first trains, before the process group
exists, the same model (same seed, same initial weights) in one process on the union of
the ranks' batches: the reference. Everything goes to ``OUT_DIR/rank{RANK}.pt``:
``{case: {"params", "ranks", "reference_params", "reference_ranks", "init_params",
"seconds"}}`` (the reference entries on rank 0 only).

Each rank's loss is the mean over its own rows: DDP averages the ranks' gradients, so
the averaged gradient is the gradient of the mean over the union batch, the reference's
loss.
"""
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import geoopt
from torch import nn

from lowrank_manifolds.nn import LowRankLinear
from lowrank_manifolds.optim import DLRT, GeometricAdam, GeometricSGD, LoRAPreAdam

F64 = torch.float64
D_IN, D_OUT = 6, 3
UNION_BATCH = 16
STEPS = 20
TIMEOUT = timedelta(seconds=30)


RANK_TOL = 0.42  # our optimizers' truncation on the capacity layer: rank 6 -> 5 -> 4 -> 3 here


def lowrank_model():
    """Linear -> LowRankLinear (capacity 6, starting at rank 6, manifold tol 0.5: stock
    geoopt drops it to 3 in the first steps) -> ReLU -> LowRankLinear (fixed rank 2)."""
    return nn.Sequential(
        nn.Linear(D_IN, 16, dtype=F64),
        LowRankLinear(16, 12, rank=6, max_rank=6, tol=0.5, dtype=F64),
        nn.ReLU(),
        LowRankLinear(12, D_OUT, rank=2, dtype=F64),
    )


def dense_model():
    return nn.Sequential(nn.Linear(D_IN, 16, dtype=F64), nn.Linear(16, 12, dtype=F64), nn.ReLU(),
                         nn.Linear(12, D_OUT, dtype=F64))


def groups(model, tol, **other_options):
    """Parameter groups: the capacity layer's weight with its own ``tol``, the fixed-rank
    weight, every other parameter (with ``other_options``)."""
    capacity, fixed = model[1].weight, model[3].weight
    other = [p for p in model.parameters() if p is not capacity and p is not fixed]
    return [{"params": [capacity], "tol": tol}, {"params": [fixed]}, {"params": other, **other_options}]


def dlrt(model, recorder_of=None):
    return DLRT(groups(model, RANK_TOL, lr=0.05), lr=0.5, integrator="abc-psi", model=recorder_of)


# case -> (model factory, optimizer factory(plain model, model as given to the optimizer's model=))
CASES = {
    "geoopt RiemannianSGD": (lowrank_model, lambda m, w: geoopt.optim.RiemannianSGD(m.parameters(), lr=0.1)),
    "geoopt RiemannianAdam": (lowrank_model, lambda m, w: geoopt.optim.RiemannianAdam(m.parameters(), lr=0.02)),
    "GeometricSGD": (lowrank_model, lambda m, w: GeometricSGD(m.parameters(), lr=0.05, momentum=0.9)),
    "GeometricAdam": (lowrank_model, lambda m, w: GeometricAdam(m.parameters(), lr=0.02)),
    "GeometricAdam group tol": (lowrank_model, lambda m, w: GeometricAdam(groups(m, RANK_TOL), lr=0.02)),
    "DLRT without model=": (lowrank_model, lambda m, w: dlrt(m)),
    "LoRAPreAdam (dense model)": (dense_model, lambda m, w: LoRAPreAdam(m.parameters(), lr=0.02, rank=2)),
    "DLRT with model=": (lowrank_model, lambda m, w: dlrt(m, recorder_of=w)),
}


def batches():
    """The union batches, the same on every rank."""
    g = torch.Generator().manual_seed(1234)
    teacher = torch.randn(D_OUT, D_IN, generator=g, dtype=F64)
    for _ in range(STEPS):
        x = torch.randn(UNION_BATCH, D_IN, generator=g, dtype=F64)
        yield x, torch.tanh(x @ teacher.T)


def active_ranks(model):
    return [m.active_rank for m in model.modules() if isinstance(m, LowRankLinear)]


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train(case, rank, world):
    """Train ``case``: the DDP model when ``world`` is given, else the single-process
    reference on the union batch. Returns (initial params, final params, ranks per step)."""
    make_model, make_opt = CASES[case]
    torch.manual_seed(0)
    model = make_model()
    init = snapshot(model)
    net = model
    if world is not None:
        net = nn.parallel.DistributedDataParallel(model)
    opt = make_opt(model, net)
    loss_fn = nn.MSELoss()  # mean over the rows this process sees
    ranks = []
    for x, y in batches():
        if world is not None:
            rows = UNION_BATCH // world
            x, y = x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
        ranks.append(active_ranks(model))
    return init, snapshot(model), ranks


def main():
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    cases = sys.argv[5:]
    torch.set_num_threads(1)
    results = {case: {} for case in cases}
    if rank == 0:
        for case in cases:
            start = time.perf_counter()
            _, params, ranks = train(case, 0, None)
            results[case].update(reference_params=params, reference_ranks=ranks,
                                 reference_seconds=time.perf_counter() - start)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        for case in cases:
            start = time.perf_counter()
            init, params, ranks = train(case, rank, world)
            results[case].update(init_params=init, params=params, ranks=ranks,
                                 seconds=time.perf_counter() - start)
        dist.barrier()
    finally:  # after an error the other rank fails at its next collective (timeout above)
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
