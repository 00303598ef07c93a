"""Compile the routing, MoD token-movement and grouped-matmul kernels for sm_90 (H100) without a GPU.

The CPU test suite runs kernels under Triton's interpreter, which accepts some programs the
GPU compiler rejects; this compiles each variant to a cubin, so such errors show on CI.
Usage: python scripts/compile_check.py   (exit status 1 if any variant fails)
"""
import os
import re
import sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
import importlib

from flopwise.kernels import mod_gather as M
from flopwise.kernels import routing as R

G = importlib.import_module("flopwise.kernels.grouped_mm")
target = GPUTarget("cuda", 90, 32)
SM90_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
FAILED = []

def sig_of(fn, types, consts):
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in consts: sig[n] = "constexpr"
        else: sig[n] = types.get(n, "i32")
    return sig

# What the JIT specialises at launch for real shapes: 16-byte aligned pointers and integer
# arguments divisible by 16 (strides, K, N). Without these hints no load is vectorised and
# the software pipeliner leaves the GEMM loops synchronous.
ALIGNED_INTS = {"D", "stride_r", "stride_o", "stride_am", "stride_be", "stride_bk", "stride_bn", "stride_om", "stride_gm", "stride_de", "stride_dk", "K", "N"}


def _ptxas_numbers(ptx: str) -> tuple[int | None, int | None] | None:
    """(registers, spill-store bytes) per thread from ptxas -v (sm_90a), where a ptxas that
    reads this PTX version ships with Triton; None otherwise."""
    import subprocess
    import tempfile
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        exe = os.path.join(bindir, name)
        if not os.path.exists(exe):
            continue
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            r = subprocess.run([exe, "-arch=sm_90a", "-v", path, "-o", os.devnull], capture_output=True, text=True)
        if r.returncode == 0:
            regs = re.findall(r"Used (\d+) registers", r.stderr)
            spill = re.findall(r"(\d+) bytes spill stores", r.stderr)
            return (int(regs[0]) if regs else None), (int(spill[0]) if spill else None)
    return None


def _main_loop_spills(ptx: str) -> int | None:
    """Spill stores and loads in the tensor-core main loops of the sm_90a code
    (``_mma_loop_spills`` on nvdisasm's listing); None without ptxas and nvdisasm. A
    persistent kernel keeps per-tile state across its tile loop, and a spill there costs once
    per tile; in a main loop, every step."""
    import subprocess
    import tempfile
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    exes = [os.path.join(bindir, n) for n in ("ptxas-blackwell", "nvdisasm")]
    if not all(os.path.exists(e) for e in exes):
        return None
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(ptx)
        r = subprocess.run([exes[0], "-arch=sm_90a", os.path.join(d, "k.ptx"), "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return None
        sass = subprocess.run([exes[1], "-c", os.path.join(d, "k.cubin")], capture_output=True, text=True).stdout
    return _mma_loop_spills(sass)


def _mma_loop_spills(sass: str) -> int:
    """STL and LDL instructions inside the innermost loops (a branch back to an earlier
    label) that hold an HGMMA, in an nvdisasm listing."""
    labels, code = {}, []  # label -> index of the next instruction; instructions in order
    for line in sass.splitlines():
        m = re.match(r"^(\.L_x_\d+):", line.strip())
        if m:
            labels[m.group(1)] = len(code)
        elif re.match(r"^/\*[0-9a-f]+\*/", line.strip()):
            code.append(line)
    loops = []  # (first, last) instruction of each loop
    for i, line in enumerate(code):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), len(code)) <= i:
            loops.append((labels[m.group(1)], i))
    mma = [(a, b) for a, b in loops if any("HGMMA" in code[j] for j in range(a, b + 1))]
    inner = [(a, b) for a, b in mma if not any((c, d) != (a, b) and a <= c and d <= b for c, d in mma)]
    return sum(1 for a, b in inner for j in range(a, b + 1) if re.search(r"\b(STL|LDL)\b", code[j]))


def _ptxas_report(ptx: str) -> str:
    """Registers and spill bytes per thread (``_ptxas_numbers``) as report text; '' without
    a ptxas. Spills in a GEMM epilogue cost local memory traffic once per tile; in the main
    loop, every step."""
    nums = _ptxas_numbers(ptx)
    if nums is None:
        return ""
    regs, spill = nums
    return f", registers {'?' if regs is None else regs}, spill stores {'?' if spill is None else spill} B"


