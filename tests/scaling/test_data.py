from __future__ import annotations

import warnings

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


def _runs_csv(tmp_path, header="N,D,loss", rows=_ROWS, before="", name="runs.csv"):
    p = tmp_path / name
    p.write_text(before + header + "\n" + rows + "\n")
    return p


@pytest.mark.parametrize(
    "line, match",
    [("1e8,2e9,3,705", "line 3: 4 cells, but the header names 3 columns \\(a decimal comma"),
     ("1e8,2e9,3.7,", "line 3: 4 cells, but the header names 3 columns \\(a trailing comma")],
    ids=["decimal-comma", "trailing-comma"],
)
def test_row_with_more_cells_than_the_header_is_refused(tmp_path, line, match):
    # csv.DictReader put the extra cells under the key None: "3,705" was read as 3.
    rows = _ROWS.split("\n")
    rows[1] = line
    with pytest.raises(ValueError, match=match):
        load_csv(_runs_csv(tmp_path, rows="\n".join(rows)))


def test_row_with_fewer_cells_names_the_missing_cell(tmp_path):
    rows = _ROWS.split("\n")
    rows[2] = rows[2][: rows[2].rindex(",")]
    with pytest.raises(ValueError, match="line 4: loss must be finite and > 0, got no cell \\(the line has 2 cells"):
        load_csv(_runs_csv(tmp_path, rows="\n".join(rows)))


