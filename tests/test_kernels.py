"""sparseinfer.kernels: every ISA path and format against numpy, with the named budgets of ERROR_BUDGETS."""

import threading
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseinfer
from sparseinfer import InvalidInputError, UnsupportedError, kernels

B = kernels.ERROR_BUDGETS
INT = {"dense-int8", "sparse-int8", "dense-int4", "sparse-int4"}
INT4 = {"dense-int4", "sparse-int4"}

VARIANTS = [(f, None, False) for f in kernels.FORMATS]
VARIANTS += [(f, g, False) for f in sorted(INT) for g in (32, 64, 128)]
VARIANTS += [(f, g, True) for f in sorted(INT4) for g in (None, 32)]


def sparse_matrix(rng, rows, cols, density):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[rng.random((rows, cols)) >= density] = 0.0
    if rows >= 3:
        w[0] = 0.0  # an empty row
        w[1] = rng.standard_normal(cols).astype(np.float32) + 2.0  # a full row
    return w


def weight_bounds(w, fmt, group, asym):
    """Per-weight bound on |ŵ - w| from the budgets, computed from w alone."""
    if fmt.endswith("f32"):
        return np.zeros_like(w)
    if fmt.endswith("bf16"):
        return B["bf16_rel"] * np.abs(w)
    rows, cols = w.shape
    g = group or (kernels.INT4_DEFAULT_GROUP if fmt in INT4 else cols)
    bound = np.zeros_like(w)
    sparse = fmt.startswith("sparse")
    for c0 in range(0, cols, g):
        blk = w[:, c0 : c0 + g].astype(np.float64)
        considered = np.where(blk != 0, blk, np.nan) if sparse else blk
        if asym:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no stored weight
                d = (np.nanmax(considered, axis=1) - np.nanmin(considered, axis=1)) / 15.0
        else:
            qmax = 127.0 if fmt.endswith("int8") else 7.0
            d = np.max(np.abs(blk), axis=1) / qmax
        # int4 grids are fitted by a search that may clip a group's extremes by up to int4_fit max-based steps.
        k = B["int4_fit"] if fmt in INT4 else B["sparse_round"] if sparse else B["round"]
        d = np.nan_to_num(d)
        bound[:, c0 : c0 + g] = (k * d * (1 + 1e-5))[:, None] + 1e-6 * np.abs(blk)
    return bound


def check(w, fmt, group, asym, rng, k=3, layout="auto"):
    m = kernels.pack(w, fmt, group_size=group, asymmetric=asym, layout=layout)
    assert m.shape == w.shape and m.format == fmt
    if layout != "auto":
        assert m.layout == layout
    assert m.density == pytest.approx(np.count_nonzero(w) / w.size)
    dense = m.to_dense()
    assert dense.dtype == np.float32 and dense.shape == w.shape
    # The format against the f32 weights it came from.
    err = np.abs(dense.astype(np.float64) - w)
    bound = weight_bounds(w, fmt, group, asym)
    worst = np.unravel_index(np.argmax(err - bound), w.shape)
    assert np.all(err <= bound), f"{fmt} g={group} asym={asym}: ŵ{worst} off by {err[worst]} > {bound[worst]}"
    if fmt.startswith("sparse"):
        assert np.all(dense[w == 0] == 0), "a pruned weight came back"
        if fmt not in INT:  # integer formats may round a stored weight to code 0
            assert np.array_equal(dense != 0, w != 0), "zero pattern changed"
    # The kernel against numpy on the dequantized weights (float64), within the summation-order budget, for
    # f32 activations and for int8 activations (against numpy on x̂, which is checked against x).
    x = rng.standard_normal((k, w.shape[1])).astype(np.float32)
    default = "int8" if fmt in INT else "f32"
    for act in ("f32", "int8", "int8-token"):
        xa = x if act == "f32" else quantize_activations(x, token=act == "int8-token")
        want = xa.astype(np.float64) @ dense.astype(np.float64).T
        mag = np.abs(dense)
        if fmt in INT and act == "int8":  # zero points are added separately: rounding scales with them too
            mag = mag + 1.2 * group_absmax(w, group or (kernels.INT4_DEFAULT_GROUP if fmt in INT4 else w.shape[1]))
        tol = B["sum_order"] * (np.abs(xa) @ mag.T) + 1e-6
        got = m.matmul(x, activations=act)
        assert got.shape == (k, w.shape[0]) and got.dtype == np.float32
        assert np.all(np.abs(got - want) <= tol), f"{fmt} activations={act}"
        if act == default:
            np.testing.assert_array_equal(m.matmul(x), got)
        # A matvec is a matmul row bit for bit, but where it gathers (AVX2 sparse int8, int4): the same integer
        # sums, added in other f32 lanes than the expansion's.
        gathers = k > 1 and act != "f32" and "gather" in m.kernel(activations=act)
        for a in range(k):
            row = m.matvec(x[a], activations=act)
            if gathers:
                assert np.all(np.abs(row - want[a]) <= tol[a]), f"{fmt} activations={act}: matvec"
            else:
                np.testing.assert_array_equal(row, got[a])  # bit for bit


