"""Quick start: low-rank matrix completion with geoopt's stock RiemannianSGD.

A rank-5 matrix of size 300 x 200 is observed on 30% of its entries. The unknown
is a ``geoopt.ManifoldParameter`` on ``FixedRankManifold(300, 200, 5)``, started
from the spectral estimate (the best rank-5 approximation of the zero-filled
observations over the sampling rate). The loss only touches the observed entries,
gathered from the factors, so no 300 x 200 matrix is formed during training.

Run:  python examples/quickstart.py [--seed 0] [--threads N]
      python examples/quickstart.py --smoke    # 100 x 80, rank 3, 40 steps (a crash test)
"""
import argparse
import time

import geoopt
import torch
from torch import nn

from lowrank_manifolds import FixedRankManifold

parser = argparse.ArgumentParser(description="low-rank matrix completion with RiemannianSGD")
parser.add_argument("--smoke", action="store_true", help="tiny problem, a few steps")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
# smoke: on the small problem the step 1 / rate diverges for some seeds, half of it does not
m, n, rank, steps, lr_scale = (100, 80, 3, 40, 0.5) if args.smoke else (300, 200, 5, 500, 1.0)

# ground truth and the observed entries
truth = torch.randn(m, rank, dtype=torch.float64) @ torch.randn(rank, n, dtype=torch.float64)
rate = 0.3
observed = torch.rand(m, n) < rate
rows, cols = observed.nonzero(as_tuple=True)
values = truth[rows, cols]


class Completion(nn.Module):
    def __init__(self):
        super().__init__()
        self.manifold = FixedRankManifold(m, n, rank)
        start = self.manifold.from_dense(torch.where(observed, truth, 0.0) / rate)
        self.x = geoopt.ManifoldParameter(start, manifold=self.manifold)

    def forward(self):
        u, s, v = self.manifold.unpack(self.x)
        predicted = ((u[rows] @ s) * v[cols]).sum(-1)  # entries (U S V^T)[i, j] only
        return 0.5 * ((predicted - values) ** 2).sum()


model = Completion()
optimizer = geoopt.optim.RiemannianSGD(model.parameters(), lr=lr_scale / rate)
start = time.perf_counter()
print(f"{'step':>5} {'loss':>12} {'relative error':>15}")
for step in range(1, steps + 1):
    optimizer.zero_grad()
    loss = model()
    loss.backward()
    optimizer.step()
    if step % 20 == 0 or step == 1:
        with torch.no_grad():
            err = (model.manifold.to_dense(model.x) - truth).norm() / truth.norm()
        print(f"{step:5d} {loss.item():12.4e} {err.item():15.3e}")
        if err < 1e-8:
            break
print(f"done in {time.perf_counter() - start:.1f} s; the point is still on the manifold:",
      model.manifold.check_point_on_manifold(model.x))
