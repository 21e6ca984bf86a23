"""Operations that change a user's model from data are all or nothing.

``convert_to_low_rank``, ``add_adapters``, ``export_dense`` and ``load_lowrank_state_dict``
either succeed or raise with the model exactly as before: module types, every tensor
(bitwise), every ``requires_grad`` flag, the identity of every parameter. Loaded points are
checked like constructed ones; the base fingerprint covers the bias and the norm. The
reference of "unchanged" is a snapshot taken before the call.
"""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

from lowrank_manifolds.nn import (
    LowRankAdapterLinear,
    LowRankLinear,
    add_adapters,
    convert_to_low_rank,
    export_dense,
)
from lowrank_manifolds.nn import serialization
from lowrank_manifolds.nn.serialization import load_lowrank_state_dict, lowrank_state_dict


def snapshot(model: nn.Module) -> dict:
    return {
        "modules": [(name, type(mod)) for name, mod in model.named_modules()],
        "params": [(name, id(p), p.requires_grad) for name, p in model.named_parameters()],
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": [mod.training for mod in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    now = snapshot(model)
    assert now["modules"] == before["modules"]
    assert now["params"] == before["params"]
    assert now["training"] == before["training"]
    assert now["tensors"].keys() == before["tensors"].keys()
    for key, t in before["tensors"].items():
        got = now["tensors"][key]
        assert got.dtype == t.dtype and got.shape == t.shape, key
        assert torch.equal(got.contiguous().view(torch.uint8), t.contiguous().view(torch.uint8)), key  # bitwise


def dense_model(seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 5),
                         nn.ReLU(), nn.Linear(5, 4))


def trained_model(seed=0) -> nn.Sequential:
    """Every kind of saved layer: a rank-adaptive LowRankLinear, an adapter with a recorded
    initial correction, one with an untouched base, and one that saves its base."""
    model = dense_model(seed)
    convert_to_low_rank(model, rank=2, max_rank=3, include=["0"], require_saving=False)
    add_adapters(model, rank=2, include=["2"], freeze=False)
    add_adapters(model, rank=2, include=["4"], exact_init=False, freeze=False)
    model[6] = LowRankAdapterLinear(model[6], 2)  # exact_init without a record: its base is saved
    with torch.no_grad():  # move every point and the layer norm off their initial values
        for mod in model.modules():
            if hasattr(mod, "manifold") and not mod.manifold.adaptive:
                p = mod.point
                p.copy_(mod.manifold.retr(p, 0.3 * mod.manifold.random_tangent(p)))
        model[0].manifold.unpack(model[0].weight)[1].mul_(1.5)  # keeps the active rank 2 of 3
        model[1].weight.add_(0.5)
    return model


def test_the_fixture_round_trips_bit_identically():
    model = trained_model()
    tensors, meta = lowrank_state_dict(model)
    assert {s["init"] for s in meta["layers"].values() if "init" in s} == {"delta_init", "none", "base"}
    assert meta["layers"]["0"]["class"] == "LowRankLinear" and meta["layers"]["0"]["active_rank"] == 2
    fresh = load_lowrank_state_dict(dense_model(), tensors, meta)
    x = torch.randn(3, 6)
    assert torch.equal(fresh(x), model(x))


# ------------------------------------------------------------------ conversions
def test_convert_that_fails_on_a_later_layer_leaves_the_model_unchanged():
    model = dense_model()
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        convert_to_low_rank(model, rank=2, require_saving=False)
    assert_unchanged(model, before)

    model = dense_model()
    with torch.no_grad():
        model[4].weight.zero_()  # rank 0 < 2: no rank-2 approximation
    before = snapshot(model)
    with pytest.raises(ValueError, match="rank"):
        convert_to_low_rank(model, rank=2, require_saving=False)
    assert_unchanged(model, before)


def test_add_adapters_that_fails_on_a_later_layer_leaves_the_model_unchanged(monkeypatch):
    """A failure while wrapping the third layer (any cause; here injected) leaves the first two
    layers' weights unfolded and unfrozen."""
    model = dense_model()
    before = snapshot(model)
    real, calls = LowRankAdapterLinear.__init__, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        real(self, *args, **kwargs)

    monkeypatch.setattr(LowRankAdapterLinear, "__init__", failing)
    with pytest.raises(RuntimeError, match="injected"):
        add_adapters(model, rank=2)
    assert len(calls) == 3
    assert_unchanged(model, before)
    monkeypatch.setattr(LowRankAdapterLinear, "__init__", real)
    add_adapters(model, rank=2)  # and then works
    assert sum(isinstance(m, LowRankAdapterLinear) for m in model.modules()) == 4


