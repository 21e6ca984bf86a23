"""Benchmark FixedRankManifold against pymanopt's FixedRankEmbedded (float64).

    python benchmarks/bench_manifold.py [--quick] [--sizes 500,500,5 8000,8000,64]
                                        [--threads 1] [--device cpu|cuda]

Every op is first checked for numerical agreement on the same data (the max
abs difference of the resulting dense m x n matrices where those fit, m, n <=
4000; above that the Frobenius norm of the difference, computed in factored
form, which bounds the max abs difference), then timed interleaved with its
pymanopt counterpart (see ``_timing.compare``). Results go to
``benchmarks/results/manifold.{json,md}``.

What each side receives
-----------------------
* point: ours the packed ``[U; S; V]`` (S diagonal); pymanopt ``(u, s, vt)``
  with ``s`` a vector; both C-contiguous float64, same numbers.
* tangent vector: ours packed ``[Up; M; Vp]``; pymanopt ``(Up, M, Vp)``.
* ``proj_dense``: both a dense m x n ``Z`` (the same memory: ``torch.from_numpy``).
* ``proj_lowrank``: ours ``(A, B)`` meaning ``A B^T`` (k = 2r columns); pymanopt's
  own factored input ``(A, I_k, B)`` -- which it multiplies left to right, so it
  builds the dense m x n matrix anyway.
* ``egrad2rgrad``: both the gradient with respect to their factors (what autograd
  gives), computed beforehand from one dense ``G``: ours ``[dU; dS; dV]`` with
  ``dU = G V S^T``, ``dS = U^T G V`` (r x r), ``dV = G^T U S``; pymanopt
  ``(du, ds, dvt)`` with ``du = G V diag(s)``, ``ds = diag(U^T G V)`` (a vector,
  since its ``s`` is a vector), ``dvt = diag(s) U^T G``. Neither sees ``G``.
  Both must return ``P_X(G)``; the diff column compares with ``proj_dense(G)``.
* ``retr``: metric-projection retraction of a tangent vector (both).
* ``retr_orthographic``: extra row, our orthographic retraction (QRs of m x r and
  n x r, like pymanopt's QR of Up alone) against pymanopt's metric retraction:
  a different (also second-order) map, so no diff column.
* ``transp``: projection transport from X to Y = retr(X, xi) (pymanopt
  multiplies its (m x 2r)(2r x 2r)(2r x n) embedding out to a dense m x n).
* ``proju``: extra row, against pymanopt's ``to_tangent_space`` on a packed
  vector that violates the gauge conditions. Not the same map: ours moves the
  normal parts of Up, Vp into M (keeping the ambient matrix), pymanopt discards
  them; the diff column compares the Up and Vp blocks only. pymanopt evaluates
  ``u @ u.T @ Up`` left to right, an m x m temporary.
* ``kernel U (U^T A)``, ``kernel qr(m x 2r)``: not pymanopt, the backends. The same
  product chain (``A`` m x r) and the same QR, called from torch and from numpy on
  the same data: the ratio the BLAS / LAPACK libraries alone give (torch's CPU build
  links MKL, numpy's wheel OpenBLAS), against which the op rows can be read.
* ``inner``, ``random``: as named (``random`` has no diff: different RNGs; the
  orthonormality error of both outputs is recorded instead).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

DEFAULT_SIZES = [(500, 500, 5), (1000, 1000, 10), (2000, 2000, 16), (4000, 1000, 16),
                 (4000, 4000, 32), (8000, 8000, 64)]
QUICK_SIZES = [(500, 500, 5), (1000, 1000, 10)]
DENSE_CHECK_MAX = 4000          # dense m x n comparison up to this m, n
MEM_LIMIT_BYTES = 2 * 1024**3   # skip pymanopt ops whose dense temporaries exceed this


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, short budgets (< 1 min)")
    p.add_argument("--sizes", nargs="+", default=None,
                   help="sizes as m,n,r (e.g. 500,500,5 4000,4000,32)")
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP/torch threads (default 1)")
    p.add_argument("--device", default="cpu", help="device for our ops: cpu or cuda (pymanopt is numpy, CPU)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per op and size")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="output folder")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    _timing.set_threads_env(args.threads)

    import numpy as np
    import torch
    import pymanopt
    from pymanopt.manifolds import FixedRankEmbedded
    from pymanopt.manifolds.fixed_rank import _FixedRankPoint, _FixedRankTangentVector

    from lowrank_manifolds import FixedRankManifold

    _timing.apply_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dev = torch.device(args.device)
    sync = _timing.make_sync(args.device)
    if args.sizes:
        sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes]
    else:
        sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    budget = args.budget if args.budget is not None else (0.4 if args.quick else 2.0)
    f64 = torch.float64

    def to_np(t):
        return np.ascontiguousarray(t.detach().cpu().numpy())

    def their_point(mf, x):
        u, s, v = mf.unpack(x)
        return _FixedRankPoint(to_np(u), to_np(torch.diagonal(s)), to_np(v.mT))

    def their_tangent(mf, t):
        up, mm, vp = mf.unpack(t)
        return _FixedRankTangentVector(to_np(up), to_np(mm), to_np(vp))

    # ---- independent (numpy) references for the agreement checks
    def fro_lowrank(a, b):
        """||A B^T||_F without forming it: R_A R_B^T from two QRs."""
        ra = np.linalg.qr(a, mode="r")
        rb = np.linalg.qr(b, mode="r")
        return float(np.linalg.norm(ra @ rb.T))

    def tangent_factors(u, vt, t):
        up, mm, vp = t
        return np.hstack([u @ mm + up, u]), np.hstack([vt.T, vp])

    def diff_tangent(pt, t1, t2, dense):
        d = [a - b for a, b in zip(t1, t2)]
        a, b = tangent_factors(pt[0], pt[2], d)
        if dense:
            return float(np.abs(a @ b.T).max())
        return fro_lowrank(a, b)

    def diff_point(p1, p2, dense):
        a = np.hstack([p1[0] * p1[1], -p2[0] * p2[1]])
        b = np.hstack([p1[2].T, p2[2].T])
        if dense:
            return float(np.abs(a @ b.T).max())
        return fro_lowrank(a, b)

    def ortho_err(q):
        return float(np.abs(q.T @ q - np.eye(q.shape[1])).max())

    rows = []
    results = {"sizes": []}
    for (m, n, r) in sizes:
        print(f"== m={m} n={n} r={r}", flush=True)
        mf = FixedRankManifold(m, n, r)
        mf_ortho = FixedRankManifold(m, n, r, retraction="orthographic")
        man = FixedRankEmbedded(m, n, r)
        dense = max(m, n) <= DENSE_CHECK_MAX
        dense_ok = m * n * 8 <= MEM_LIMIT_BYTES
        x = mf.random(dtype=f64, device=dev).as_subclass(torch.Tensor)
        xi = mf.random_tangent(x)
        eta = mf.random_tangent(x)
        y = mf.retr(x, xi)
        pt, pty = their_point(mf, x), their_point(mf, y)
        xi_t, eta_t = their_tangent(mf, xi), their_tangent(mf, eta)
        k = 2 * r
        a_lr = torch.randn(m, k, dtype=f64, device=dev)
        b_lr = torch.randn(n, k, dtype=f64, device=dev)
        a_np, b_np = to_np(a_lr), to_np(b_lr)
        eye_k = np.eye(k)
        u, s, v = mf.unpack(x)
        if dense_ok:
            z_np = np.random.standard_normal((m, n))
            z = torch.from_numpy(z_np).to(dev)
            zv, ztu = z @ v, z.mT @ u
        else:  # gradient data from a low-rank G (only G V and G^T U matter)
            z_np = z = None
            zv, ztu = a_lr @ (b_lr.mT @ v), b_lr @ (a_lr.mT @ u)
        # factored Euclidean gradients (what autograd would hand over)
        g_ours = torch.cat([zv @ s.mT, u.mT @ zv, ztu @ s], dim=-2)
        sv = torch.diagonal(s)
        g_theirs = (to_np(zv * sv), to_np(torch.diagonal(u.mT @ zv)), to_np((ztu * sv).mT))
        ref_grad = their_tangent(mf, mf._proj_from_products(u, v, zv, ztu))
        nonTangent = torch.randn(m + r + n, r, dtype=f64, device=dev)
        nonTangent_t = their_tangent(mf, nonTangent)

        ops = {}
        # name: (ours, theirs, theirs_dense_bytes, check)
        ops["proj_dense"] = (
            (lambda: mf.proj_dense(x, z)) if dense_ok else None,
            (lambda: man.projection(pt, z_np)) if dense_ok else None,
            0,
            lambda o, t: diff_tangent(pt, their_tangent(mf, o), t, dense),
        )
        ops["proj_lowrank"] = (
            lambda: mf.proj_lowrank(x, a_lr, b_lr),
            lambda: man.projection(pt, (a_np, eye_k, b_np)),
            m * n * 8,
            lambda o, t: diff_tangent(pt, their_tangent(mf, o), t, dense),
        )
        ops["egrad2rgrad"] = (
            lambda: mf.egrad2rgrad(x, g_ours),
            lambda: man.euclidean_to_riemannian_gradient(pt, g_theirs),
            0,
            lambda o, t: max(diff_tangent(pt, their_tangent(mf, o), ref_grad, dense),
                             diff_tangent(pt, t, ref_grad, dense)),
        )
        ops["retr"] = (
            lambda: mf.retr(x, xi),
            lambda: man.retraction(pt, xi_t),
            0,
            lambda o, t: diff_point(their_point(mf, o), t, dense),
        )
        ops["retr_orthographic"] = (
            lambda: mf_ortho.retr(x, xi),
            lambda: man.retraction(pt, xi_t),
            0,
            None,
        )
        ops["transp"] = (
            lambda: mf.transp(x, y, eta),
            lambda: man.transport(pt, pty, eta_t),
            m * n * 8,
            lambda o, t: diff_tangent(pty, their_tangent(mf, o), t, dense),
        )
        ops["proju"] = (
            lambda: mf.proju(x, nonTangent),
            lambda: man.to_tangent_space(pt, nonTangent_t),
            max(m, n) ** 2 * 8,
            lambda o, t: max(float(np.abs(to_np(mf.unpack(o)[0]) - t[0]).max()),
                             float(np.abs(to_np(mf.unpack(o)[2]) - t[2]).max())),
        )
        ops["inner"] = (
            lambda: mf.inner(x, xi, eta),
            lambda: man.inner_product(pt, xi_t, eta_t),
            0,
            lambda o, t: abs(float(o) - float(t)),
        )
        ops["random"] = (
            lambda: mf.random(dtype=f64, device=dev),
            lambda: man.random_point(),
            0,
            None,
        )
        # The backends themselves: the same BLAS / LAPACK call from torch (MKL on the CPU
        # build) and numpy (OpenBLAS), on the same data. A gap here is not ours to close.
        up_np = to_np(mf.unpack(xi)[0])
        u_np, ua_np = to_np(u), np.ascontiguousarray(np.hstack([to_np(u), up_np]))
        ua = torch.from_numpy(ua_np).to(dev)
        up_t = mf.unpack(xi)[0]
        ops["kernel U (U^T A)"] = (
            lambda: u @ (u.mT @ up_t),
            lambda: u_np @ (u_np.T @ up_np),
            0,
            lambda o, t: float(np.abs(to_np(o) - t).max()),
        )
        ops["kernel qr(m x 2r)"] = (
            lambda: torch.linalg.qr(ua),
            lambda: np.linalg.qr(ua_np),
            0,
            lambda o, t: float(np.abs(np.abs(to_np(o[1])) - np.abs(t[1])).max()),
        )
        size_res = {"m": m, "n": n, "r": r, "ops": {}}
        for name, (ours, theirs, tbytes, check) in ops.items():
            rec = {"theirs_dense_temp_bytes": tbytes}
            if ours is None:
                rec["skipped"] = f"dense {m}x{n} input exceeds {MEM_LIMIT_BYTES / 2**30:.0f} GiB"
                size_res["ops"][name] = rec
                rows.append((name, (m, n, r), None, None, None, None, "skipped (dense input > 2 GiB)"))
                print(f"  {name:13s} skipped", flush=True)
                continue
            skip_theirs = tbytes > MEM_LIMIT_BYTES
            o = ours()
            sync()
            note = ""
            if not skip_theirs:
                t = theirs()
                if name == "retr_orthographic":  # a different map: no diff, check the output
                    rec["ortho_err_ours"] = max(ortho_err(to_np(mf.unpack(o)[0])), ortho_err(to_np(mf.unpack(o)[2])))
                elif check is not None:
                    rec["max_diff"] = check(o, t)
                    rec["diff_kind"] = "max abs (dense)" if (dense or name in ("inner", "proju")) \
                        else "Frobenius (factored)"
                else:
                    rec["ortho_err_ours"] = max(ortho_err(to_np(mf.unpack(o)[0])), ortho_err(to_np(mf.unpack(o)[2])))
                    rec["ortho_err_theirs"] = max(ortho_err(t[0]), ortho_err(t[2].T))
                del t
                res = _timing.compare({"ours": ours, "theirs": theirs}, budget_s=budget,
                                      syncs={"ours": sync, "theirs": lambda: None})
                rec.update(res)
                rec["ratio_theirs_over_ours"] = res["paired_ratio"]["theirs"]
            else:
                note = f"pymanopt skipped: dense temporaries {tbytes / 2**30:.1f} GiB"
                rec["skipped_theirs"] = note
                res = _timing.compare({"ours": ours}, budget_s=budget / 2, syncs={"ours": sync})
                rec.update(res)
            del o
            size_res["ops"][name] = rec
            if tbytes and not skip_theirs:
                note = f"pymanopt allocates {tbytes / 2**20:.0f} MiB dense"
            if name == "retr_orthographic":
                note = ("ours: orthographic retraction (QRs of m x r, n x r) vs their metric one; "
                        f"no diff (different map); ortho err ours {rec.get('ortho_err_ours', 0):.0e}")
            if name == "random":
                note = f"ortho err ours {rec.get('ortho_err_ours', 0):.0e}, theirs {rec.get('ortho_err_theirs', 0):.0e}"
            ours_s = rec["median_s"]["ours"]
            theirs_s = rec["median_s"].get("theirs")
            rows.append((name, (m, n, r), ours_s, theirs_s, rec.get("ratio_theirs_over_ours"),
                         rec.get("max_diff"), note))
            print(f"  {name:13s} ours {_timing.fmt_ms(ours_s):>8s} ms  theirs {_timing.fmt_ms(theirs_s):>8s} ms"
                  f"  ratio {rec.get('ratio_theirs_over_ours', float('nan')):7.2f}"
                  f"  diff {rec.get('max_diff', float('nan')):.1e}  load {rec['loadavg_after']}", flush=True)
        results["sizes"].append(size_res)
        del z, z_np

    info = _timing.machine_info(args.threads, {"device": str(dev), "quick": args.quick,
                                               "budget_s_per_op": budget})
    info["versions"]["pymanopt"] = pymanopt.__version__
    results["machine"] = info
    os.makedirs(args.out, exist_ok=True)
    _timing.write_json(os.path.join(args.out, "manifold.json"), results)
    md = render_md(rows, info)
    with open(os.path.join(args.out, "manifold.md"), "w") as fh:
        fh.write(md)
    print(md)


def render_md(rows, info):
    v = info["versions"]
    lines = [
        "# FixedRankManifold vs pymanopt FixedRankEmbedded (float64)",
        "",
        f"Generated by `python benchmarks/bench_manifold.py{' --quick' if info.get('quick') else ''}` "
        f"on {info.get('cpu_model', info['processor'])}, {info['cpu_count']} CPUs, "
        f"{info['threads']} thread(s), device {info['device']}; torch {v.get('torch')}, "
        f"numpy {v.get('numpy')}, pymanopt {v.get('pymanopt')}; load average at the end {info['loadavg']}; "
        f"{info['time']}.",
        "",
        "Times are medians of interleaved repeats; **ratio = theirs / ours**, the median of the "
        "per-round paired ratios (> 1: we are faster). Max diff: max abs difference of the dense "
        "results for m, n <= 4000, Frobenius norm of the difference (factored) above.",
        "",
        "| op | m x n, r | ours ms | theirs ms | ratio theirs/ours | max diff | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, (m, n, r), o, t, ratio, diff, note in rows:
        lines.append(
            f"| {name} | {m}x{n}, {r} | {_timing.fmt_ms(o)} | {_timing.fmt_ms(t)} | "
            f"{'—' if ratio is None else f'{ratio:.2f}'} | {'—' if diff is None else f'{diff:.1e}'} | {note} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