def _loop_overlap(ttgir: str) -> list[tuple[int, int]]:
    """Per tensor-core main loop: (copies the top-of-step wait leaves in flight, MMA groups
    the step leaves in flight). 0 copies: each step waits for every copy it issued, so only
    one step's MMA hides a copy's latency (a gathered row index in the loop does this at 3-4
    stages); 0 MMA groups: every step drains the tensor cores (two dots chained on one
    accumulator in one step do this)."""
    loops, stack, depth = [], [], 0  # open loops: (depth inside their body, record)
    for line in ttgir.splitlines():
        opens = "scf.for" in line
        depth += line.count("{") - line.count("}")  # attribute dicts balance on their line
        if opens:
            stack.append((depth, {"copies": [], "mma": [], "dot": False}))
            continue
        if stack:
            cur = stack[-1][1]  # ops belong to the innermost open loop
            if "ttg.async_wait" in line:
                cur["copies"] += [int(n) for n in re.findall(r"num = (\d+)", line)]
            if "warp_group_dot_wait" in line:
                cur["mma"] += [int(n) for n in re.findall(r"pendings = (\d+)", line)]
            if "ttng.warp_group_dot " in line:
                cur["dot"] = True
        while stack and depth < stack[-1][0]:  # the loop's region closed on this line
            cur = stack.pop()[1]
            if cur["dot"]:
                loops.append((min(cur["copies"], default=0), min(cur["mma"], default=0)))
    return loops


SM90_SM_SHARED = 233472  # bytes of shared memory per SM (228 KiB), shared by its resident blocks
SM90_SM_REGISTERS = 65536


def comp(fn, types, consts, num_warps=4, label="", pipelined=False, vectorized=False, num_stages=3,
         ptxas=False, may_not_fit=False, tma=False, per_sm=0, no_atomics=False, tuner_only=False):
    """Compile one variant for sm_90 and check it. ``per_sm``: a persistent launch's programs
    per SM; they must fit on one SM together (shared memory and registers), and any spill
    must stay out of the tensor-core main loops. ``no_atomics``: a deterministic-mode
    variant, whose PTX must hold no atomic instruction. ``tuner_only``: an autotuner
    candidate, never a default: a spill in its main loop is reported ("timed by the tuner"),
    not failed, since the tuner keeps a candidate only if it is the fastest; whether a tile
    spills depends on the Triton release (tests/kernels/test_compile_sm90.py fails on it for
    the releases the candidates were chosen with)."""
    if fn is G._grouped_mm_fwd_kernel:  # weights through pointers, not persistent, atomic router gradient, unless a case says otherwise
        consts = dict(dict(B_TMA=False, B_TRANS=False, PERSISTENT=False, DW_PARTIAL=False), **consts)
        if not consts["B_TMA"]:
            consts.update(b_desc=None, b2_desc=None)
    sig = sig_of(fn, types, consts)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or (n in ALIGNED_INTS and sig[n] != "constexpr")}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    try:
        k = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
        ptx = k.asm["ptx"]
        # triton.compile does not check the card's limit (Triton raises OutOfResources when
        # the kernel is loaded): compare with H100's 227 KiB per block here
        if k.metadata.shared > SM90_SHARED:
            if may_not_fit:
                print("left out (does not fit)", fn.__name__, label, f"shared memory {k.metadata.shared}")
                return
            FAILED.append(fn.__name__ + " (" + label + f": {k.metadata.shared} B of shared memory)")
            print("FAIL", fn.__name__, label, f"needs {k.metadata.shared} B of shared memory, over {SM90_SHARED}")
            return
        info = f"shared memory {k.metadata.shared}, wgmma {ptx.count('wgmma.mma_async')}, cp.async {ptx.count('cp.async.cg') + ptx.count('cp.async.ca')}"
        if pipelined or ptxas:
            info += _ptxas_report(ptx)
        loads = [line for line in ptx.splitlines() if "ld.global" in line]
        if vectorized and not any(".v4." in line for line in loads):
            v4 = [line.strip() for line in loads][:3]
            FAILED.append(fn.__name__ + " (" + label + ": row loads not 128-bit)")
            print("FAIL", fn.__name__, label, "row loads not vectorised:", v4)
            return
        # operand tiles must move in 16-byte copies; the few narrower ones are row-index loads,
        # at most a few per pipeline stage (an unvectorised operand tile gives dozens per stage)
        narrow = len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*,\s*0x(?:1|2|4|8),", ptx))
        if pipelined and narrow > 4 * num_stages:
            FAILED.append(fn.__name__ + " (" + label + f": {narrow} narrow async copies)")
            print("FAIL", fn.__name__, label, f"{narrow} async copies narrower than 16 bytes:", info)
            return
        if no_atomics and re.search(r"\b(atom|red)\.", ptx):
            FAILED.append(fn.__name__ + " (" + label + ": atomics in a deterministic variant)")
            print("FAIL", fn.__name__, label, "atomic instructions in a deterministic-mode variant")
            return
        if tma and "cp.async.bulk.tensor" not in ptx:
            FAILED.append(fn.__name__ + " (" + label + ": no TMA copy)")
            print("FAIL", fn.__name__, label, "descriptor loads did not become TMA copies:", info)
            return
        if tma:
            info += f", TMA copies {ptx.count('cp.async.bulk.tensor')}"
        if per_sm:
            nums = _ptxas_numbers(ptx)
            regs, spill = nums if nums is not None else (None, None)
            threads = 32 * num_warps
            info += f", {per_sm} per SM: shared memory {per_sm * k.metadata.shared} of {SM90_SM_SHARED}"
            if regs is not None:
                info += f", registers {per_sm * regs * threads} of {SM90_SM_REGISTERS}"
            if per_sm * k.metadata.shared > SM90_SM_SHARED or (regs is not None and per_sm * regs * threads > SM90_SM_REGISTERS):
                FAILED.append(fn.__name__ + " (" + label + f": {per_sm} programs do not fit on one SM)")
                print("FAIL", fn.__name__, label, f"{per_sm} programs per SM do not fit:", info)
                return
            loop_spills = _main_loop_spills(ptx) if "wgmma" in ptx else 0
            if spill:
                info += f", main-loop spill instructions {'?' if loop_spills is None else loop_spills}"
            if spill and loop_spills and tuner_only:  # reported; the checks below still apply
                print("spills in a main loop (timed by the tuner)", fn.__name__, label, info)
            elif spill and loop_spills:  # None: no nvdisasm to locate them (reported as '?')
                FAILED.append(fn.__name__ + " (" + label + f": spills in a main loop)")
                print("FAIL", fn.__name__, label, "spills in a main loop:", info)
                return
        if pipelined and "cp.async" not in ptx:
            FAILED.append(fn.__name__ + " (" + label + ": main loop not software-pipelined)")
            print("FAIL", fn.__name__, label, "not pipelined:", info)
            return
        if pipelined and "wgmma" in ptx:
            loops = _loop_overlap(k.asm["ttgir"])
            info += f", loops (copies, MMA groups in flight) {loops}"
            if not loops or any(c == 0 or m == 0 for c, m in loops):
                FAILED.append(fn.__name__ + " (" + label + ": a main loop without overlap)")
                print("FAIL", fn.__name__, label, "a main loop drains its copies or its MMAs every step:", info)
                return
        print("ok  ", fn.__name__, label, info)
    except Exception as e:
        FAILED.append(fn.__name__)
        print("FAIL", fn.__name__, label, type(e).__name__, str(e)[:1500])

