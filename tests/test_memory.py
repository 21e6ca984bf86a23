"""No factored operation may allocate an m x n matrix."""
import subprocess
import sys
import textwrap

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank_manifolds import FixedRankManifold

M = N = 20000
R = 8


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any dense tensor an aten op returns (a sparse
    tensor's ``numel`` is its dense size, not what it stores: its parts are counted instead)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.largest = max(self.largest, t.numel())
        return out


def factored_calls(mf, x, v):
    """Every factored operation once; the ambient matrices are rank-2 factor pairs."""
    a = torch.randn(mf.m, 2, dtype=x.dtype)
    b = torch.randn(mf.n, 2, dtype=x.dtype)
    y = mf.retr(x, v)
    mf.transp(x, y, v)
    mf.retr_transp(x, v, v)
    mf.proju(x, v)
    mf.egrad2rgrad(x, v)
    mf.inner(x, v, v)
    mf.projx(x)
    mf.proj_lowrank(x, a, b)
    mf.ehess2rhess(x, (a, b), (a[:, :1], b[:, :1]), v)
    return y


def test_no_operation_creates_an_m_by_n_tensor():
    mf = FixedRankManifold(M, N, R)
    x = mf.random(dtype=torch.float64)
    v = mf.proju(x, torch.randn_like(x))
    with LargestTensor() as probe:
        factored_calls(mf, x, v)
    # the largest intermediate is a (m + n + r) x 2r block, not m x n
    assert probe.largest <= 4 * (M + N + R) * R
    assert probe.largest < M * N / 1000


def test_peak_memory_is_far_below_one_dense_matrix():
    """Peak resident memory of the factored calls at 20000 x 20000, rank 8, against the
    3.2 GB that one dense float64 matrix of that size takes (measured in a fresh process)."""
    script = textwrap.dedent(
        f"""
        import resource, sys, torch
        sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
        from test_memory import factored_calls
        from lowrank_manifolds import FixedRankManifold
        torch.set_num_threads(1)
        mf = FixedRankManifold({M}, {N}, {R})
        x = mf.random(dtype=torch.float64)
        v = mf.proju(x, torch.randn_like(x))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(3):
            factored_calls(mf, x, v)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    dense_bytes = M * N * 8
    assert growth < dense_bytes / 50, f"peak memory grew by {growth / 1e6:.0f} MB"
