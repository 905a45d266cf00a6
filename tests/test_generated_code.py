"""What Inductor generates for a reduced site, where the point of the rewrite is speed.

Numerics are checked elsewhere; here the output code of every Inductor compile of one call
(`run_and_get_code` also catches the backend's lazy segment compiles) is read with FileCheck:
attention runs on the reduced lengths, the gathers and the one restoring gather are inlined
into generated kernels (no extern fallback, no extra full-size buffer), and in symmetric mode
the projections run on the reduced tokens. The checks name buffers, not kernels, so they hold
whichever ATen ops the rewrite inserts; each is shown to fail on dense code or a bad variant.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch
from conftest import cogvideox_inputs, run, tiny_cogvideox
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, Schedule, tokens

pytestmark = pytest.mark.inductor

B, H, D = 1, 2, 16  # tiny CogVideoX: batch, heads, head dim (inner dim C = H * D = 32)
N_TEXT, N = 4, 196  # 4 text + 3 * 8 * 8 visual tokens
_SDPA = re.compile(
    r"^\s*(\w+) = torch\.ops\.aten\.(_scaled_dot_product_\w+)\.default\((.*)\)\s*$", re.MULTILINE
)
_MATMUL = re.compile(r"extern_kernels\.(?:addmm|mm)\((.*)\)\s*$", re.MULTILINE)
_EXTERN = re.compile(r"\b((?:torch\.ops|aten|extern_kernels)\.[\w.]+)\(")
# Index ops that would mean a gather / restore ran as an extern (un-fused) kernel.
_INDEX_FALLBACKS = (
    "aten.gather", "aten.scatter", "aten.index", "aten.take", "aten.embedding", "torch.ops.asymrnr",
)


# ---- reading Inductor's output code ---------------------------------------------------------

def _wrapper(code: str) -> str:
    """The body of the Python wrapper's `call` (kernel launches and buffers), comments removed:
    Inductor's "Original ATen: [aten.gather, ...]" comments name ops that were fused."""
    body = code[code.index("def call(self, args):"):]
    body = body[: body.find("\nrunner = ")] if "\nrunner = " in body else body
    return "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("#"))


def _hints(code: str) -> dict[str, int]:
    """Size symbols of dynamic-shape code (`s77 = arg32_1_size[2]`) -> their example value."""
    shapes = {m[1]: m[2] for m in re.finditer(r"^\s*(\w+) = rand_strided\(\(([^)]*)\)", code, re.MULTILINE)}
    out = {}
    for sym, arg, dim in re.findall(r"^\s*(s\d+) = (\w+)_size\[(\d+)\]", code, re.MULTILINE):
        out[sym] = int(shapes[arg].split(",")[int(dim)])
    return out


def _dims(text: str, hints: dict[str, int]) -> tuple[int, ...]:
    """A shape tuple's text; a dimension of dynamic code may be a product of size symbols."""
    def dim(d: str) -> int:
        out = 1
        for term in d.split("*"):
            out *= int(term) if term.strip().isdigit() else hints[term.strip()]
        return out

    return tuple(dim(d) for d in text.split(",") if d.strip())


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated arguments of a call's argument text."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [a for a in [*out, cur.strip()] if a and "=" not in a]


def _shape(arg: str, before: str, hints: dict[str, int], code: str = "") -> tuple[int, ...]:
    """Shape of a wrapper argument: an inline reinterpret_tensor view, a buffer named by its last
    allocation or view in `before`, or an input of `code` (its example in the benchmark harness:
    the backend compiles without size assertions)."""
    if m := re.match(r"reinterpret_tensor\(\w+, \(([^)]*)\)", arg):
        return _dims(m[1], hints)
    made = rf"\b{arg} = (?:empty_strided_cpu\(|reinterpret_tensor\(\w+, )"
    pat = rf"(?:{made}|assert_size_stride\({arg}, )\(([^)]*)\)"
    found = re.findall(pat, before) or re.findall(rf"^\s*{arg} = rand_strided\(\(([^)]*)\)", code, re.MULTILINE)
    assert found, f"no shape for {arg}"
    return _dims(found[-1], hints)


def sdpa_calls(code: str) -> list[dict]:
    """Every attention call: op, result name, q/k/v argument names and shapes, position."""
    hints, body = _hints(code), _wrapper(code)
    calls = []
    for m in _SDPA.finditer(body):
        q, k, v = _split_args(m[3])[:3]
        before = body[: m.start()]
        shapes = [_shape(a, before, hints, code) for a in (q, k, v)]
        calls.append({"op": m[2], "result": m[1], "args": (q, k, v), "shapes": shapes, "pos": m.end()})
    return calls