def _descriptor_types(tt: dict, cfg: dict, ep: int, dual: bool) -> tuple[dict, dict]:
    """Argument types and constants of a row-kernel variant: with B_TMA the weights come
    through tensor descriptors (TMA copies, no pointer tiles), read transposed for the
    SwiGLU backward and dX (epilogues 3, 4)."""
    if not cfg.get("B_TMA"):
        return tt, {}
    trans = ep in (3, 4)
    box = [1, cfg["BLOCK_N"], cfg["BLOCK_K"]] if trans else [1, cfg["BLOCK_K"], cfg["BLOCK_N"]]
    desc = f"tensordesc<bf16[{box[0]}, {box[1]}, {box[2]}]>"
    two = ep == 1 or dual
    return dict(tt, b_desc=desc, **({"b2_desc": desc} if two else {})), dict(B_TRANS=trans, **({} if two else {"b2_desc": None}))


P = lambda t: "*" + t
# routing
# with a bias: ranked by score + bias (auxiliary-loss-free balancing); grouped: DeepSeek-V3's
# gate (E = 256 in 8 groups, each scored by its best two, sigmoid scores)
for has_bias, group, score, block_e in ((False, 0, 0, 128), (True, 0, 0, 128), (True, 2, 1, 256), (False, 1, 0, 128)):
    comp(R._topk_route_fwd_kernel, {"logits_ptr": P("fp32"), "bias_ptr": P("fp32"), "ids_ptr": P("i32"),
                                    "w_ptr": P("fp32"), "tile_counts_ptr": P("i32")},
         dict(SCORE=score, RENORM=True, HAS_BIAS=has_bias, GROUP_SCORE=group, BLOCK_T=R._tile_tokens(block_e, 8),
              BLOCK_E=block_e, BLOCK_K=8, BLOCK_G=8), label=f"bias={has_bias} group_score={group} E={block_e}")
