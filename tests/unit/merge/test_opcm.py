import hashlib
import math

import pytest
import torch

from orchestrator.config.schema import config_from_dict
from orchestrator.errors import ConfigError
from workers.merge.opcm import OpcmParams, Rescale, opcm, project


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def _model(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w1": scale * torch.randn(6, 4, generator=g, dtype=torch.float64),
            "w2": scale * torch.randn(5, 5, generator=g, dtype=torch.float64),
            "bias": scale * torch.randn(5, generator=g, dtype=torch.float64)}


def _step(prev, new, base, state, alpha=0.5):
    """One OPCM step over a whole model, as the engine runs it: statistics, then kernels."""
    p = OpcmParams(alpha=alpha, **state)
    inputs = (lambda n: [new[n]]) if prev is None else (lambda n: [prev[n], new[n]])
    rescale = Rescale()
    parts = [rescale.collect(0, inputs(n), p, base=base[n], state=None) for n in base]
    reduced = rescale.reduce(0, parts, p, None)
    merged = {n: opcm(inputs(n), p, base=base[n], stats=reduced["scale"]) for n in base}
    return merged, rescale.report(reduced)


def _norm(model, base):
    return math.sqrt(sum(float((model[n] - base[n]).square().sum()) for n in base))


def _naive(models, base, alpha=0.5):
    """The paper's recursion written out plainly: Δ_t = (λ_{t−1} Δ_{t−1} + τ̃_t) / λ_t with
    λ_t making ‖Δ_t‖ the mean task-vector norm."""
    delta = {n: models[0][n] - base[n] for n in base}
    norms, lam = [_norm(models[0], base)], 1.0
    for m in models[1:]:
        new = {}
        for n in base:
            tau = m[n] - base[n]
            if tau.dim() == 2:
                u, s, vh = torch.linalg.svd(delta[n])
                share = torch.cumsum(s, 0) / s.sum()
                r = int(torch.argmax((share > alpha).to(torch.int64)))
                p = u.T @ tau @ vh.T
                for i in range(min(p.shape)):
                    p[i, i] = 0
                p[:r, :r] = 0
                tau = u @ p @ vh
            new[n] = lam * delta[n] + tau
        norms.append(_norm(m, base))
        total = math.sqrt(sum(float(v.square().sum()) for v in new.values()))
        lam = total / (sum(norms) / len(norms))
        delta = {n: v / lam for n, v in new.items()}
    return {n: base[n] + delta[n] for n in base}


def test_first_step_returns_the_first_model():
    base, first = _model(0), _model(1)
    merged, state = _step(None, first, base, {})
    for n in base:
        assert torch.equal(merged[n], first[n])
    assert state == {"merged": 1, "prior_scale": 1.0, "norm_sum": pytest.approx(
        _norm(first, base), rel=1e-12)}


def test_orthogonal_update_passes_the_projection_unchanged():
    """τ = U P Vᵀ with P zero on the diagonal and in the protected block: nothing is removed."""
    u, v = _orthogonal(6, 1), _orthogonal(6, 2)
    s = torch.tensor([5.0, 3, 1, 0.5, 0.2, 0.1], dtype=torch.float64)
    delta = u @ torch.diag(s) @ v.T  # shares .51 .82 ...: with alpha 0.6, r = 1
    p = torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    p.diagonal().zero_()
    p[:1, :1] = 0
    tau = u @ p @ v.T
    torch.testing.assert_close(project(delta, tau, alpha=0.6), tau)


def test_projection_removes_the_diagonal_and_the_protected_block():
    u, v = _orthogonal(5, 4), _orthogonal(5, 5)
    s = torch.tensor([4.0, 3, 2, 1, 0.5], dtype=torch.float64)  # shares .38 .67 .86 .95 1
    delta = u @ torch.diag(s) @ v.T
    p = torch.ones(5, 5, dtype=torch.float64)
    got = u.T @ project(delta, u @ p @ v.T, alpha=0.6) @ v  # r = 1 (first share above 0.6)
    want = p.clone()
    want.diagonal().zero_()
    want[:1, :1] = 0
    torch.testing.assert_close(got, want)
    assert torch.equal(project(torch.zeros(3, 3), torch.ones(3, 3), 0.5), torch.ones(3, 3))


def test_norm_of_the_merged_task_vector_is_the_mean_norm_after_every_step():
    base = _model(0)
    models = [{n: base[n] + d for n, d in _model(10 + i, scale=0.5 + i).items()}
              for i in range(4)]
    merged, state = _step(None, models[0], base, {})
    for t in range(1, 4):
        merged, state = _step(merged, models[t], base, state)
        mean = sum(_norm(m, base) for m in models[:t + 1]) / (t + 1)
        assert _norm(merged, base) == pytest.approx(mean, rel=1e-12)
        assert state["merged"] == t + 1


def test_steps_equal_the_naive_recursion_and_leave_the_base_alone():
    base = _model(0)
    digest = hashlib.sha256(b"".join(base[n].numpy().tobytes() for n in base)).hexdigest()
    models = [{n: base[n] + d for n, d in _model(20 + i, scale=0.3).items()} for i in range(3)]
    merged, state = _step(None, models[0], base, {}, alpha=0.4)
    for m in models[1:]:
        merged, state = _step(merged, m, base, state, alpha=0.4)
    want = _naive(models, base, alpha=0.4)
    for n in base:
        torch.testing.assert_close(merged[n], want[n], rtol=1e-10, atol=1e-12)
    assert digest == hashlib.sha256(b"".join(base[n].numpy().tobytes() for n in base)).hexdigest()


def test_float32_inputs_are_projected_in_float32():
    base = {n: t.float() for n, t in _model(0).items()}
    models = [{n: base[n] + d.float() for n, d in _model(30 + i).items()} for i in range(2)]
    merged, state = _step(None, models[0], base, {})
    merged, _ = _step(merged, models[1], base, state)
    assert all(t.dtype == torch.float32 for t in merged.values())


def test_config_checks_the_input_count_of_a_step():
    """A later step takes [previous merge, new model]; a first step any number (a sequence)."""
    doc = {"sources": [{"name": n, "uri": f"/{n}"} for n in "abc"],
           "base": {"name": "base", "uri": "/z"}, "merge": {"method": "opcm"},
           "output": {"uri": "/out"}}
    config_from_dict(doc)
    doc["merge"]["params"] = {"merged": 2, "prior_scale": 1.3, "norm_sum": 4.0}
    with pytest.raises(ConfigError, match="exactly 2 models, got 3"):
        config_from_dict(doc)
    doc["sources"].pop()
    config_from_dict(doc)