def index_inputs(code: str) -> dict[int, str]:
    """int64 tensors by their last dimension: graph inputs, and buffers of the wrapper (the
    backend's segments build their plan's index tensors in their own kernels)."""
    inputs = r"^\s*(\w+) = rand_strided\(\(([^)]*)\), [^\n]*dtype=torch\.int64\)"
    buffers = r"^\s*(\w+) = empty_strided_cpu\(\(([^)]*)\), \([^)]*\), torch\.int64\)"
    found = [*re.findall(inputs, code, re.MULTILINE), *re.findall(buffers, _wrapper(code), re.MULTILINE)]
    return {_dims(shape, {})[-1]: name for name, shape in found}


def extern_calls(code: str) -> Counter:
    """Calls the wrapper makes outside generated kernels (ATen fallbacks, extern matmuls, ...)."""
    return Counter(_EXTERN.findall(_wrapper(code)))


def matmul_rows(code: str, k: int, n: int) -> list[int]:
    """Rows M of every extern (M, k) @ (k, n) matmul with M > 1 (token-wise linear layers)."""
    hints, rows = _hints(code), []
    for m in _MATMUL.finditer(_wrapper(code)):
        args = _split_args(m[1])
        a, w = [_dims(re.match(r"reinterpret_tensor\(\w+, \(([^)]*)\)", x)[1], hints)
                if x.startswith("reinterpret_tensor") else None for x in args[1:3]]
        if a is not None and w == (k, n) and a[0] > 1:
            rows.append(a[0])
    return rows


def check_restore_fused(code: str, n_tokens: int, restore_index: str) -> None:
    """The reduced attention output is read by exactly one generated kernel, which also reads the
    restore index and writes the one full-size buffer the output projection then reads: the
    restore is a single gather inlined into the transpose copy the model makes anyway."""
    call = next(c for c in sdpa_calls(code) if c["shapes"][0][2] < n_tokens)
    body = _wrapper(code)
    after = body[call["pos"]:]
    out = re.search(rf"^\s*(\w+) = {call['result']}\[0\]", after, re.MULTILINE)
    out = out[1] if out else call["result"]
    uses = [line.strip() for line in after.splitlines()
            if re.search(rf"\b{out}\b", line) and not re.match(rf"\s*(del |assert_\w+\(|{out} = )", line)]
    assert len(uses) == 1 and uses[0].startswith("cpp_fused_"), f"attention output {out} read by {uses}"
    assert re.search(rf"\b{restore_index}\b", uses[0]), f"the restore index is not read by {uses[0]}"
    # no fallback op (`torch.ops.*.default(`) nor other extern call from attention to the output projection
    attention = f"{call['result']} = torch.ops.aten.{call['op']}.default("
    FileCheck().check(attention).check_not(".default(").check_not("extern_kernels.").check(uses[0]).check_not(
        ".default(").check("extern_kernels.").run(body)
    projection = re.search(r"extern_kernels\.\w+\(.*out=(\w+)\)", after)
    region = after[: projection.start()]
    # buffers allocated here, or earlier ones reused (a whole graph's memory planning reuses them)
    allocated = re.findall(r"(\w+) = (?:empty_strided_cpu\(|reinterpret_tensor\(\w+, )\(([^)]*)\).*# reuse$"
                           r"|(\w+) = empty_strided_cpu\(\(([^)]*)\)", region, re.MULTILINE)
    allocated = [(a or c, b or d) for a, b, c, d in allocated]
    hints = _hints(code)
    full = [(name, shape) for name, shape in allocated  # (not the matmul's own output buffer)
            if name != projection[1] and math.prod(_dims(shape, hints)) == B * n_tokens * H * D]
    assert len(full) == 1, f"full-size buffers between attention and output projection: {full}"


def check_gathers_fused(code: str, call: dict, keep: dict[int, str]) -> None:
    """Each reduced q / k / v buffer of the attention is written by a generated kernel that reads
    the plan's keep index of its length (the gather is inlined into that kernel)."""
    body = _wrapper(code)
    before = body[: body.index(f"{call['result']} = torch.ops.aten.{call['op']}")]
    for arg, shape in zip(call["args"], call["shapes"]):
        writer = [ln.strip() for ln in before.splitlines() if re.match(rf"\s*cpp_fused_\w+\(.*\b{arg}\b", ln)]
        assert writer, f"{arg} {shape} is not written by a generated kernel"
        FileCheck().check_regex(rf"cpp_fused_\w+\(.*\b{keep[shape[2]]}\b").run(writer[-1])