def test_duplicate_column_names(tmp_path):
    rows = "\n".join(r + ",99" for r in _ROWS.split("\n"))
    # The last "loss" column used to win silently.
    with pytest.raises(ValueError, match="column 'loss' appears 2 times in the header \\(columns \\[3, 4\\]\\)"):
        load_csv(_runs_csv(tmp_path, header="N,D,loss,loss", rows=rows))
    # A repeated column that is not used is no ambiguity (e.g. two unnamed trailing columns).
    rows = "\n".join(r + ",," for r in _ROWS.split("\n"))
    assert len(load_csv(_runs_csv(tmp_path, header="N,D,loss,,", rows=rows))) == 6


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n_col": "N", "loss_col": "N"}, "n_col and loss_col both name column 'N'"),
     ({"d_col": "N"}, "n_col and d_col both name column 'N'"),
     ({"n_col": "D"}, "n_col and d_col both name column 'D'"),  # D found by the header
     ({"c_col": "loss"}, "loss_col and c_col both name column 'loss'")],
)
def test_one_column_cannot_fill_two_roles(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_csv(_runs_csv(tmp_path), **kwargs)


def _with_c(c_of):
    return "\n".join(f"{n:g},{20 * n:g},{c_of(n):.3g},{3 - i / 10}" for i, n in enumerate(np.geomspace(1e8, 1e10, 6)))


def test_file_with_both_d_and_c_checks_that_they_agree(tmp_path):
    # C rounded to 3 significant digits is consistent: D is used, C = k N D.
    ok = _runs_csv(tmp_path, header="N,D,C,loss", rows=_with_c(lambda n: 6 * n * 20 * n))
    data = load_csv(ok)
    np.testing.assert_array_equal(data.D, load_csv(ok, d_col="D").D)
    np.testing.assert_allclose(data.C, 6 * data.N * data.D)
    # C computed with k = 8: C was silently ignored.
    bad = _runs_csv(tmp_path, header="N,D,C,loss", rows=_with_c(lambda n: 8 * n * 20 * n), name="k8.csv")
    with pytest.raises(ValueError, match="k8.csv, line 2: columns D and C disagree: C / \\(N D\\) = 8, but C = k N D "
                                         "with k = 6 \\(within 25%\\); D is what the fit uses: pass d_col='D'"):
        load_csv(bad)
    # compute as papers report it (Chinchilla: 5.76e23 for 70B params, 1.4T tokens, 2% below
    # 6 N D), and a C cell left empty, are not disagreements
    reported = _runs_csv(tmp_path, header="N,D,C,loss", rows=_with_c(lambda n: 0.98 * 6 * n * 20 * n),
                         name="reported.csv")
    np.testing.assert_array_equal(load_csv(reported).D, data.D)
    text = ok.read_text().splitlines()
    cells = text[2].split(",")
    cells[2] = ""
    text[2] = ",".join(cells)
    (tmp_path / "empty_c.csv").write_text("\n".join(text) + "\n")
    np.testing.assert_array_equal(load_csv(tmp_path / "empty_c.csv").D, data.D)
    assert load_csv(bad, k=8).k == 8.0
    # Naming the column is the caller's choice: no check.
    assert np.array_equal(load_csv(bad, d_col="D").D, data.D)
    assert load_csv(bad, c_col="C").D[0] == pytest.approx(20 * 8 / 6 * 1e8, rel=1e-2)


def test_drop_highest_with_ties_warns_and_never_drops_everything():
    n = np.geomspace(1e8, 1e9, 8)
    data = from_arrays(n, np.array([2, 3, 4, 5, 6, 7, 7, 7.0]), D=n)
    with pytest.warns(UserWarning, match="count \\(2\\): dropped 3 runs, not 2: 3 runs tie at the cut \\(loss 7.0\\)"):
        kept = drop_highest_loss(data, 2)
    assert sorted(kept.loss) == [2, 3, 4, 5, 6]  # Epoch's rule: loss < sorted(loss)[-2]
    flat = from_arrays(n, np.full(8, 3.0), D=n)
    with pytest.raises(ValueError, match="count \\(1\\): all 8 runs would be dropped: .* 8 runs tie at it"):
        drop_highest_loss(flat, 1)


def test_drop_highest_in_load_csv_names_the_argument(tmp_path):
    losses = [3.0, 3.0, 3.0, 2.9, 2.8, 2.7, 2.6, 2.5]
    rows = "\n".join(f"{n:g},{20 * n:g},{l}" for n, l in zip(np.geomspace(1e8, 1e10, 8), losses))
    p = _runs_csv(tmp_path, rows=rows)
    with pytest.warns(UserWarning, match="runs.csv: drop_highest \\(1\\): dropped 3 runs, not 1"):
        assert len(load_csv(p, drop_highest=1, min_rows=3)) == 5
    flat = _runs_csv(tmp_path, rows="\n".join(f"{n:g},{20 * n:g},3" for n in np.geomspace(1e8, 1e10, 8)))
    with pytest.raises(ValueError, match="runs.csv: drop_highest \\(2\\): all 8 runs would be dropped"):
        load_csv(flat, drop_highest=2)


def test_epoch_file_has_no_ties_at_the_cut():
    if not EPOCH_CSV.is_file():
        pytest.skip(f"Epoch data not found at {EPOCH_CSV}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_csv(EPOCH_CSV, **EPOCH_COLUMNS, drop_highest=5)) == 240


@pytest.mark.parametrize("cell", ["1_0", "100_000_000"])
def test_csv_refuses_digit_separators(tmp_path, cell):
    # float("1_0") is 10.
    rows = _ROWS.split("\n")
    rows[0] = cell + rows[0][rows[0].index(","):]
    with pytest.raises(ValueError, match=f"line 2: N must be finite and > 0, got '{cell}', not a number"):
        load_csv(_runs_csv(tmp_path, rows="\n".join(rows)))


def test_comment_lines_before_the_header_are_skipped(tmp_path):
    lines = _ROWS.split("\n")
    lines[3] = "x" + lines[3]
    p = _runs_csv(tmp_path, before="# generated by sweep.py\n#\n", rows="\n".join(lines))
    # Line numbers still count the file's lines, comments included.
    with pytest.raises(ValueError, match="runs.csv, line 7: N must be finite and > 0, got 'x1.58489e\\+09'"):
        load_csv(p)
    assert len(load_csv(_runs_csv(tmp_path, before="# generated by sweep.py\n\n"))) == 6
    # Among the data a '#' line is a bad row (a label column may hold "#1"); the error says so.
    with pytest.raises(ValueError, match="got '# second sweep', not a number \\(comment lines are skipped only before"):
        load_csv(_runs_csv(tmp_path, rows=_ROWS + "\n# second sweep"))
    # numpy.savetxt's "# N,D,loss" header is a comment: the error says what was skipped.
    with pytest.raises(ValueError, match="\\(1 line\\(s\\) starting with '#' before it were skipped as comments"):
        load_csv(_runs_csv(tmp_path, header="# N,D,loss"))


def test_argument_types_are_named(tmp_path):
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int 3"):
        load_csv(3)
    p = _runs_csv(tmp_path)
    with pytest.raises(TypeError, match="n_col must be a column name \\(str\\), got NoneType None"):
        load_csv(p, n_col=None)
    with pytest.raises(TypeError, match="d_col must be a column name \\(str\\) or None, got int 2"):
        load_csv(p, d_col=2)


def test_derived_c_must_be_finite():
    n = np.geomspace(1e154, 1e155, 6)  # 20 tokens per parameter, but 6 N D is beyond float64: C was inf
    with pytest.raises(ValueError, match="C = k N D overflows float64 \\(row 0: k 6, N 1e\\+154, D 2e\\+155\\)"):
        from_arrays(n, np.full(6, 3.0), D=20 * n)


def test_python_ints_beyond_int64_are_numbers():
    N = [70 * 10**9 + i * 10**9 for i in range(6)]
    D = [20 * n for n in N]
    C = [6 * n * d for n, d in zip(N, D)]  # > 2**63: NumPy keeps them as Python objects
    data = from_arrays(N, [3.0] * 6, C=C)
    np.testing.assert_allclose(data.D, D, rtol=1e-15)
    with pytest.raises(ValueError, match="C must be finite, got ~1e400 \\(beyond float64's range\\)"):
        from_arrays(N, [3.0] * 6, C=[10**400] * 6)
    with pytest.raises(TypeError, match="C must be numeric, got an array holding bool True"):
        from_arrays(N, [3.0] * 6, C=[2**70] * 5 + [True])
    with pytest.raises(TypeError, match="C must be numeric, got an array holding NoneType None"):
        from_arrays(N, [3.0] * 6, C=[2**70] * 5 + [None])


def test_torch_tensors_are_converted():
    torch = pytest.importorskip("torch")
    n = np.geomspace(1e8, 1e10, 6)
    loss = torch.tensor(3 - np.arange(6) / 10, requires_grad=True)  # e.g. straight from a training loop
    data = from_arrays(torch.tensor(n, dtype=torch.bfloat16), loss, D=torch.tensor(20 * n))
    np.testing.assert_allclose(data.loss, 3 - np.arange(6) / 10)
    np.testing.assert_allclose(data.N, n, rtol=1e-2)  # bfloat16 keeps ~3 digits
    assert data.N.dtype == np.float64
    with pytest.raises(TypeError, match="N must be numeric, got a tensor of torch.bool"):
        from_arrays(torch.ones(6, dtype=torch.bool), loss, D=n)


def test_scaling_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, numpy as np; from flopwise import scaling; "
            "scaling.from_arrays(np.geomspace(1e8, 1e9, 6), [3.0] * 6, D=np.geomspace(1e9, 1e10, 6)); "
            "scaling.ScalingLaw.epoch().optimal([1e21]); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
