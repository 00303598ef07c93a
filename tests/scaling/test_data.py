from __future__ import annotations

import numpy as np
import pytest

from flopwise.scaling import EPOCH_COLUMNS, drop_highest_loss, from_arrays, load_csv

from .conftest import EPOCH_CSV


def test_epoch_file_conventions(epoch_data):
    full = load_csv(EPOCH_CSV, **EPOCH_COLUMNS)
    assert len(full) == 245
    assert len(epoch_data) == 240  # Epoch drop the five highest-loss runs
    assert epoch_data.loss.max() < np.sort(full.loss)[-5]
    np.testing.assert_allclose(epoch_data.D, epoch_data.C / (6 * epoch_data.N), rtol=1e-15)
    # D range stated in the data README: 2.45e8 .. 3.18e11 (all 245 runs).
    assert full.D.min() == pytest.approx(2.45e8, rel=5e-3)
    assert full.D.max() == pytest.approx(3.18e11, rel=5e-3)


def _write(tmp_path, text):
    p = tmp_path / "runs.csv"
    p.write_text(text)
    return p


def test_csv_with_tokens_and_renamed_columns(tmp_path):
    rows = "\n".join(f"{n},{d},{l}" for n, d, l in zip([1e8, 2e8, 4e8, 8e8, 1e9, 2e9], [1e9] * 6, [3, 2.9, 2.8, 2.7, 2.6, 2.5]))
    p = _write(tmp_path, "params,tokens,xent\n" + rows + "\n")
    data = load_csv(p, n_col="params", d_col="tokens", loss_col="xent", k=6)
    np.testing.assert_allclose(data.C, 6 * data.N * data.D)
    with pytest.raises(ValueError, match="'N' \\(n_col\\)"):
        load_csv(p, d_col="tokens", loss_col="xent")


@pytest.mark.parametrize(
    "body, match",
    [
        ("N,D,loss\n1e8,1e9,nan\n", "loss must be finite"),
        ("N,D,loss\n-1e8,1e9,3\n", "N must be finite and > 0"),
        ("N,D,loss\n1e8,0,3\n", "D must be finite and > 0"),
        ("N,D,loss\n1e8,1e9,\n", "loss must be finite"),
        ("N,D,loss\n1e8,1e9,3\n2e8,1e9,3\n", "at least 6 runs"),
        ("N,tokens,loss\n1e8,1e9,3\n", "no token or FLOP column"),
    ],
    ids=["nan-loss", "negative-N", "zero-D", "empty-cell", "too-few", "no-D-or-C"],
)
def test_bad_csv_gets_a_clear_error(tmp_path, body, match):
    with pytest.raises(ValueError, match=match):
        load_csv(_write(tmp_path, body))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="path"):
        load_csv("/nonexistent/runs.csv")


def test_from_arrays_validation():
    n = np.geomspace(1e8, 1e9, 6)
    with pytest.raises(ValueError, match="exactly one of D"):
        from_arrays(n, np.full(6, 3.0))
    with pytest.raises(ValueError, match="exactly one of D"):
        from_arrays(n, np.full(6, 3.0), D=n, C=n)
    with pytest.raises(ValueError, match="same length"):
        from_arrays(n, np.full(5, 3.0), D=n)
    with pytest.raises(ValueError, match="C must be finite"):
        from_arrays(n, np.full(6, 3.0), C=-n)
    with pytest.raises(ValueError, match="at least 6"):
        from_arrays(n[:5], np.full(5, 3.0), D=n[:5])
    with pytest.raises(TypeError, match="N must be numeric"):
        from_arrays(["a"] * 6, np.full(6, 3.0), D=n)


def test_drop_highest_loss():
    n = np.geomspace(1e8, 1e9, 8)
    data = from_arrays(n, np.arange(8, dtype=float) + 2, D=n)
    assert sorted(drop_highest_loss(data, 3).loss) == [2, 3, 4, 5, 6]
    assert drop_highest_loss(data, 0) is data
    with pytest.raises(ValueError, match="count"):
        drop_highest_loss(data, -1)
    with pytest.raises(ValueError, match="count"):
        drop_highest_loss(data, 8)