# ---- compiled code of the tiny CogVideoX -----------------------------------------------------

@pytest.fixture(scope="module")
def asymmetric():
    """Block 0 reduced (q 0.5, kv 0.3), block 1 dense: one call, prologue + two site segments
    (cut at sites: the uncut graph would be one program)."""
    torch._dynamo.reset()
    cfg = AsymRnRConfig(schedule=Schedule(q=torch.tensor([[0.5], [0.0]]), kv=torch.tensor([[0.3], [0.0]])),
                        segments="sites")
    model = asymrnr_fx.compile(tiny_cogvideox(), cfg)
    _, codes = run_and_get_code(run, model, cogvideox_inputs(), 900.0)
    torch._dynamo.reset()
    return codes, model.asymrnr


@pytest.fixture(scope="module")
def symmetric():
    torch._dynamo.reset()
    cfg = AsymRnRConfig(q_ratio=0, kv_ratio=0, h_ratio=0.3)
    model = asymrnr_fx.compile(tiny_cogvideox(num_layers=1), cfg)
    _, codes = run_and_get_code(run, model, cogvideox_inputs(), 900.0)
    torch._dynamo.reset()
    return codes, model.asymrnr


def _expected_attention_lengths(rt) -> list[tuple[int, int, int]]:
    (lengths,) = rt.used_lengths.values()
    n_text = {s.path: s.layout.n_text for s in rt.info.sites}
    return sorted((nq + n_text[p], nkv + n_text[p], nkv + n_text[p]) for p, (nq, nkv) in lengths.items())


def test_reduced_segment_attends_on_reduced_lengths_dense_segment_on_full(asymmetric):
    codes, rt = asymmetric
    calls = [c for code in codes for c in sdpa_calls(code)]
    got = sorted(tuple(s[2] for s in c["shapes"]) for c in calls)
    want = _expected_attention_lengths(rt)
    assert want == [(100, 138, 138), (N, N, N)]  # (96, 134) visual tokens kept at block 0; block 1 dense
    assert got == want
    assert all(s[:2] == (B, H) and s[3] == D for c in calls for s in c["shapes"])
    reduced = next(code for code in codes for c in sdpa_calls(code) if c["shapes"][0][2] == 100)
    FileCheck().check("(1, 2, 100, 16)").check("(1, 2, 138, 16)").check(
        "_scaled_dot_product_flash_attention_for_cpu.default(").run(_static_shapes(reduced))


def _static_shapes(code: str) -> str:
    """The wrapper with size symbols replaced by their example values (a no-op for static code)."""
    hints = _hints(code)
    return re.sub(r"\bs\d+\b", lambda m: str(hints.get(m[0], m[0])), _wrapper(code))


def test_restore_is_one_gather_inlined_into_the_output_transpose(asymmetric):
    codes, _ = asymmetric
    (reduced,) = [code for code in codes if any(c["shapes"][0][2] < N for c in sdpa_calls(code))]
    check_restore_fused(reduced, N, index_inputs(reduced)[N])


def test_query_key_value_gathers_are_inlined_into_generated_kernels(asymmetric):
    codes, _ = asymmetric
    (reduced,) = [code for code in codes if any(c["shapes"][0][2] < N for c in sdpa_calls(code))]
    (call,) = sdpa_calls(reduced)
    check_gathers_fused(reduced, call, index_inputs(reduced))


def test_rewrite_adds_no_extern_call(asymmetric):
    """The reduced segment calls nothing outside generated kernels that the dense one does not,
    but for the matching it computes on the window's first call (its score matmuls and the
    stable sort; the reusing program has neither: the uncut graph's test checks it): its other
    externs are the matmuls and the attention itself."""
    codes, _ = asymmetric
    by_kind = {sdpa_calls(code)[0]["shapes"][0][2] < N: code for code in codes if sdpa_calls(code)}
    reduced, dense = by_kind[True], by_kind[False]
    matching = {"extern_kernels.baddbmm", "torch.ops.aten.sort.stable"}
    assert set(extern_calls(reduced)) - set(extern_calls(dense)) == matching, extern_calls(reduced)
    assert extern_calls(reduced)["torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default"] == 1
    for code in codes:
        check = FileCheck()
        for name in _INDEX_FALLBACKS:
            check = check.check_not(name)
        check.run(_wrapper(code))


