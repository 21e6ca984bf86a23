"""Check a new low-rank integrator with one call from lowrank_manifolds.testing.

The toy integrator below is a BUG step that evaluates the field once, at Y0:
K = U S + h F V, L = V S^T + h F^T U, U1 = orth(K), V1 = orth(L), and the Galerkin
S-step S1 = (U1^T U) S (V^T V1) + h U1^T F V1. Subclassing ``Integrator`` gives it
validation and the ``step`` protocol; ``check_integrator`` measures orthonormality,
consistency, order and exactness. A second version with a bug (no
re-orthonormalisation) shows what a failing report looks like.

Run:  python examples/check_my_integrator.py [--seed 0] [--threads 1]
      python examples/check_my_integrator.py --smoke    # smaller problems (10 x 8, rank 2)
"""
import argparse

import torch

from lowrank_manifolds.integrators import BUG, Integrator, ambient_left, ambient_right
from lowrank_manifolds.testing import check_integrator


class SingleEvaluationBUG(Integrator):
    """BUG with every substep using F(Y0): one field evaluation per step."""

    name = "single-evaluation BUG"

    def _step(self, U, S, V, field, h, t):
        z = self._evaluate(field, U, S, V, t)
        U1, _ = torch.linalg.qr(U @ S + h * ambient_right(z, V))
        V1, _ = torch.linalg.qr(V @ S.mT + h * ambient_left(z, U))
        S1 = (U1.mT @ U) @ S @ (V.mT @ V1) + h * U1.mT @ ambient_right(z, V1)
        return U1, S1, V1


class ForgetfulEuler(Integrator):
    """Euler on the bases with a bug: they are not re-orthonormalised."""

    name = "forgetful Euler"

    def _step(self, U, S, V, field, h, t):
        z = self._evaluate(field, U, S, V, t)
        return U + h * ambient_right(z, V), S, V + h * ambient_left(z, U)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="check a new low-rank integrator")
    parser.add_argument("--smoke", action="store_true", help="smaller problems (10 x 8, rank 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the check's random problems")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = dict(m=10, n=8, rank=2) if args.smoke else {}
    for integrator, exact in ((BUG(), True), (SingleEvaluationBUG(), None), (ForgetfulEuler(), None)):
        report = check_integrator(integrator, exact=exact, seed=args.seed, **sizes)
        print(f"\n## {integrator.name}: {'passes' if report.passed else 'FAILS'}\n\n{report}")