# plans from caller-given top-k ids (Hugging Face routers give int64)
for ids_t in (P("i64"), P("i32")):
    comp(R._plan_from_topk_fwd_kernel, {"ids_ptr": ids_t, "ids32_ptr": P("i32"), "tile_counts_ptr": P("i32")},
         dict(BLOCK_T=64, BLOCK_E=128), label=f"ids={ids_t[1:]}")
for scan in (R._route_scan_kernel, R._route_scan_checked_kernel):  # the second also sums plan_from_topk's bad ids
    comp(scan, {"tile_counts_ptr": P("i32"), "counts_ptr": P("i32"), "offsets_ptr": P("i32"), "padded_ptr": P("i32")},
         dict(BLOCK_E=64, BLOCK_TILES=64, BLOCK_M=64))
comp(R._route_scatter_kernel, {"ids_ptr": P("i32"), "w_ptr": P("fp32"), "delta_ptr": P("i32"), "token_idx_ptr": P("i32"), "sorted_w_ptr": P("fp32"), "pair_ptr": P("i32"), "inverse_ptr": P("i32"),
                               "offsets_ptr": P("i32"), "padded_ptr": P("i32"), "block_expert_ptr": P("i32"), "block_row_ptr": P("i32")},
     dict(BLOCK_N=1024, BLOCK_E=64, BLOCK_M=64, BLOCK_B=32))
comp(R._topk_route_bwd_kernel, {"logits_ptr": P("fp32"), "ids_ptr": P("i32"), "g_topk_ptr": P("fp32"), "g_sorted_ptr": P("fp32"), "inverse_ptr": P("i32"), "dlogits_ptr": P("fp32")},
     dict(HAS_G_TOPK=True, HAS_G_SORTED=True, SCORE=0, RENORM=True, BLOCK_T=128, BLOCK_E=64))
comp(R._expert_scores_kernel, {"logits_ptr": P("fp32"), "scores_ptr": P("fp32"), "counts_ptr": P("i32"), "offsets_ptr": P("i32"), "padded_ptr": P("i32"), "block_expert_ptr": P("i32"), "block_row_ptr": P("i32")},
     dict(SCORE=0, BLOCK_T=128, BLOCK_E=64, BLOCK_M=64, BLOCK_B=128))
# the selection kernel: MoD scores (bf16) and expert choice's probabilities (fp32, [E, T])
for dt in ("bf16", "fp32"):
    longest = 32768 if dt == "fp32" else 16384  # the launcher's limit by element size
    for single, block, warps in sorted({(True, 4096, 8), (True, 16384, 16), (True, longest, 16), (False, 8192, 16)}):
        comp(R._topk_rows_kernel, {"x_ptr": P(dt), "idx_ptr": P("i32"), "val_ptr": P(dt)}, dict(BLOCK=block, SINGLE=single),
             num_warps=warps, label=f"{dt} single={single} block={block}", ptxas=True)
# MoD token movement (bf16 rows, int32 indices, fp32 router weights)
bf, i32, f32 = P("bf16"), P("i32"), P("fp32")
comp(M._gather_tokens_fwd_kernel, {"x_ptr": bf, "idx_ptr": i32, "out_ptr": bf}, dict(ROWS=2, BLOCK_D=2048),
     vectorized=True)
for base, y, w in [(True, True, True), (False, True, False), (False, False, False)]:
    comp(M._scatter_tokens_fwd_kernel, {"base_ptr": bf, "y_ptr": bf, "w_ptr": f32, "inv_ptr": i32, "out_ptr": bf},
         dict(HAS_BASE=base, HAS_Y=y, HAS_WEIGHT=w, ROWS=2, BLOCK_D=2048), label=f"base={base} y={y} w={w}")
comp(M._scatter_tokens_inplace_kernel, {"res_ptr": bf, "y_ptr": bf, "w_ptr": f32, "idx_ptr": i32}, dict(ROWS=2, BLOCK_D=2048),
     vectorized=True)
for idx_t in (i32, P("i64")):  # the inverse map the dense scatters read
    comp(M._inverse_index_kernel, {"idx_ptr": idx_t, "inv_ptr": i32}, dict(BLOCK=1024), label=f"idx={idx_t[1:]}")