def test_segments_compile_for_static_shapes(asymmetric, symmetric):
    """A variant is compiled for one (q, kv) length pair: its code should be specialised on those
    lengths, not dynamic code that reads sizes from its inputs at run time."""
    for code in [*asymmetric[0], *symmetric[0]]:
        FileCheck().check_not("_size[").run(_wrapper(code))


def test_symmetric_projections_run_on_reduced_tokens(symmetric, asymmetric):
    codes, rt = symmetric
    ((n_keep, _),) = next(iter(rt.used_lengths.values())).values()
    rows = [r for code in codes for r in matmul_rows(code, H * D, H * D)]
    assert n_keep == 134 and rows == [N_TEXT + n_keep] * 4  # to_q, to_k, to_v, to_out.0
    projection = rf"extern_kernels\.addmm\(\w+, reinterpret_tensor\(\w+, \({N_TEXT + n_keep}, 32\)"
    FileCheck().check_regex(projection).check_regex(projection).check_regex(projection).check(
        "_scaled_dot_product_flash_attention_for_cpu.default(").check_regex(projection).run(
        _static_shapes(codes[-1]))
    # the same check on asymmetric code (which reduces after the projections) sees full-length ones
    assert [r for code in asymmetric[0] for r in matmul_rows(code, H * D, H * D)] == [N] * 8


# ---- the checks fail on a bad variant --------------------------------------------------------