def test_export_that_fails_on_a_later_layer_leaves_the_model_unchanged(monkeypatch):
    model = trained_model()
    before = snapshot(model)
    real, calls = LowRankAdapterLinear.merge, []

    def failing(self):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(self)

    monkeypatch.setattr(LowRankAdapterLinear, "merge", failing)
    with pytest.raises(RuntimeError, match="injected"):
        export_dense(model)
    assert_unchanged(model, before)


def test_convert_with_a_capacity_on_the_meta_device_reads_no_value():
    with torch.device("meta"):
        model = dense_model()
    rep = convert_to_low_rank(model, rank=2, max_rank=3, report=True, require_saving=False)
    assert [c.rank for c in rep.changed] == [2, 2, 2, 2] and isinstance(model[0], LowRankLinear)


# ------------------------------------------------------------------ loading
def saved(seed=0):
    tensors, meta = lowrank_state_dict(trained_model(seed))
    return tensors, meta


def load_or_unchanged(tensors, meta, **kw):
    """Load into a fresh model: succeed with valid points and finite layers, or raise with the
    model unchanged. The other entries (the layer norm) are the user's: loaded as they are."""
    fresh = dense_model()
    before = snapshot(fresh)
    try:
        load_lowrank_state_dict(fresh, tensors, meta, **kw)
    except (ValueError, KeyError, TypeError) as err:
        assert_unchanged(fresh, before)
        return err
    for mod in fresh.modules():
        if hasattr(mod, "manifold"):
            tol = serialization.point_tolerance(mod.point.dtype)
            assert mod.manifold.check_point_on_manifold(mod.point.detach(), atol=tol, rtol=tol)
            assert all(torch.isfinite(t).all() for t in mod.state_dict().values())
    if all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("1.")):
        assert torch.isfinite(fresh(torch.randn(2, 6))).all()
    return None


def test_a_bad_entry_of_a_later_layer_leaves_every_earlier_one_alone():
    """The reported case: the adapter of layer 2 was folded and frozen before layer 4 failed."""
    for corrupt in ("shape", "missing", "extra", "spec"):
        tensors, meta = saved()
        if corrupt == "shape":
            tensors["4.delta"] = tensors["4.delta"][:-1]
        elif corrupt == "missing":
            del tensors["6.base.weight"]
        elif corrupt == "extra":
            tensors["4.unknown"] = torch.zeros(3)
        else:
            meta["layers"]["6"]["rank"] = "two"
        err = load_or_unchanged(tensors, meta)
        assert err is not None, corrupt


@pytest.mark.parametrize("defect,message", [
    ("nan", "non-finite"),
    ("not orthonormal", "orthonormal"),
    ("out of order", "first"),
    ("inactive not zero", "zero"),
    ("singular", "singular"),
    ("active rank", "active rank"),
])
def test_a_saved_point_that_is_not_a_point_is_refused(defect, message):
    tensors, meta = saved()
    mf = trained_model()[0].manifold  # the converted layer: 8 x 6, capacity 3, active rank 2
    x = tensors["0.weight"].clone()
    u, s, v = mf.unpack(x)
    if defect == "nan":
        s[0, 0] = float("nan")
    elif defect == "not orthonormal":
        u[0, 0] += 0.01
    elif defect == "out of order":  # the active columns moved behind the inactive one
        x = torch.cat([u[:, [2, 0, 1]], s[[2, 0, 1]][:, [2, 0, 1]], v[:, [2, 0, 1]]], 0)
    elif defect == "inactive not zero":
        s[2, 0] = 1e-3
    elif defect == "singular":
        s[1, 1], s[0, 1], s[1, 0] = 0.0, 0.0, 0.0
    else:
        meta["layers"]["0"]["active_rank"] = 3
    tensors["0.weight"] = x
    err = load_or_unchanged(tensors, meta)
    assert err is not None and message in str(err) and "0" in str(err)


def test_bias_and_norm_are_fingerprinted():
    tensors, meta = saved()
    for change in ("bias", "orthogonal to the probes"):
        fresh = dense_model()
        with torch.no_grad():
            if change == "bias":
                fresh[2].bias.add_(1.0)
            else:  # E = x y^T with x orthogonal to the probes' left vectors: every probe kept
                w = fresh[2].weight
                m, n = w.shape
                g = torch.Generator().manual_seed(m * 1_000_003 + n)
                a = torch.randn(m, serialization._PROBES, generator=g, dtype=torch.float64)
                q, _ = torch.linalg.qr(a)
                x = torch.randn(m, dtype=torch.float64)
                x -= q @ (q.T @ x)
                e = (x[:, None] * torch.randn(1, n, dtype=torch.float64)).to(w.dtype)
                e *= 0.5 * w.norm() / e.norm()
                old = serialization._base_fingerprint(w, None)["base_probes"]
                w.add_(e)
                new = serialization._base_fingerprint(w, None)["base_probes"]
                assert max(abs(p - q_) for p, q_ in zip(old, new)) < 1e-6 * w.norm()  # probes blind to it
        before = snapshot(fresh)
        with pytest.raises(ValueError, match="bias" if change == "bias" else "weight norm"):
            load_lowrank_state_dict(fresh, tensors, meta)
        assert_unchanged(fresh, before)
    load_lowrank_state_dict(dense_model(), tensors, meta)  # the right base passes