comp(M._scatter_tokens_bwd_kernel, {"grad_ptr": bf, "y_ptr": bf, "w_ptr": f32, "idx_ptr": i32, "dy_ptr": bf, "dw_ptr": f32},
     dict(ROWS=2, BLOCK_D=2048))
comp(M._rmsnorm_gather_tokens_fwd_kernel, {"x_ptr": bf, "idx_ptr": i32, "gamma_ptr": bf, "out_ptr": bf, "eps": "fp32"},
     dict(ROWS=1, BLOCK_D=4096), num_warps=8)
comp(M._rmsnorm_gather_tokens_bwd_kernel, {"grad_ptr": bf, "x_ptr": bf, "idx_ptr": i32, "gamma_ptr": bf, "dx_ptr": bf,
     "dgamma_part_ptr": f32, "eps": "fp32"}, dict(BLOCK_D=4096), num_warps=8)
# The same kernels as the trainer launches them under bf16 autocast and in eval/generation:
# an fp32 residual stream (MoD moves fp32 rows) with int32 (top-k) or int64 (causal
# routing) indices.
for rows, idx in [(f32, i32), (f32, P("i64")), (bf, P("i64"))]:
    lab = f"rows={rows[1:]} idx={idx[1:]}"
    comp(M._gather_tokens_fwd_kernel, {"x_ptr": rows, "idx_ptr": idx, "out_ptr": rows}, dict(ROWS=2, BLOCK_D=1024),
         label=lab)
    comp(M._scatter_tokens_fwd_kernel, {"base_ptr": rows, "y_ptr": rows, "w_ptr": f32, "inv_ptr": i32, "out_ptr": rows},
         dict(HAS_BASE=True, HAS_Y=True, HAS_WEIGHT=True, ROWS=2, BLOCK_D=1024), label=lab)
    comp(M._scatter_tokens_inplace_kernel, {"res_ptr": rows, "y_ptr": rows, "w_ptr": f32, "idx_ptr": idx},
         dict(ROWS=2, BLOCK_D=1024), label=lab)
    comp(M._scatter_tokens_bwd_kernel, {"grad_ptr": rows, "y_ptr": rows, "w_ptr": f32, "idx_ptr": idx, "dy_ptr": rows,
         "dw_ptr": f32}, dict(ROWS=2, BLOCK_D=1024), label=lab)
    comp(M._rmsnorm_gather_tokens_fwd_kernel, {"x_ptr": rows, "idx_ptr": idx, "gamma_ptr": f32, "out_ptr": rows,
         "eps": "fp32"}, dict(ROWS=1, BLOCK_D=1024), num_warps=8, label=lab)
    comp(M._rmsnorm_gather_tokens_bwd_kernel, {"grad_ptr": rows, "x_ptr": rows, "idx_ptr": idx, "gamma_ptr": f32,
         "dx_ptr": rows, "dgamma_part_ptr": f32, "eps": "fp32"}, dict(BLOCK_D=1024), num_warps=8, label=lab)
# grouped mm
base = {"a_ptr": P("bf16"), "a2_ptr": P("bf16"), "a_idx_ptr": P("i32"), "b_ptr": P("bf16"), "b2_ptr": P("bf16"),
        "out_ptr": P("bf16"), "out2_ptr": P("bf16"), "out3_ptr": P("bf16"), "pre_ptr": P("bf16"), "pre2_ptr": P("bf16"),
        "w_ptr": P("fp32"), "dw_ptr": P("fp32"), "tok_ptr": P("i32"), "block_expert_ptr": P("i32"), "block_row_ptr": P("i32"), "offsets_ptr": P("i32")}
# (epilogue 3 without SAVE_PRE: a backward whose down projection is frozen writes no w*h)
for ep, gather, dual, save in [(0, True, False, False), (1, True, False, True), (2, False, False, False), (3, True, False, True),
                               (3, True, False, False), (4, False, True, False)]:
    t = dict(base)
    if ep in (2, 4): t["out_ptr"] = P("fp32")
    # the tiles the launcher picks at Mixtral's shape (K = 4096 or 14336, N = 14336 or 4096)
    cfg = G._tiles(4096, 14336, torch.bfloat16, ep, dual_a=dual)
    w_, s_ = cfg.pop("num_warps"), cfg.pop("num_stages")
    # the weights' unit stride, which the JIT specialises to the constant 1: N for W, K for W^T
    unit = dict(stride_bn=1) if ep in (0, 1, 2) else dict(stride_bk=1)
    comp(G._grouped_mm_fwd_kernel, t, dict(EPILOGUE=ep, GATHER_A=gather, DUAL_A=dual, SAVE_PRE=save, PRECISION=None,
         DOT_F32=False, BLOCK_M=128, **cfg, **unit), num_warps=w_, num_stages=s_, label=f"epilogue={ep} {cfg}",
         pipelined=True)
    # weights stored [E, out, in] (nn.Linear's layout; Hugging Face's experts), read in place:
    # the other dimension is the unit stride, forward and backward
    flip = dict(stride_bk=1) if ep in (0, 1, 2) else dict(stride_bn=1)
    comp(G._grouped_mm_fwd_kernel, t, dict(EPILOGUE=ep, GATHER_A=gather, DUAL_A=dual, SAVE_PRE=save, PRECISION=None,
         DOT_F32=False, BLOCK_M=128, **cfg, **flip), num_warps=w_, num_stages=s_,
         label=f"epilogue={ep} {cfg} weights stored [E, out, in]", pipelined=True)
