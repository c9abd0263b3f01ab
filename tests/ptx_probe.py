"""Compile every EMA kernel for Hopper (sm_90) on any machine and report its
global memory accesses by width, plus Triton's specialisation keys across
changing momentum and table length. Run as a script, never under
TRITON_INTERPRET (the interpreter compiles nothing); prints JSON."""

import json
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from triton_ema.kernels import ema
from triton_ema.triton_backend import BLOCK, NUM_WARPS

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
ACCESS = re.compile(r"\b(ld|st)\.global[.\w:]*?(?:\.v(\d))?\.[bfus](\d+)\b")


def accesses(ptx):
    """{'ld': {bits: count}, 'st': {...}} over the global accesses in ``ptx``."""
    out = {"ld": {}, "st": {}}
    for op, vec, width in ACCESS.findall(ptx):
        bits = int(vec or 1) * int(width)
        out[op][bits] = out[op].get(bits, 0) + 1
    return out


def compile_ptx(kernel, flat_type, param_type, extra_sig, constexprs, aligned=()):
    names = kernel.arg_names
    signature = {names[0]: "*i64", names[1]: "*" + flat_type, "param_type_ptr": "*" + param_type,
                 **extra_sig, **{k: "constexpr" for k in constexprs}}
    if names[1] == "param_type_ptr":  # the nonfinite scan: (table, param type, flag)
        signature = {names[0]: "*i64", names[1]: "*" + param_type, names[2]: "*" + flat_type,
                     **extra_sig, **{k: "constexpr" for k in constexprs}}
    assert list(signature) == names, f"update the probe for {names}"
    # As Triton specialises torch allocations, and integers that are multiples of 16 (the row stride).
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, *(names.index(a) for a in aligned))}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": NUM_WARPS}).asm["ptx"]


def specialisation_keys(kernel, args_list, **constexprs):
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(TARGET))
    return sorted({repr(binder(*args, BLOCK=BLOCK, CHECK_SKIP=False, **constexprs)[1]) for args in args_list})


def update_ptx(s_type, p_type, profiles, check_skip, in_memory=False):
    momenta = "*fp32" if in_memory else ("fp32",) * profiles  # capturable=True: read on the device
    signature = {"skip_ptr": "*i32", "momenta": momenta, "row_stride": "i64", "n_full": "i64"}
    constexprs = {"BLOCK": BLOCK, "PROFILES": profiles, "CHECK_SKIP": check_skip, "MOMENTA_IN_MEMORY": in_memory}
    return accesses(compile_ptx(ema._ema_update_kernel, s_type, p_type, signature, constexprs, aligned=["row_stride"]))


def main():
    report = {"block": BLOCK, "num_warps": NUM_WARPS, "update": {}, "update_checked": {}, "update_4_profiles": {},
              "update_2_from_memory": {}, "swap": {}, "copy": {}, "nonfinite": {}}
    for p_dtype, p_type in TYPES.items():
        for s_dtype, s_type in TYPES.items():
            pair = f"{p_type}/{s_type}"
            report["update"][pair] = update_ptx(s_type, p_type, 1, False)
            report["update_checked"][pair] = update_ptx(s_type, p_type, 1, True)
            report["update_4_profiles"][pair] = update_ptx(s_type, p_type, 4, True)
            report["update_2_from_memory"][pair] = update_ptx(s_type, p_type, 2, True, in_memory=True)
            for to_params in (False, True):
                report["copy"][f"{pair}/{'to_params' if to_params else 'to_flat'}"] = accesses(compile_ptx(
                    ema._ema_copy_kernel, s_type, p_type, {"n_full": "i64"}, {"BLOCK": BLOCK, "TO_PARAMS": to_params}))
            if s_dtype == torch.float32:  # the nonfinite scan reads params only
                report["nonfinite"][p_type] = accesses(compile_ptx(
                    ema._ema_nonfinite_kernel, "i32", p_type, {"n_full": "i64"}, {"BLOCK": BLOCK}))
            if p_dtype == s_dtype:
                report["swap"][pair] = accesses(compile_ptx(
                    ema._ema_swap_kernel, s_type, p_type, {"n_full": "i64"}, {"BLOCK": BLOCK}))
    table, shadow, param = torch.zeros(6, dtype=torch.int64), torch.zeros(32), torch.zeros(32, dtype=torch.bfloat16)
    report["update_keys"] = specialisation_keys(ema._ema_update_kernel, [
        (table, shadow, param, table, (m,), stride, n) for m in (0.0, 1e-4, 0.5, 1.0) for n in (0, 1, 16, 1000)
        for stride in (16, 4096, 2**20 + 16)], PROFILES=1)
    report["update_keys_2_profiles"] = specialisation_keys(ema._ema_update_kernel, [
        (table, shadow, param, table, (m, 1 - m), 32, n) for m in (0.0, 1e-4, 0.5, 1.0) for n in (0, 1, 16, 1000)],
        PROFILES=2)
    report["triton"] = triton.__version__
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