def test_files_of_the_first_fingerprint_still_load():
    tensors, meta = saved()
    for spec in meta["layers"].values():  # as written before the norms and the bias were kept
        if "base_norm" in spec:
            spec["base_scale"] = spec.pop("base_norm") + 1.0
            spec.pop("bias_probes", None), spec.pop("bias_norm", None)
    assert load_or_unchanged(tensors, meta) is None


_VALUES = st.sampled_from([None, "x", -1, 0, 1, 2.5, True, False, [], {}, 10 ** 6, float("nan")])


@st.composite
def corruptions(draw):
    tensors, meta = saved()
    meta = copy.deepcopy(meta)
    names = sorted(meta["layers"])
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["drop", "shape", "dtype", "value", "spec", "extra", "drop spec"]))
        key = draw(st.sampled_from(sorted(tensors)))
        if how == "drop":
            tensors.pop(key)
        elif how == "shape" and tensors[key].dim() >= 1:
            t = tensors[key]
            tensors[key] = draw(st.sampled_from([t[:-1], torch.cat([t, t[:1]]), t.reshape(-1)]))
        elif how == "dtype":
            tensors[key] = tensors[key].to(draw(st.sampled_from([torch.float64, torch.float16, torch.int32])))
        elif how == "value" and tensors[key].is_floating_point() and tensors[key].numel():
            t = tensors[key].clone()
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([float("nan"), 7.0, 0.0, -1e30]))
            tensors[key] = t
        elif how == "spec":
            spec = meta["layers"][draw(st.sampled_from(names))]
            spec[draw(st.sampled_from(sorted(spec)))] = draw(_VALUES)
        elif how == "drop spec":
            spec = meta["layers"][draw(st.sampled_from(names))]
            spec.pop(draw(st.sampled_from(sorted(spec))))
        elif how == "extra":
            tensors[draw(st.sampled_from(["2.extra", "9.weight", "1.weight.x"]))] = torch.zeros(2)
    return tensors, meta


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corruptions())
def test_a_corrupted_file_loads_correctly_or_changes_nothing(case):
    tensors, meta = case
    load_or_unchanged(tensors, meta)


def test_loading_refuses_wrong_json_types_by_name():
    tensors, meta = saved()
    for bad in (None, [], "x"):
        assert "format" in str(load_or_unchanged(tensors, bad))
    meta["layers"] = ["0"]
    assert "mapping" in str(load_or_unchanged(tensors, meta))
    tensors, meta = saved()
    meta["layers"]["0"]["capacity"] = 2.0
    assert "'capacity'" in str(load_or_unchanged(tensors, meta))
    tensors, meta = saved()
    meta["layers"]["0"]["adaptive"] = "yes"
    assert "'adaptive'" in str(load_or_unchanged(tensors, meta))


def test_a_point_saved_in_another_float_dtype_loads_converted():
    tensors, meta = saved()
    model = trained_model()
    tensors = {k: v.to(torch.float64) for k, v in tensors.items()}
    fresh = load_lowrank_state_dict(dense_model(), tensors, meta)
    x = torch.randn(3, 6)
    assert fresh[0].weight.dtype == torch.float32
    assert torch.equal(fresh(x), model(x))


def test_a_pickle_path_is_refused_and_integrator_layers_round_trip(tmp_path):
    from lowrank_manifolds.nn import load_lowrank, save_lowrank

    model = nn.Sequential(LowRankLinear(6, 5, 2, retraction="ksl"), LowRankLinear(5, 4, 2, max_rank=3,
                                                                                 retraction="abc-psi"))
    for path in ("model.pt", "model.pth", "adapters.bin"):
        with pytest.raises(ValueError, match="safetensors"):
            save_lowrank(model, tmp_path / path)
        with pytest.raises(ValueError, match="safetensors"):
            load_lowrank(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)), tmp_path / path)
    with pytest.raises(FileNotFoundError, match="no low-rank state"):
        load_lowrank(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)), tmp_path / "absent")
    save_lowrank(model, tmp_path)  # a name the layer was given is a name the file can keep
    fresh = load_lowrank(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)), tmp_path)
    assert [type(m.manifold.retraction).__name__ for m in fresh] == ["KSL", "ABCPSI"]
    x = torch.randn(2, 6)
    assert torch.equal(fresh(x), model(x))