# narrow expert hidden sizes (tests, small models): the SwiGLU backward splits its tile into
# column halves, down to 8 columns
for n in (16, 48):
    cfg = G._tiles(256, n, torch.bfloat16, 3, dual_a=False)
    w_, s_ = cfg.pop("num_warps"), cfg.pop("num_stages")
    comp(G._grouped_mm_fwd_kernel, dict(base), dict(EPILOGUE=3, GATHER_A=True, DUAL_A=False, SAVE_PRE=True,
         PRECISION=None, DOT_F32=False, BLOCK_M=64, **cfg, stride_bk=1), num_warps=w_, num_stages=s_,
         label=f"epilogue=3 N={n} {cfg}")
# fp32 operands (a model without autocast on CUDA): exact fp32 dots, BLOCK_K 32 (_tiles)
f32_rows = {k: (P("fp32") if v == P("bf16") else v) for k, v in base.items()}
for ep, gather, dual, save in [(1, True, False, True), (2, False, False, False), (3, True, False, True),
                               (4, False, True, False)]:
    cfg = G._tiles(4096, 4096, torch.float32, ep, dual_a=dual)
    w_, s_ = cfg.pop("num_warps"), cfg.pop("num_stages")
    unit = dict(stride_bn=1) if ep in (0, 1, 2) else dict(stride_bk=1)
    comp(G._grouped_mm_fwd_kernel, f32_rows, dict(EPILOGUE=ep, GATHER_A=gather, DUAL_A=dual, SAVE_PRE=save,
         PRECISION="ieee", DOT_F32=False, BLOCK_M=64, **cfg, **unit), num_warps=w_, num_stages=s_,
         label=f"fp32 epilogue={ep}")
t = {"a_ptr": P("bf16"), "a_idx_ptr": P("i32"), "g_ptr": P("bf16"), "g2_ptr": P("bf16"), "g_idx_ptr": P("i32"), "dw_ptr": P("bf16"), "dw2_ptr": P("bf16"), "offsets_ptr": P("i32")}
for ga, gg, dg in [(True, False, True), (False, True, False), (True, False, False), (False, False, False)]:
    cfg = G._dw_tiles(4096, 14336, torch.bfloat16, dual=dg, gather=ga or gg)
    w_, s_ = cfg.pop("num_warps"), cfg.pop("num_stages")
    comp(G._grouped_mm_dw_kernel, t, dict(GATHER_A=ga, GATHER_G=gg, DUAL_G=dg, PRECISION=None,
         DOT_F32=False, stride_dn=1, **cfg), num_warps=w_, num_stages=s_, label=f"ga={ga} gg={gg} dual={dg}",
         pipelined=True)
    # the same for weights stored [E, N, K] (nn.Linear's layout, Hugging Face's experts): the
    # gradient is written in that layout, K the unit stride
    comp(G._grouped_mm_dw_kernel, t, dict(GATHER_A=ga, GATHER_G=gg, DUAL_G=dg, PRECISION=None,
         DOT_F32=False, stride_dk=1, **cfg), num_warps=w_, num_stages=s_,
         label=f"ga={ga} gg={gg} dual={dg} dW stored [E, N, K]", pipelined=True)
# fp32 weight gradients (BLOCK_R 32) at the gathered depth: they must fit in shared memory too
t32 = {k: (P("fp32") if v == P("bf16") else v) for k, v in t.items()}
for ga, gg, dg in [(True, False, True), (False, True, False)]:
    cfg = G._dw_tiles(4096, 4096, torch.float32, dual=dg, gather=True)
    w_, s_ = cfg.pop("num_warps"), cfg.pop("num_stages")
    comp(G._grouped_mm_dw_kernel, t32, dict(GATHER_A=ga, GATHER_G=gg, DUAL_G=dg, PRECISION="ieee",
         DOT_F32=False, stride_dn=1, **cfg), num_warps=w_, num_stages=s_, label=f"fp32 ga={ga} gg={gg} dual={dg}")