def group_absmax(w, g):
    """max|w| of each weight's column group, broadcast to w's shape."""
    out = np.zeros_like(w)
    for c0 in range(0, w.shape[1], g):
        out[:, c0 : c0 + g] = np.max(np.abs(w[:, c0 : c0 + g]), axis=1, keepdims=True)
    return out


def quantize_activations(x, token=False):
    """x̂ of activations="int8": per 64-column block, s = max|x|/127, x̂ = s·round_half_away(x/s), in float32.
    With `token` ("int8-token"), s is one per row."""
    xh = np.zeros_like(x)
    for c0 in range(0, x.shape[1], 64):
        blk = x[:, c0 : c0 + 64]
        amax = np.max(np.abs(x if token else blk), axis=1)
        s = (amax / np.float32(127)).astype(np.float32)[:, None]
        with np.errstate(divide="ignore"):
            inv = np.where(s > 0, np.float32(1) / s, np.float32(0)).astype(np.float32)
        v = np.clip(blk * inv, -127, 127)
        t = np.trunc(v)
        code = (t + np.sign(v) * (np.abs(v - t) >= 0.5)).astype(np.float32)
        xh[:, c0 : c0 + 64] = s * code
        # x/s is rounded to f32 before the code is chosen: up to 127·2^-23 of s more than one half.
        assert np.all(np.abs(xh[:, c0 : c0 + 64] - blk) <= (B["act_round"] + 2e-5) * s)
    return xh


@pytest.mark.parametrize("fmt,group,asym", VARIANTS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (65, 130), (200, 1000)])
def test_formats_against_numpy(isa, fmt, group, asym, shape):
    rng = np.random.default_rng(hash((fmt, group, asym, shape)) % 2**32)
    for density in (0.0, 0.05, 0.3, 1.0):
        check(sparse_matrix(rng, *shape, density), fmt, group, asym, rng)


def edge_masks(rng, rows, chunks):
    """A sparse matrix whose 64-column chunks hold, in each 32-column half, 0, 1, 15, 16, 17, 31 or 32 stored
    weights (every parity of where the second half's values start, full halves after odd ones, halves of
    16-column pieces that are empty or full), so every index path of the sparse expansions is exercised."""
    counts = (0, 1, 15, 16, 17, 31, 32)
    w = np.zeros((rows, 64 * chunks), np.float32)
    for r in range(rows):
        for c in range(chunks):
            for h in range(2):
                # Rows 0-48 of chunk 0 take every pair of counts; later chunks shift them.
                n = counts[(r + c) % 7] if h == 0 else counts[(r // 7 + 2 * c) % 7]
                cols = 64 * c + 32 * h + rng.choice(32, n, replace=False)
                w[r, cols] = rng.standard_normal(n) + np.sign(rng.standard_normal(n))
    return w


@pytest.mark.parametrize("fmt,group", [("sparse-int8", None), ("sparse-int4", None), ("sparse-int4", 32)])
def test_sparse_chunks_at_their_edges(isa, fmt, group):
    rng = np.random.default_rng(7)
    check(edge_masks(rng, 49, 3), fmt, group, False, rng, k=5, layout="rows")


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 260),
    density=st.floats(0.01, 1.0),
    variant=st.sampled_from(VARIANTS),
    k=st.integers(1, 9),
    seed=st.integers(0, 2**31),
)
def test_property_odd_shapes(rows, cols, density, variant, k, seed):
    rng = np.random.default_rng(seed)
    for isa in kernels.available_isas():
        kernels.set_isa(isa)
        try:
            check(sparse_matrix(rng, rows, cols, density), *variant, rng, k=k)
        finally:
            kernels.set_isa(None)


