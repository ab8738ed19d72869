"""The CPU's tiled route (implicit GEMM on the package's own AVX-512 / AVX2 micro-kernels): against the
float64 reference with tolerances from each output's own condition, and bit-identical whatever the tile
and chunk sizes, the number of threads and the memory format."""

import os

import pytest
import torch

from mmdcnv2.ops import column_budget, cpu_route, deform_conv2d, deform_conv2d_reference

from test_deform_conv import CASES, grads, make_inputs

U32 = 2.0**-24  # unit roundoff of float32


def _isa_now():
    return torch.ops.mmdcnv2.cpu_tiled_info()[0]


ISAS = [c for c in (2, 1) if _isa_now() >= c]
if not ISAS:
    pytest.skip("the tiled route needs AVX2+FMA or AVX-512 (this CPU has neither)", allow_module_level=True)


class _op_setting:
    """A setting of the extension (an op that sets it and returns the old value) for a with block."""

    def __init__(self, op, value):
        self.op, self.value = op, value

    def __enter__(self):
        self.prev = self.op(self.value)

    def __exit__(self, *exc):
        self.op(self.prev)


def isa_cap(cap):
    """The micro-kernels' ISA capped: 2 AVX-512, 1 AVX2."""
    return _op_setting(torch.ops.mmdcnv2.set_cpu_isa, cap)


def col_panels(mode):
    """The backward's columns in rows (0) or in panels (1) instead of the measured layout (-1)."""
    return _op_setting(torch.ops.mmdcnv2.set_cpu_col_panels, mode)


def backward_split(mode):
    """The backward's work split between the threads by rows (0) or by channels where it can (1, the default)."""
    return _op_setting(torch.ops.mmdcnv2.set_cpu_backward_split, mode)


def _abs_args(args):
    x, off, w, b, s, p, d, m = args
    return x.abs(), off, w.abs(), None if b is None else b.abs(), s, p, d, m