# Every other configuration the autotuner may time, at the shapes of Mixtral's launches,
# compiles: one that runs out of shared memory is left out by the tuner, but any other
# compile error would surface in the middle of a training step.
for ep, gather, dual, save, K, N in [(0, True, False, False, 4096, 14336), (1, True, False, True, 4096, 14336),
                                     (2, False, False, False, 14336, 4096), (3, True, False, True, 4096, 14336),
                                     (4, False, True, False, 14336, 4096)]:
    tt = dict(base)
    if ep in (2, 4): tt["out_ptr"] = P("fp32")
    unit = dict(stride_bn=1) if ep in (0, 1, 2) else dict(stride_bk=1)
    for cfg in G._rows_candidates(G._tiles(K, N, torch.bfloat16, ep, dual_a=dual), N, torch.bfloat16, ep,
                                  tma=True)[1:]:
        if cfg.get("PERSISTENT"):  # (below, with the persistent kernel's own checks)
            continue
        cfg = dict(cfg)
        w_, s_ = cfg.pop("num_warps"), cfg.pop("num_stages")
        types, extra = _descriptor_types(tt, cfg, ep, dual)
        comp(G._grouped_mm_fwd_kernel, types, dict(EPILOGUE=ep, GATHER_A=gather, DUAL_A=dual, SAVE_PRE=save,
             PRECISION=None, DOT_F32=False, BLOCK_M=128, **cfg, **unit, **extra), num_warps=w_, num_stages=s_,
             label=f"candidate epilogue={ep} BLOCK_N={cfg['BLOCK_N']} warps={w_} stages={s_}"
                   f"{' TMA' if cfg.get('B_TMA') else ''}", ptxas=True, may_not_fit=True, tma=bool(cfg.get("B_TMA")))
for ga, gg, dg, K, N in [(True, False, True, 4096, 14336), (False, True, False, 14336, 4096)]:
    for cfg in G._dw_candidates(G._dw_tiles(K, N, torch.bfloat16, dual=dg, gather=True), K, N, True)[1:]:
        cfg = dict(cfg)
        w_, s_ = cfg.pop("num_warps"), cfg.pop("num_stages")
        comp(G._grouped_mm_dw_kernel, t, dict(GATHER_A=ga, GATHER_G=gg, DUAL_G=dg, PRECISION=None, DOT_F32=False,
             stride_dn=1, **cfg), num_warps=w_, num_stages=s_, label=f"candidate dW dual={dg} BLOCK_K={cfg['BLOCK_K']} "
             f"BLOCK_N={cfg['BLOCK_N']} warps={w_} stages={s_}", ptxas=True, may_not_fit=True)

# Deterministic mode (torch.use_deterministic_algorithms(True)): the down projection and dX
# store fp32 rows (no atomic scatter), the SwiGLU backward stores the combine weights'
# gradient per column tile, and a combine kernel sums each token's rows. Default tiles at
# Mixtral's shapes must pipeline as the others do; every tuner candidate must compile (one
# over the shared-memory limit is left out); none may hold an atomic instruction.
for ep, gather, dual, save, K, N, trans, extra in [(0, False, False, False, 14336, 4096, False, {}),  # down
                                                   (0, False, True, False, 14336, 4096, True, {}),  # dX
                                                   (0, False, False, False, 14336, 4096, True, {}),  # dA
                                                   (3, True, False, True, 4096, 14336, True, dict(DW_PARTIAL=True))]:
    tt = dict(base, out_ptr=P("fp32")) if ep == 0 else dict(base)
    unit = dict(stride_bk=1) if trans else dict(stride_bn=1)
    default = G._tiles(K, N, torch.bfloat16, ep, dual_a=dual)
    for i, cfg in enumerate(G._rows_candidates(default, N, torch.bfloat16, ep, tma=True, fp32_out=ep == 0)):
        cfg = dict(cfg)
        w_, s_ = cfg.pop("num_warps"), cfg.pop("num_stages")
        per_sm = cfg.pop("PERSISTENT", 0)
        types, tma_extra = _descriptor_types(tt, cfg, 4 if trans and ep == 0 else ep, dual)
        comp(G._grouped_mm_fwd_kernel, types, dict(EPILOGUE=ep, GATHER_A=gather, DUAL_A=dual, SAVE_PRE=save,
             PRECISION=None, DOT_F32=False, BLOCK_M=128, PERSISTENT=per_sm > 0, **cfg, **unit, **tma_extra, **extra),
             num_warps=w_, num_stages=s_, label=f"deterministic epilogue={ep} dual={dual} transposed={trans} "
             f"{'default' if i == 0 else 'candidate'} "
             f"BLOCK_N={cfg['BLOCK_N']} warps={w_} stages={s_}{' TMA' if cfg.get('B_TMA') else ''}"
             f"{f' persistent {per_sm}/SM' if per_sm else ''}", pipelined=i == 0, ptxas=True,
             may_not_fit=i > 0, tma=bool(cfg.get("B_TMA")), per_sm=per_sm, no_atomics=True)