def test_every_isa_agrees_with_scalar_on_a_model_shape():
    rng = np.random.default_rng(1)
    w = sparse_matrix(rng, 512, 2048, 0.3)
    x = rng.standard_normal(2048).astype(np.float32)
    for fmt in kernels.FORMATS:
        m = kernels.pack(w, fmt)
        for act in ("f32", "int8", "int8-token"):
            kernels.set_isa("scalar")
            want = m.matvec(x, activations=act)
            xa = x if act == "f32" else quantize_activations(x[None], token=act == "int8-token")[0]
            mag = np.abs(m.to_dense()) + (
                1.2 * group_absmax(w, kernels.INT4_DEFAULT_GROUP) if fmt in INT4 and act == "int8" else 0
            )
            tol = B["sum_order"] * (mag @ np.abs(xa)) + 1e-6
            for isa in kernels.available_isas():
                kernels.set_isa(isa)
                assert np.all(np.abs(m.matvec(x, activations=act) - want) <= tol), (fmt, isa, act)
        kernels.set_isa(None)


def test_thread_count_does_not_change_results():
    rng = np.random.default_rng(2)
    w = sparse_matrix(rng, 1000, 700, 0.4)
    x = rng.standard_normal((5, 700)).astype(np.float32)
    m = kernels.pack(w, "sparse-int4")
    kernels.set_num_threads(1)
    one = m.matmul(x)
    kernels.set_num_threads(2)
    two = m.matmul(x)
    kernels.set_num_threads(0)
    np.testing.assert_array_equal(one, two)


def test_concurrent_python_threads():
    rng = np.random.default_rng(3)
    mats = [kernels.pack(sparse_matrix(rng, 300, 500, 0.3), f) for f in ("sparse-int8", "dense-bf16")]
    x = rng.standard_normal(500).astype(np.float32)
    want = [m.matvec(x) for m in mats]
    errors = []

    def work(i):
        for _ in range(50):
            if not np.array_equal(mats[i % 2].matvec(x), want[i % 2]):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_sizes_and_copy():
    rng = np.random.default_rng(4)
    w = sparse_matrix(rng, 256, 2048, 0.3)
    packed = {f: kernels.pack(w, f) for f in kernels.FORMATS}
    sizes = {f: m.nbytes / w.size for f, m in packed.items()}
    d = np.count_nonzero(w) / w.size
    assert sizes["dense-f32"] == pytest.approx(4.0, abs=0.01)
    assert sizes["dense-int8"] == pytest.approx(1.0, abs=0.01)
    # Where the matvec gathers (AVX2), it reads a position byte per value and a count per chunk, not masks.
    gathers = "gather" in packed["sparse-int8"].kernel()
    assert sizes["sparse-int8"] == pytest.approx(2 * d + 1 / 64 if gathers else d + 1 / 8, abs=0.02)
    # int4 scales are f16 (two bytes per group), as Q4_0 keeps them. Where the matvec gathers (AVX2), it reads a
    # byte per value (its code and column) and a count per 16 columns, not nibbles and masks.
    gathers4 = "gather" in packed["sparse-int4"].kernel()
    values4 = d + 1 / 16 if gathers4 else d / 2 + 1 / 8
    assert sizes["sparse-int4"] == pytest.approx(values4 + 2 / kernels.INT4_DEFAULT_GROUP, abs=0.02)
    m = kernels.pack(w, "sparse-int4")
    c = m.copy()
    assert c.nbytes == m.nbytes and np.array_equal(c.to_dense(), m.to_dense())
    assert "sparse-int4" in repr(m)


BAD_PACK = [
    (np.ones((4, 4)), "float32"),  # float64
    (np.ones((4, 4), np.int8), "float32"),
    (np.ones(4, np.float32), "2-D"),
    (np.ones((2, 2, 2), np.float32), "2-D"),
    (np.ones((0, 4), np.float32), "empty"),
    (np.ones((8, 8), np.float32)[:, ::2], "contiguous"),
    (np.array([[1.0, np.nan]], np.float32), "non-finite"),
    (np.array([[1.0, np.inf]], np.float32), "non-finite"),
    ([[1.0, 2.0]], "float32"),
]


@pytest.mark.parametrize("w,msg", BAD_PACK)
def test_bad_weights_raise_clear_errors(w, msg):
    with pytest.raises(InvalidInputError, match=msg):
        kernels.pack(w, "sparse-int8")