# wide enough for whole micro-tiles (12 x 32 and 6 x 16) in every product, beside the tails of 70 channels; 32
# input channels per conv group: whole panels of one tap each (the weight's packing for the backward goes by them)
CASE_WIDE = (1, 32, 12, 10, 70, 3, 3, 1, 1, 1, 1, 2)
CASE_WIDE_GROUPS = (1, 64, 9, 8, 70, 3, 3, 1, 1, 1, 2, 2)
# channels in whole blocks of 64 per deform group: the backward may give each thread its own channels (2 threads: 64
# and 128 channels; 3 threads: 64 each), and adds a sample's block sums (3 per deform group: their order matters)
# after the threads are done; in 3 deform groups, the 2-thread split's second slice spans two of them
CASE_OWNED = (2, 192, 6, 5, 40, 3, 3, 1, 1, 1, 1, 1)
CASE_OWNED_DG = (1, 192, 5, 6, 24, 3, 3, 1, 1, 1, 1, 3)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("budget", [0, 3 << 10])
@pytest.mark.parametrize("case", CASES + [CASE_WIDE, CASE_WIDE_GROUPS, CASE_OWNED, CASE_OWNED_DG])
def test_tiled_route_against_reference(case, budget, isa):
    """Each value within the rounding bound of a float32 dot product of its length n: |error| <= c n u
    times the same sum over absolute values (for the output: sum |w| |sample| + |b|, computed by the
    reference on |x|, |w|, |b|); the gradients within c n u of the largest gradient of their kind."""
    x, off, w, b, s, p, d, m = make_inputs(case, dtype=torch.float32, offset_scale=2.0)
    ref_args = [t.double() if isinstance(t, torch.Tensor) else t for t in (x, off, w, b, s, p, d, m)]
    out_ref, g_ref = grads(deform_conv2d_reference, *ref_args)
    scale = deform_conv2d_reference(*_abs_args(ref_args))
    N, C, H, W, Cout, kh, kw, *_, groups, dg = case
    n = kh * kw * C // groups + 4  # terms of one output value (+ the bilinear corners and the bias)
    with isa_cap(isa), cpu_route("tiled"), column_budget(budget):
        out, g = grads(deform_conv2d, x, off, w, b, s, p, d, m)
    err = (out.double() - out_ref).abs()
    bound = 4 * n * U32 * scale + 1e-30
    assert (err <= bound).all(), f"output off by {(err / bound).max().item():.2f} bounds"
    terms = {"input": N * Cout * kh * kw, "offset": Cout * C // groups, "weight": N * H * W, "bias": N * H * W}
    for name, a, r in zip(["input", "offset", "weight", "bias", "mask"], g, g_ref):
        t = terms.get(name, Cout * C // groups)
        tol = 8 * (t + 4) * U32 * (r.abs().max().item() + 1e-30) * 4
        torch.testing.assert_close(a.double(), r, atol=tol, rtol=0, msg=lambda e: f"grad {name}: {e}")


CASE_BIG = (3, 24, 13, 11, 20, 3, 3, 1, 1, 1, 1, 2)  # 429 output rows: many tiles and chunks with small budgets
# 40 channels: on an NCHW input the scatter's channel slices of grad_input are one of 40 on 1 thread and 32 + 8 on
# 2 threads (slices of unequal width in the slice-major buffer, which then goes to NCHW planes or channels-last pixels)
CASE_SLICES = (2, 40, 9, 7, 24, 3, 3, 1, 1, 1, 1, 1)


def _all(budget, threads, isa, channels_last=False, mask=True, case=CASE_BIG, panels=-1, split=1):
    torch.manual_seed(0)
    x, off, w, b, s, p, d, m = make_inputs(case, dtype=torch.float32, offset_scale=2.0, mask=mask)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with isa_cap(isa), cpu_route("tiled"), column_budget(budget), col_panels(panels), backward_split(split):
            out, g = grads(deform_conv2d, x, off, w, b, s, p, d, m)
    finally:
        torch.set_num_threads(old)
    return [out.contiguous()] + [t.contiguous() for t in g]


CASES_BITS = [CASE_BIG, CASE_WIDE, CASE_SLICES, CASE_WIDE_GROUPS, CASE_OWNED, CASE_OWNED_DG]
IDS_BITS = ["big", "wide", "slices", "groups", "owned", "owned_dg"]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("case", CASES_BITS, ids=IDS_BITS)
def test_tiled_route_is_bit_identical_across_tiles_threads_and_layouts(isa, mask, case):
    """Tile sizes move rows between whole micro-tiles and masked tails, the backward's columns go in rows or in
    panels of the micro-kernel's width (24 channels: panels across taps; 2 conv groups: panels per group), and its
    threads split the rows or own channels (192 channels: slices of 64 and 128, or 64 each): the kernels must agree bit
    for bit."""
    base = _all(0, 1, isa, mask=mask, case=case, panels=0)
    for budget, threads, cl, panels, split in [
        (0, 2, False, 0, 1),
        (0, 2, False, 0, 0),
        (0, 1, False, 1, 1),
        (1 << 10, 2, False, 1, 1),
        (1 << 10, 3, False, 1, 1),
        (7 << 10, 1, False, 0, 1),
        (40 << 10, 2, True, 1, 1),
        (40 << 10, 2, True, 1, 0),
        (0, 2, False, -1, 1),
    ]:
        other = _all(budget, threads, isa, channels_last=cl, mask=mask, case=case, panels=panels, split=split)
        for i, (a, c) in enumerate(zip(base, other)):
            assert torch.equal(a, c), (
                f"result {i} differs at budget {budget}, {threads} threads, channels_last {cl}, panels {panels}, "
                f"split {split}"
            )


@pytest.mark.skipif(len(ISAS) < 2, reason="needs AVX-512 (to compare with the AVX2 kernels)")
@pytest.mark.parametrize("panels", [0, 1])
@pytest.mark.parametrize("case", CASES_BITS, ids=IDS_BITS)
def test_tiled_route_is_bit_identical_across_isas(case, panels):
    """The AVX-512 and AVX2 kernels run the same chain of fused multiply-adds per value: 24, 40 and 70 channels
    leave runs that the AVX-512 sampling finishes with 256-bit or scalar steps, which must fuse as well; the
    backward's column panels are 32 columns wide for one and 16 for the other."""
    results = [_all(0, 2, cap, case=case, panels=panels) for cap in (2, 1)]
    for i, (a, c) in enumerate(zip(*results)):
        assert torch.equal(a, c), f"result {i} differs between the AVX-512 and the AVX2 kernels"


def test_tiled_route_measures_each_kind_of_call_once():
    x, off, w, b, s, p, d, m = make_inputs((1, 5, 9, 7, 3, 3, 3, 1, 1, 1, 1, 1), dtype=torch.float32)
    with cpu_route("tiled"):
        before = torch.ops.mmdcnv2.cpu_tiled_info()[1]
        grads(deform_conv2d, x, off, w, b, s, p, d, m)
        after_first = torch.ops.mmdcnv2.cpu_tiled_info()[1]
        grads(deform_conv2d, x, off, w, b, s, p, d, m)
        after_second = torch.ops.mmdcnv2.cpu_tiled_info()[1]
    assert after_first == before + 2  # forward and backward, once each
    assert after_second == after_first
    # another image size of the same layer, within a factor of 2 of the output rows (63 -> 56): no new measurement
    x2, off2, w2, b2, s2, p2, d2, m2 = make_inputs((1, 5, 8, 7, 3, 3, 3, 1, 1, 1, 1, 1), dtype=torch.float32)
    with cpu_route("tiled"):
        grads(deform_conv2d, x2, off2, w2, b2, s2, p2, d2, m2)
    assert torch.ops.mmdcnv2.cpu_tiled_info()[1] == after_second


def test_tiled_route_half_types_compute_in_float32():
    x, off, w, b, s, p, d, m = make_inputs((2, 8, 6, 7, 6, 3, 3, 1, 1, 1, 1, 2), dtype=torch.float32)
    with cpu_route("tiled"):
        ref = deform_conv2d(x, off, w, b, s, p, d, m)
        for dt in (torch.float16, torch.bfloat16):
            args = [t.to(dt) for t in (x, off, w, b, m)]
            out = deform_conv2d(args[0], args[1], args[2], args[3], s, p, d, args[4])
            assert out.dtype == dt
            ref_dt = deform_conv2d(*[a.float() for a in args[:4]], s, p, d, args[4].float()).to(dt)
            assert torch.equal(out, ref_dt)
    assert ref.dtype == torch.float32


def test_set_cpu_isa_refuses_bad_values():
    with pytest.raises(ValueError, match="cap"):
        torch.ops.mmdcnv2.set_cpu_isa(0)
    with pytest.raises(ValueError, match="cap"):
        torch.ops.mmdcnv2.set_cpu_isa(5)


def test_backward_splits_by_channels_where_the_channels_come_in_blocks():
    """192 channels (in 1 or 3 deform groups): split by channels on 2 and 3 threads (the bit-identity test compares
    the results with the row split); 1 thread, forced rows, or channels not in whole blocks (32): no channel split."""
    calls = lambda: torch.ops.mmdcnv2.cpu_tiled_info()[3]  # noqa: E731
    isa = ISAS[0]
    for threads, split, case, taken in [
        (2, 1, CASE_OWNED, True),
        (3, 1, CASE_OWNED, True),
        (2, 1, CASE_OWNED_DG, True),
        (1, 1, CASE_OWNED, False),
        (2, 0, CASE_OWNED, False),
        (2, 1, CASE_WIDE, False),
    ]:
        before = calls()
        _all(0, threads, isa, case=case, split=split)
        assert (calls() > before) == taken, (threads, split, case)
    with pytest.raises(ValueError, match="mode"):
        torch.ops.mmdcnv2.set_cpu_backward_split(2)


def test_set_cpu_col_panels_refuses_bad_values():
    for bad in (-2, 2):
        with pytest.raises(ValueError, match="mode"):
            torch.ops.mmdcnv2.set_cpu_col_panels(bad)
    assert torch.ops.mmdcnv2.set_cpu_col_panels(-1) == -1  # left as measured


def test_parallel_loops_are_compiled_for_torchs_openmp():
    """at::parallel_for is a header template: an extension compiled without -fopenmp runs every parallel
    loop of its own on one thread, silently. Where torch's intra-op backend is OpenMP, ours must be too."""
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's intra-op parallelism is not OpenMP here")
    assert torch.ops.mmdcnv2.cpu_tiled_info()[2] == 1
    if not os.path.exists("/proc/self/maps"):
        return
    gomp = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}
    assert len(gomp) <= 1, f"more than one OpenMP runtime loaded: {sorted(gomp)}"


def test_tiled_route_scratch_pool_keeps_results_apart():
    """The route keeps its scratch buffers between calls. With a 1x1 kernel the weight gradient's change of
    layout is a view of the accumulator (where its rows are not padded: channels not a multiple of 64): that
    memory must not go back to the pool, or the next call would overwrite a result the caller holds.
    release_cpu_scratch empties the pool and says what it held."""
    case = (1, 48, 9, 11, 40, 1, 1, 1, 0, 1, 1, 1)
    x, off, w, b, s, p, d, m = make_inputs(case, dtype=torch.float32)
    with cpu_route("tiled"):
        _, g1 = grads(deform_conv2d, x, off, w, b, s, p, d, m)
        kept = [t.clone() for t in g1]
        for k in range(3):  # other weights: other gradients, through buffers of the same sizes
            grads(deform_conv2d, x, off, w * (k + 2), b, s, p, d, m, seed=k + 2)
    for name, a, c in zip(["input", "offset", "weight", "bias", "mask"], g1, kept):
        assert torch.equal(a, c), f"grad {name} changed after later calls"
    torch.ops.mmdcnv2.release_cpu_scratch()
    with cpu_route("tiled"):
        grads(deform_conv2d, *make_inputs((1, 32, 12, 10, 70, 3, 3, 1, 1, 1, 1, 2), dtype=torch.float32))
    assert torch.ops.mmdcnv2.release_cpu_scratch() > 0
    assert torch.ops.mmdcnv2.release_cpu_scratch() == 0


def test_phase_timers_count_what_each_pass_runs(monkeypatch):
    """tools/profile_cpu.py's counters (its COUNTERS names them in the kernel's order): off, nothing is counted;
    on, a forward on a plain (NCHW) input counts its sampling, products, packing and layout copy and none of
    the backward's phases, on a channels-last input no layout copy; a backward counts its own, the weight
    gradient's change of layout included."""
    import importlib

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    tool = importlib.import_module("profile_cpu")
    x, off, w, b, s, p, d, m = make_inputs(CASE_WIDE, dtype=torch.float32, offset_scale=2.0)
    leaves = [t.clone().requires_grad_() for t in (x, off, w, b, m)]
    with cpu_route("tiled"):
        out = deform_conv2d(leaves[0], leaves[1], leaves[2], leaves[3], s, p, d, leaves[4])
        torch.ops.mmdcnv2.set_cpu_profile(True)
        torch.ops.mmdcnv2.set_cpu_profile(False)
        deform_conv2d(x, off, w, b, s, p, d, m)  # not counted
        assert not any(torch.ops.mmdcnv2.cpu_profile())

        torch.ops.mmdcnv2.set_cpu_profile(True)
        deform_conv2d(x, off, w, b, s, p, d, m)
        fwd = dict(zip(tool.COUNTERS, torch.ops.mmdcnv2.cpu_profile()))
        torch.ops.mmdcnv2.set_cpu_profile(True)  # on again: counters from zero
        torch.autograd.grad(out, leaves, torch.ones_like(out))
        bwd = dict(zip(tool.COUNTERS, torch.ops.mmdcnv2.cpu_profile()))
        torch.ops.mmdcnv2.set_cpu_profile(True)
        deform_conv2d(x.contiguous(memory_format=torch.channels_last), off, w, b, s, p, d, m)
        fwd_cl = dict(zip(tool.COUNTERS, torch.ops.mmdcnv2.cpu_profile()))
        torch.ops.mmdcnv2.set_cpu_profile(False)
    assert len(torch.ops.mmdcnv2.cpu_profile()) == len(tool.COUNTERS)
    assert all(fwd[k] > 0 for k in ("sampling", "products", "packing", "layout copies")), fwd
    assert all(fwd[k] == 0 for k in tool.BWD + ["grad_weight layout"]), fwd
    assert all(bwd[k] > 0 for k in tool.BWD + ["packing", "layout copies", "grad_weight layout"]), bwd
    assert all(bwd[k] == 0 for k in tool.FWD), bwd
    # a channels-last input is read in place: packing but no layout copy
    assert fwd_cl["packing"] > 0 and fwd_cl["layout copies"] == 0, fwd_cl


def test_thread_handoff_probe():
    """cpu_thread_handoff_ns: a positive time with two threads (a cache line passed back and forth, so at least a
    few ns and far below a millisecond), -1 with one thread (no partner: no hang), a clear error for bad rounds."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        if torch.get_num_threads() == 2:
            ns = torch.ops.mmdcnv2.cpu_thread_handoff_ns(3)
            # -1 only where the two threads never ran at once (a loaded machine): then nothing to check
            assert ns == -1.0 or 1.0 < ns < 1e6, ns
        torch.set_num_threads(1)
        assert torch.ops.mmdcnv2.cpu_thread_handoff_ns(1) == -1.0
    finally:
        torch.set_num_threads(old)
    for bad in (0, 101):
        with pytest.raises(ValueError, match="rounds"):
            torch.ops.mmdcnv2.cpu_thread_handoff_ns(bad)


@pytest.mark.parametrize("cap", ISAS)
def test_fma_peak_and_profile_report(cap, monkeypatch, capsys):
    """cpu_fma_peak: a positive rate for each micro-kernel ISA, a clear error for a bad duration; tools/profile_cpu.py
    prints it and each product's rate as a share of it."""
    import importlib

    with isa_cap(cap):
        rate = torch.ops.mmdcnv2.cpu_fma_peak(0.01)
    assert 0 < rate < float("inf")
    for bad in (0.0, -1.0, 11.0):
        with pytest.raises(ValueError, match="seconds"):
            torch.ops.mmdcnv2.cpu_fma_peak(bad)
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    tool = importlib.import_module("profile_cpu")
    with isa_cap(cap):
        tool.main(["--shapes", "small", "--reps", "1"])
    out = capsys.readouterr().out
    assert "GFLOP/s per thread (% of the" in out and "multiply-add peak" in out, out
