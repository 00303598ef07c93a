from __future__ import annotations

import numpy as np
import pytest

from flopwise.scaling import KNOWN_MODELS, ScalingLaw, decompose, get_law
from flopwise.scaling.laws import parse_models


def test_presets_are_the_published_values():
    h = ScalingLaw.hoffmann()
    assert (h.E, h.A, h.B, h.alpha, h.beta) == (1.69, 406.4, 410.7, 0.34, 0.28)
    e = get_law("EPOCH")
    assert (e.E, e.A, e.B, e.alpha, e.beta) == (1.8172, 482.01, 2085.43, 0.3478, 0.3658)
    with pytest.raises(ValueError, match="unknown law"):
        get_law("kaplan")


def test_exponents_sum_to_one_and_match_papers():
    h, e = ScalingLaw.hoffmann(), ScalingLaw.epoch()
    assert h.a + h.b == pytest.approx(1.0)
    assert h.a == pytest.approx(0.28 / 0.62)
    # Epoch report a = 0.513 for their fit (PAPERS.md).
    assert e.a == pytest.approx(0.513, abs=5e-4)


@pytest.mark.parametrize("law", [ScalingLaw.hoffmann(), ScalingLaw.epoch()], ids=["hoffmann", "epoch"])
@pytest.mark.parametrize("compute", [1e18, 5.88e23, 1e26])
def test_frontier_is_the_constrained_minimum(law, compute):
    n, d = law.optimal(compute)
    assert 6 * n * d == pytest.approx(compute, rel=1e-12)
    best = law.loss(n, d)
    # Any other split of the same compute is worse.
    for f in (0.9, 0.99, 1.01, 1.1):
        assert law.loss(n * f, compute / (6 * n * f)) > best
    # Closed form equals a brute-force search along the isoFLOP line.
    ns = np.geomspace(n / 10, n * 10, 20001)
    n_num = ns[np.argmin(law.loss(ns, compute / (6 * ns)))]
    assert n_num == pytest.approx(n, rel=1e-3)


def test_epoch_tokens_per_parameter_near_twenty_at_chinchilla_compute():
    # Epoch: "~20 tokens per parameter at Chinchilla's compute"; the rounded fit gives 18.4.
    tpp = ScalingLaw.epoch().tokens_per_parameter(6 * 70e9 * 1.4e12)
    assert 17 < tpp < 22
    # Hoffmann's Eq. 10 is known to give far more (Epoch's point): > 70.
    assert ScalingLaw.hoffmann().tokens_per_parameter(6 * 70e9 * 1.4e12) > 70


def test_k_changes_the_frontier():
    law = ScalingLaw.epoch()
    n6, d6 = law.optimal(1e22)
    n8, d8 = law.optimal(1e22, k=8)
    assert n8 < n6 and d8 < d6
    assert 8 * n8 * d8 == pytest.approx(1e22)


def test_decompose_terms_add_up():
    law = ScalingLaw.hoffmann()
    rows = decompose(law, "gpt3,gopher,chinchilla")
    assert [r["model"] for r in rows] == ["gpt3", "gopher", "chinchilla"]
    for r in rows:
        n, d = KNOWN_MODELS[r["model"]]
        assert r["irreducible"] + r["model_term"] + r["data_term"] == pytest.approx(r["loss"])
        assert r["loss"] == pytest.approx(law.loss(n, d))
        assert r["model_term"] == pytest.approx(406.4 / n**0.34)
        assert r["optimal_loss"] <= r["loss"]
    gpt3, gopher, chin = rows
    # Gopher and GPT-3 saw the same 300B tokens: same data term, Gopher's model term smaller.
    assert gpt3["data_term"] == pytest.approx(gopher["data_term"])
    assert gopher["model_term"] < gpt3["model_term"]
    assert chin["loss"] < gopher["loss"]


def test_decompose_custom_model_and_errors():
    rows = decompose(ScalingLaw.epoch(), "mine:1e9:2e10")
    assert rows[0]["N"] == 1e9 and rows[0]["D"] == 2e10
    with pytest.raises(ValueError, match="unknown model"):
        parse_models("gpt5")
    with pytest.raises(ValueError, match="N of bad"):
        parse_models([("bad", -1, 1e9)])
    with pytest.raises(TypeError, match="law"):
        decompose("hoffmann")