@pytest.mark.parametrize(
    "fmt,group",
    [("sparse-int8", None), ("sparse-int8", 32), ("sparse-int4", 128), ("dense-int8", None), ("dense-int4", 32)],
)
@pytest.mark.parametrize("layout", ["rows", "tiles"])
def test_both_layouts_on_every_isa(isa, fmt, group, layout):
    """Tiles (16 rows interleaved per 4 columns) and rows decode to the same weights and pass the same
    checks on every path: VNNI reads tiles, the rest a row-layout twin."""
    rng = np.random.default_rng(5)
    w = sparse_matrix(rng, 37, 300, 0.3)  # a partial last tile
    check(w, fmt, group, False, rng, layout=layout)
    other = "rows" if layout == "tiles" else "tiles"
    a, b = (kernels.pack(w, fmt, group_size=group, layout=lay) for lay in (layout, other))
    np.testing.assert_array_equal(a.to_dense(), b.to_dense())


def test_bad_options_and_activations_raise_clear_errors():
    w = np.ones((4, 8), np.float32)
    with pytest.raises(InvalidInputError, match="layout"):
        kernels.pack(w, "sparse-int8", layout="columns")
    with pytest.raises(InvalidInputError, match="tiled layout"):
        kernels.pack(w, "dense-f32", layout="tiles")
    with pytest.raises(InvalidInputError, match="tiled layout"):
        kernels.pack(w, "dense-int4", asymmetric=True, layout="tiles")
    with pytest.raises(InvalidInputError, match="unknown format"):
        kernels.pack(w, "sparse-int3")
    with pytest.raises(InvalidInputError, match="group_size"):
        kernels.pack(w, "dense-int8", group_size=48)
    with pytest.raises(InvalidInputError, match="group_size"):
        kernels.pack(w, "dense-f32", group_size=32)
    with pytest.raises(InvalidInputError, match="asymmetric"):
        kernels.pack(w, "sparse-int8", asymmetric=True)
    m = kernels.pack(w, "dense-int8")
    for x, msg in [
        (np.ones(7, np.float32), "8 columns"),
        (np.ones(8), "float32"),
        (np.ones((1, 8), np.float32), "1-D"),
        (np.ones(16, np.float32)[::2], "contiguous"),
        (np.array([np.nan] * 8, np.float32), "non-finite"),
        (np.ones(0, np.float32), "empty"),
    ]:
        with pytest.raises(ValueError, match=msg):
            m.matvec(x)
    with pytest.raises(InvalidInputError, match="activations"):
        m.matvec(np.ones(8, np.float32), activations="int4")
    with pytest.raises(InvalidInputError, match="columns"):
        m.matmul(np.ones((2, 9), np.float32))
    with pytest.raises(InvalidInputError, match="empty"):
        m.matmul(np.ones((0, 8), np.float32))


def test_isa_selection():
    assert kernels.available_isas()[0] == "scalar"
    with pytest.raises(InvalidInputError, match="unknown ISA"):
        kernels.set_isa("sse9")
    for isa in ("avx2", "avx512"):
        if isa not in kernels.available_isas():
            with pytest.raises(UnsupportedError):
                kernels.set_isa(isa)
    kernels.set_isa("scalar")
    assert kernels.active_isa() == "scalar" and sparseinfer.build_info()["isa"] == "scalar"
    kernels.set_isa(None)
    assert kernels.active_isa() == kernels.available_isas()[-1]


def test_build_info():
    info = sparseinfer.build_info()
    assert info["version"] == sparseinfer.__version__
    assert info["profile"] in ("release", "debug")
    assert info["isa"] in info["available_isas"]
    assert isinstance(info["cpu_features"], list) and info["threads"] >= 1


def test_bandwidth_probe():
    assert kernels.measure_read_bandwidth(nbytes=1 << 22, repeats=2) > 0
    probe = kernels.BandwidthProbe(1 << 22)
    assert probe.nbytes == 1 << 22
    # Whole 8-byte words, at least 32 KiB.
    assert kernels.BandwidthProbe(0).nbytes == 32768 and kernels.BandwidthProbe((1 << 20) + 7).nbytes == 1 << 20
    assert all(probe.measure(repeats=1) > 0 for _ in range(2))
    assert probe.measure(threads=1, repeats=2) > 0