@torch.library.custom_op("asymrnr_test::opaque_gather", mutates_args=())
def _opaque_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tokens.gather_tokens` hidden from Inductor: it can only call it as an extern kernel."""
    return tokens.gather_tokens(x, index)


@_opaque_gather.register_fake
def _(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*index.shape, x.shape[-1])


def _attention_block(gather):
    """A reduced CogVideoX attention from the Q/K/V heads to the output projection."""
    def block(q, k, v, q_keep, kv_keep, restore_index, w):
        sdpa = torch.nn.functional.scaled_dot_product_attention
        out = sdpa(gather(q, q_keep), gather(k, kv_keep), gather(v, kv_keep))
        out = gather(out, restore_index).transpose(1, 2).reshape(B, N, H * D)
        return torch.nn.functional.linear(out, w)
    return block


def test_fusion_checks_fail_on_extern_gathers():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    index = [torch.randint(0, n_in, (B, H, n), generator=g) for n_in, n in ((N, 100), (N, 138), (100, N))]
    args = (q, k, v, *index, torch.randn(H * D, H * D, generator=g))
    codes = {}
    for name, gather in (("good", tokens.gather_tokens), ("extern", _opaque_gather)):
        fn = torch.compile(_attention_block(gather), backend="inductor", dynamic=False)
        _, (codes[name],) = run_and_get_code(fn, *args)
    torch._dynamo.reset()
    good, bad = codes["good"], codes["extern"]
    check_restore_fused(good, N, index_inputs(good)[N])
    check_gathers_fused(good, sdpa_calls(good)[0], index_inputs(good))
    with pytest.raises(AssertionError, match="attention output .* read by .*opaque_gather"):
        check_restore_fused(bad, N, index_inputs(bad)[N])
    with pytest.raises(AssertionError, match="not written by a generated kernel"):
        check_gathers_fused(bad, sdpa_calls(bad)[0], index_inputs(bad))
    with pytest.raises(RuntimeError, match="Expected to not find"):  # FileCheck's failure
        FileCheck().check_not("torch.ops.asymrnr").run(_wrapper(bad))


# ---- eager matching between segments ---------------------------------------------------------

def test_matching_never_materialises_more_scores_than_max_match_elements(monkeypatch):
    """The eager (B, H, Ns, Nd) score matrix is built at most `max_match_elements` at a time; here
    the whole matrix (1 * 2 * 160 * 32 = 10240 per feature) is ten times the bound."""
    from torch.utils._python_dispatch import TorchDispatchMode

    limit, sizes = 1000, []

    class RecordMatmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.baddbmm, torch.ops.aten.bmm, torch.ops.aten.mm,
                                       torch.ops.aten.addmm, torch.ops.aten.matmul, torch.ops.aten.cdist):
                sizes.append(out.numel())
            return out

    real = tokens.match_sources
    whole = []

    def recorded(x, dst, src, **kw):
        whole.append(x.shape[0] * x.shape[1] * src.numel() * dst.numel())
        with RecordMatmuls():
            return real(x, dst, src, **kw)

    monkeypatch.setattr(tokens, "match_sources", recorded)
    cfg = AsymRnRConfig(q_ratio=0.5, kv_ratio=0.3, max_match_elements=limit, compiler="eager")
    model = asymrnr_fx.compile(tiny_cogvideox(num_layers=1), cfg)
    run(model, cogvideox_inputs(), 900.0)
    assert whole == [2 * 160 * 32] * 2 and model.asymrnr.stats["matchings"] == 2  # q and v
    assert sizes and max(sizes) <= limit, sizes
    assert sum(sizes) == sum(whole)  # every score computed once, in chunks


def test_compiled_matching_never_materialises_more_scores_than_max_match_elements():
    """The same bound in the compiled matching program the symmetric mode runs between segments
    (one matching on the batch mean of the hidden state): every score matmul of its code writes
    at most `max_match_elements`, and together they cover the whole matrix once. (Asymmetric
    segments match inside their own program: see the uncut graph's test below.)"""
    limit, whole = 1000, 160 * 32
    torch._dynamo.reset()
    cfg = AsymRnRConfig(q_ratio=0.0, kv_ratio=0.0, h_ratio=0.5, max_match_elements=limit)
    model = asymrnr_fx.compile(tiny_cogvideox(num_layers=1), cfg)
    _, codes = run_and_get_code(run, model, cogvideox_inputs(), 900.0)
    torch._dynamo.reset()
    (matching,) = [code for code in codes if "aten.sort" in code]
    body = _wrapper(matching)
    sizes = []
    for op, args in re.findall(r"extern_kernels\.(baddbmm|bmm)\((.*)\)\s*$", body, re.MULTILINE):
        a, b = _split_args(args)[(op == "baddbmm"):][:2]  # (batch, m, k) @ (batch, k, n)
        (batch, m, _), (_, _, n) = (_shape(x, body, {}) for x in (a, b))
        sizes.append(batch * m * n)
    assert len(sizes) > 1 and max(sizes) <= limit and sum(sizes) == whole, sizes


# ---- the uncut graph -------------------------------------------------------------------------

def test_uncut_program_matches_in_chunks_and_reuses_without_scores():
    """The uncut graph (`segments="auto"`): the window's first call is one program that computes
    the matching (its score matmuls bounded by `max_match_elements`, covering the matrix once)
    and attends on the reduced lengths with the restore fused; the reusing call's program has no
    score matmul and no sort, and attends on the same lengths."""
    limit, whole = 1000, 2 * 160 * 32
    torch._dynamo.reset()
    cfg = AsymRnRConfig(q_ratio=0.5, kv_ratio=0.3, max_match_elements=limit, matching_every=2)
    model = asymrnr_fx.compile(tiny_cogvideox(num_layers=1), cfg)
    _, (matching,) = run_and_get_code(run, model, cogvideox_inputs(), 900.0)
    _, (reuse,) = run_and_get_code(run, model, cogvideox_inputs(), 880.0)
    torch._dynamo.reset()
    assert model.asymrnr.stats["segments"] == 1 and model.asymrnr.stats["compiles"] == 2
    for code in (matching, reuse):
        (call,) = sdpa_calls(code)
        assert [s[2] for s in call["shapes"]] == [N_TEXT + 96, N_TEXT + 134, N_TEXT + 134]
        check_restore_fused(code, N, index_inputs(code)[N])
        FileCheck().check_not("_size[").run(_wrapper(code))
    sizes = []
    for op, args in re.findall(r"extern_kernels\.(baddbmm|bmm)\((.*)\)\s*$", _wrapper(matching), re.MULTILINE):
        a, b = _split_args(args)[(op == "baddbmm"):][:2]
        (batch, m, _), (_, _, n) = (_shape(x, _wrapper(matching), {}) for x in (a, b))
        sizes.append(batch * m * n)
    # q and v each: the attention's own matmuls are in the SDPA call, not bmm
    assert len(sizes) > 2 and max(sizes) <= limit and sum(sizes) == 2 * whole, sizes
    assert "aten.sort" in matching
    FileCheck().check_not("aten.sort").check_not("extern_kernels.bmm").check_not("extern_kernels.baddbmm").run(
        _wrapper(reuse))
