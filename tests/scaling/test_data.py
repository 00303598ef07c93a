from __future__ import annotations

import numpy as np
import pytest

from flopwise.scaling import EPOCH_COLUMNS, ScalingData, drop_highest_loss, from_arrays, load_csv

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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"C": "log10"}, "C: row 0 gives D = .* tokens \\(< 1\\); C must be training FLOPs \\(not log10"),
        ({"C": "pfdays"}, "C: row 0 gives D = .*not log10 FLOPs or PF-days"),
        ({"D": "billions"}, "D: row 0 has D / N = 2e-08 .*D must be training tokens \\(not billions"),
        ({"D": "tiny"}, "D / N = 1e-05 tokens per parameter, outside \\[0.001, 1e\\+06\\]"),
    ],
    ids=["C-in-log10", "C-in-PF-days", "D-in-billions", "D-over-N-tiny"],
)
def test_unit_mistakes_are_rejected(kwargs, match):
    N = np.geomspace(1e8, 1e10, 6)
    D = 20 * N
    (key, unit), = kwargs.items()
    value = {"log10": np.log10(6 * N * D), "pfdays": 6 * N * D / 8.64e19, "billions": D / 1e9, "tiny": N * 1e-5}[unit]
    with pytest.raises(ValueError, match=match):
        from_arrays(N, np.full(6, 3.0), **{key: value})


def test_scalar_arguments_accept_numpy_and_refuse_strings():
    n = np.geomspace(1e8, 1e9, 6)
    assert from_arrays(n, np.full(6, 3.0), D=n, k=np.int64(6)).k == 6.0
    assert from_arrays(n, np.full(6, 3.0), D=n, min_rows=np.int64(6)).k == 6.0
    with pytest.raises(TypeError, match="k must be a real number"):
        from_arrays(n, np.full(6, 3.0), D=n, k="6")
    with pytest.raises(TypeError, match="k must be a real number"):
        from_arrays(n, np.full(6, 3.0), D=n, k=True)
    with pytest.raises(TypeError, match="N must be numeric"):
        from_arrays([str(v) for v in n], np.full(6, 3.0), D=n)
    with pytest.raises(TypeError, match="count"):
        drop_highest_loss(from_arrays(n, np.full(6, 3.0), D=n), 2.0)


def test_scaling_data_built_directly_is_validated():
    n = np.geomspace(1e8, 1e9, 6)
    ok = ScalingData(n, 10 * n, 60 * n * n, np.full(6, 3.0))
    assert ok.N.dtype == np.float64 and len(ok) == 6
    with pytest.raises(ValueError, match="loss must be finite and > 0"):
        ScalingData(n, 10 * n, 60 * n * n, np.full(6, -3.0))
    with pytest.raises(ValueError, match="C must equal k \\* N \\* D"):
        ScalingData(n, 10 * n, 6 * n, np.full(6, 3.0))
    with pytest.raises(ValueError, match="same length"):
        ScalingData(n, 10 * n[:5], 60 * n * n, np.full(6, 3.0))


_ROWS = "\n".join(f"{n:g},{20 * n:g},{3 - i / 10}" for i, n in enumerate(np.geomspace(1e8, 1e10, 6)))


def test_csv_with_bom_and_spaces_in_header(tmp_path):
    p = tmp_path / "runs.csv"
    p.write_bytes(("\ufeffN, D , loss\n" + _ROWS.replace(",", ", ") + "\n").encode("utf-8"))
    assert len(load_csv(p)) == 6


@pytest.mark.parametrize(
    "cell, match",
    [("1B", "runs.csv, line 6: N must be finite and > 0, got '1B', not a number"),
     ("", "runs.csv, line 6: N must be finite and > 0, got an empty cell"),
     ("nan", "runs.csv, line 6: N must be finite and > 0, got 'nan'")],
    ids=["text", "empty", "nan"],
)
def test_csv_errors_name_the_file_line_and_raw_cell(tmp_path, cell, match):
    lines = _ROWS.split("\n")
    lines[3] = cell + lines[3][lines[3].index(","):]
    # A blank line before the bad row: the line number counts file lines, not data rows.
    p = _write(tmp_path, "N,D,loss\n" + "\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    with pytest.raises(ValueError, match=match):
        load_csv(p)


def test_csv_unit_errors_name_the_line(tmp_path):
    p = _write(tmp_path, "N,C,loss\n" + "\n".join(f"{n:g},{np.log10(6 * n * 20 * n):.4f},3" for n in np.geomspace(1e8, 1e10, 6)) + "\n")
    with pytest.raises(ValueError, match="runs.csv: C: line 2 gives D = .* tokens \\(< 1\\)"):
        load_csv(p)


def test_csv_encoding_empty_and_argument_errors(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes(b"N,D,loss\xe9\n1,2,3\n")
    with pytest.raises(ValueError, match="latin.csv: not UTF-8 text"):
        load_csv(p)
    with pytest.raises(ValueError, match="runs.csv: no data rows after the header"):
        load_csv(_write(tmp_path, "N,D,loss\n"))
    with pytest.raises(ValueError, match="runs.csv: empty file"):
        load_csv(_write(tmp_path, ""))
    ok = _write(tmp_path, "N,D,loss\n" + _ROWS + "\n")
    with pytest.raises(ValueError, match="min_rows must be an int >= 1"):
        load_csv(ok, min_rows=0)
    with pytest.raises(ValueError, match="drop_highest must be an int >= 0"):
        load_csv(ok, drop_highest=-1)
    with pytest.raises(ValueError, match="drop_highest \\(6\\) must be smaller"):
        load_csv(ok, drop_highest=6)