for rows_t in ("fp32", "bf16"):
    comp(G._combine_rows_kernel, {"rows_ptr": P(rows_t), "w_ptr": P("fp32"), "order_ptr": P("i32"),
         "starts_ptr": P("i32"), "out_ptr": P("bf16")}, dict(HAS_W=True, BLOCK_D=1024), label=f"rows={rows_t}",
         vectorized=True, no_atomics=True)

# Persistent row kernels (the autotuner's PERSISTENT candidates): a grid of a few programs
# per SM, each looping over tiles, at Mixtral's and OLMoE's launch shapes (BLOCK_M 128, as the
# benchmark's plans use there); TMA weights too. Each must pipeline its main loops as the
# non-persistent kernel does, fit its programs per SM together, and not spill in a main loop
# (none does with Triton 3.6 or 3.9; with 3.8 the TMA variant of the scatter epilogue does,
# which is reported: the tuner times it like any candidate).
for shape, D_, F_ in [("mixtral", 4096, 14336), ("olmoe", 2048, 1024)]:
    for ep, gather, dual, save, K, N in [(0, True, False, False, D_, F_), (1, True, False, True, D_, F_),
                                         (2, False, False, False, F_, D_), (3, True, False, True, D_, F_),
                                         (4, False, True, False, F_, D_)]:
        tt = dict(base)
        if ep in (2, 4): tt["out_ptr"] = P("fp32")
        unit = dict(stride_bn=1) if ep in (0, 1, 2) else dict(stride_bk=1)
        for cfg in G._rows_candidates(G._tiles(K, N, torch.bfloat16, ep, dual_a=dual), N, torch.bfloat16, ep,
                                      tma=True):
            if not cfg.get("PERSISTENT"):
                continue
            cfg = dict(cfg)
            w_, s_, per_sm = cfg.pop("num_warps"), cfg.pop("num_stages"), cfg.pop("PERSISTENT")
            types, extra = _descriptor_types(tt, cfg, ep, dual)
            comp(G._grouped_mm_fwd_kernel, types, dict(EPILOGUE=ep, GATHER_A=gather, DUAL_A=dual, SAVE_PRE=save,
                 PRECISION=None, DOT_F32=False, BLOCK_M=128, PERSISTENT=True, **cfg, **unit, **extra), num_warps=w_,
                 num_stages=s_, label=f"persistent {shape} epilogue={ep} BLOCK_N={cfg['BLOCK_N']} warps={w_} "
                 f"stages={s_} per SM={per_sm}{' TMA' if cfg.get('B_TMA') else ''}", pipelined=True, ptxas=True,
                 tma=bool(cfg.get("B_TMA")), per_sm=per_sm, tuner_only=True)
# fp32 operands, persistent (default tiles, one program per SM)
for ep, gather, dual, save in [(1, True, False, True), (3, True, False, True), (4, False, True, False)]:
    cfg = G._tiles(4096, 4096, torch.float32, ep, dual_a=dual)
    w_, s_ = cfg.pop("num_warps"), cfg.pop("num_stages")
    unit = dict(stride_bn=1) if ep in (0, 1, 2) else dict(stride_bk=1)
    comp(G._grouped_mm_fwd_kernel, f32_rows, dict(EPILOGUE=ep, GATHER_A=gather, DUAL_A=dual, SAVE_PRE=save,
         PRECISION="ieee", DOT_F32=False, BLOCK_M=64, PERSISTENT=True, **cfg, **unit), num_warps=w_, num_stages=s_,
         label=f"persistent fp32 epilogue={ep}", per_sm=1, tuner_only=True)

print(f"{'FAILED: ' + ', '.join(FAILED) if FAILED else 'all kernel variants compiled for sm_90'}")
sys.exit(1 if FAILED else 0)