def test_law_validation_names_the_argument():
    with pytest.raises(ValueError, match="alpha"):
        ScalingLaw(E=1.7, A=400, B=400, alpha=-0.3, beta=0.3)
    with pytest.raises(TypeError, match="A"):
        ScalingLaw(E=1.7, A="400", B=400, alpha=0.3, beta=0.3)
    with pytest.raises(ValueError, match="E"):
        ScalingLaw(E=float("nan"), A=400, B=400, alpha=0.3, beta=0.3)
    law = ScalingLaw.hoffmann()
    with pytest.raises(ValueError, match="N"):
        law.loss(0, 1e9)
    with pytest.raises(ValueError, match="D"):
        law.loss(1e9, [1e9, np.nan])
    with pytest.raises(ValueError, match="compute"):
        law.optimal(-1.0)
    with pytest.raises(ValueError, match="k"):
        law.optimal(1e20, k=0)


def test_law_is_immutable():
    law = ScalingLaw.epoch()
    with pytest.raises(AttributeError):
        law.E = 2.0


def test_frontier_in_logs_for_small_exponents():
    # G = (0.2)^(1 / 0.002) underflows to 0 alone; the frontier itself is representable.
    law = ScalingLaw(E=1.0, A=400.0, B=2000.0, alpha=0.01, beta=0.02)
    assert law.G > 0
    n, d = law.optimal(1e23)
    assert 6 * n * d == pytest.approx(1e23, rel=1e-9)
    assert law.tokens_per_parameter(1e23) == pytest.approx(d / n, rel=1e-9)
    # Where the optimum itself leaves float64, an error instead of (0.0, inf).
    tiny = ScalingLaw(E=1.0, A=400.0, B=2000.0, alpha=1e-3, beta=1e-3)
    with pytest.raises(ValueError, match="compute: N_opt, D_opt at 1e\\+23 FLOPs under- or overflow"):
        tiny.optimal(1e23)
    with pytest.raises(ValueError, match="tokens per parameter"):
        tiny.tokens_per_parameter(1e23)


@pytest.mark.parametrize("value", [True, "1e23", None, [1e23, "x"]], ids=["bool", "str", "None", "mixed"])
def test_compute_must_be_numeric(value):
    with pytest.raises(TypeError, match="compute must be a number or an array of numbers"):
        ScalingLaw.epoch().optimal(value)


def test_numpy_k_and_bad_model_tuple():
    law = ScalingLaw.epoch()
    assert law.optimal(1e22, k=np.int64(6)) == law.optimal(1e22)
    with pytest.raises(TypeError, match="k must be a real number"):
        law.optimal(1e22, k="6")
    with pytest.raises(TypeError, match="models: N and D of 'x' must be numbers, got 'a'"):
        decompose(law, [("x", "a", 1e10)])


def test_python_ints_beyond_int64_are_accepted():
    law = ScalingLaw.epoch()
    c = 6 * 70_000_000_000 * 1_400_000_000_000  # 5.88e23 as a Python int: NumPy makes an object array
    assert law.optimal(c) == law.optimal(5.88e23)
    assert law.tokens_per_parameter(10**24) == law.tokens_per_parameter(1e24)
    np.testing.assert_array_equal(law.optimal([c, 10**24])[0], law.optimal([5.88e23, 1e24])[0])
    with pytest.raises(ValueError, match="compute must be finite, got ~1e400"):
        law.optimal(10**400)
    with pytest.raises(ValueError, match="compute must be finite, got ~1e5000"):  # past str()'s 4,300 digits
        law.optimal(10**5000)
    with pytest.raises(ValueError, match="k must be a finite number > 0, got ~1e400 \\(beyond float64's range\\)"):
        law.optimal(1e23, k=10**400)


def test_torch_scalars_and_tensors_are_numbers():
    torch = pytest.importorskip("torch")
    law = ScalingLaw.epoch()
    assert law.optimal(torch.tensor(5.88e23, dtype=torch.float64)) == law.optimal(5.88e23)
    n = torch.tensor([1e9, 2e9], requires_grad=True)
    np.testing.assert_allclose(law.loss(n, 2e10), law.loss(np.array([1e9, 2e9]), 2e10), rtol=1e-7)


def test_loss_with_shapes_that_do_not_broadcast():
    law = ScalingLaw.hoffmann()
    with pytest.raises(ValueError, match="N and D must have the same shape or shapes that broadcast together, "
                                         "got \\(3,\\) and \\(2,\\)"):
        law.loss([1e9, 2e9, 3e9], [1e10, 2e10])
    with pytest.raises(ValueError, match="N and D must have the same shape"):
        law.terms([1e9, 2e9, 3e9], [1e10, 2e10])
    assert law.loss([[1e9], [2e9]], [1e10, 2e10, 3e10]).shape == (2, 3)


@pytest.mark.parametrize("n, d", [(True, 2e10), (1e9, np.bool_(True))])
def test_decompose_refuses_bools(n, d):
    # float(True) is 1.0: a model of one parameter.
    with pytest.raises(TypeError, match="models: N and D of 'm' must be numbers, not bools"):
        decompose(ScalingLaw.epoch(), [("m", n, d)])
