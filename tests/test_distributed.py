"""DistributedDataParallel with every optimizer: two gloo ranks on 127.0.0.1.

Two worker processes (``tests/_ddp_worker.py``) train a small float64 model wrapped in
``DistributedDataParallel`` for 20 steps, each rank on its half of every batch of 16
rows; rank 0 also trains the same model (same seed, same initial weights) in one process
on the union batch, the reference. For each optimizer:

* the two ranks' parameters are bitwise equal after training, and so are the active
  ranks of the low-rank layers after every step (every rank decision);
* DDP equals single-process training: max |W_ddp - W_single| <= 1e-10 over every
  parameter (packed factors included), with the same active ranks after every step;
* training moved the weights (max |W - W_init| > 1e-3) and, for the rank-adaptive
  cases (stock geoopt on the capacity layer's manifold tolerance, the group's ``tol`` for ours),
  changed the capacity layer's rank, so that equality means something.

Optimizers: stock ``geoopt.optim.RiemannianSGD`` and ``RiemannianAdam`` on the
manifold parameters, ``GeometricSGD``, ``GeometricAdam`` (without and with a group ``tol``
on the capacity layer), ``DLRT`` without ``model=`` (field from ``p.grad``),
``LoRAPreAdam`` on a dense model, and ``DLRT`` with ``model=`` (the recorder) in its own
pair of processes. One pair of processes runs all the others in sequence, to pay the
start-up once; each pair is bounded by a timeout (``RUN_TIMEOUT_S``) and the process
group by 30 s. Run with ``-s`` to see the measured figures.
"""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_ddp_worker.py")
RUN_TIMEOUT_S = 90
RECORDER = "DLRT with model="
CASES = [
    "geoopt RiemannianSGD",
    "geoopt RiemannianAdam",
    "GeometricSGD",
    "GeometricAdam",
    "GeometricAdam group tol",
    "DLRT without model=",
    "LoRAPreAdam (dense model)",
]
RANK_ADAPTIVE = {"geoopt RiemannianSGD", "geoopt RiemannianAdam", "GeometricAdam group tol", "DLRT without model=",
                 RECORDER}
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cases, out_dir, world=2):
    """Run the workers for ``cases``; return the per-rank results."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               MASTER_ADDR="127.0.0.1",
               PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(HERE), os.environ.get("PYTHONPATH")])))
    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, WORKER, str(r), str(world), port, str(out_dir), *cases],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    # wait for both; when one fails (or the time is up) stop the other at once
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline or any(p.returncode not in (None, 0) for p in procs):
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outputs = [p.communicate()[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            what = "was stopped" if p.returncode < 0 else f"exited with {p.returncode}"
            raise RuntimeError(f"DDP rank {r} {what} (timeout {RUN_TIMEOUT_S} s):\n{out[-6000:]}")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Results by case; each group of cases is spawned once, on first use."""
    cache = {}

    def get(case):
        group = [RECORDER] if case == RECORDER else CASES
        key = tuple(group)
        if key not in cache:
            try:
                cache[key] = spawn(group, tmp_path_factory.mktemp("ddp"))
            except RuntimeError as exc:  # remembered: the group's other cases fail at once
                cache[key] = exc
        if isinstance(cache[key], Exception):
            raise cache[key]
        return [per_rank[case] for per_rank in cache[key]]

    return get


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize(
    "case",
    CASES + [RECORDER],
)
def test_ddp_equals_single_process(case, runs):
    r0, r1 = runs(case)
    ranks_between = max_abs_diff(r0["params"], r1["params"])
    ddp_single = max_abs_diff(r0["params"], r0["reference_params"])
    moved = max_abs_diff(r0["params"], r0["init_params"])
    print(
        f"\n{case}: max|W0 - W1| = {ranks_between:.3g}, max|W_ddp - W_single| = {ddp_single:.3g}, "
        f"max|W - W_init| = {moved:.3g}, capacity layer's rank per step "
        f"{''.join(str(r[0]) for r in r0['ranks'] if r)} (single "
        f"{''.join(str(r[0]) for r in r0['reference_ranks'] if r)}), DDP {r0['seconds']:.2f} s"
    )
    assert moved > 1e-3, "the optimizer did not move the weights"
    if case in RANK_ADAPTIVE:
        assert len({ranks[0] for ranks in r0["reference_ranks"]}) > 1, "no rank decision was exercised"
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), f"{name} differs between the ranks"
    assert r0["ranks"] == r1["ranks"], "the ranks took different rank decisions"
    assert r0["ranks"] == r0["reference_ranks"], "DDP and single-process training took different rank decisions"
    assert ddp_single <= 1e-10


FSDP2_SCRIPT = """
import torch, torch.distributed as dist
from torch import nn
from lowrank_manifolds.nn import LowRankLinear
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
try:
    from torch.distributed.fsdp import fully_shard
    model = nn.Sequential(nn.Linear(8, 16), LowRankLinear(16, 16, rank=3), nn.Linear(16, 4))
    fully_shard(model)
    try:
        model(torch.randn(5, 8))
    except TypeError as err:
        print("REFUSED:", err)
    else:
        print("RAN")
finally:
    dist.destroy_process_group()
"""


def test_fsdp2_sharding_a_lowrank_weight_is_refused_with_a_clear_error():
    """FSDP2 replaces the ManifoldParameter by a sharded DTensor without the manifold, on which
    every optimizer would take a Euclidean step: the first forward says so instead."""
    pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(__import__("torch.distributed.fsdp", fromlist=["fully_shard"]), "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(HERE), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", FSDP2_SCRIPT.format(port=free_port())], env=env,
                         capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "REFUSED:" in out.stdout and "Sharding low-rank weights is not supported" in out.stdout, out.stdout
