"""moegen.vllm.MoegenExperts against vLLM's own CPU experts (CPUUnquantizedExperts),
both driven by vLLM's modular kernel (FusedMoEKernel with the no-DP/EP
prepare/finalize) on the same weights and routing. Run by test_vllm.py with a
Python that has vllm installed; exits non-zero on any mismatch.

Checks, per case (f32: max |diff| <= 1e-5 * max |y|; bf16: the outputs of both
rounded to bf16, so within a few bf16 ulps):
  - the whole layer through FusedMoEKernel.apply, moegen vs vLLM;
  - both vs a float64 torch forward written here from the formulas;
  - expert parallelism: two MoegenExperts holding experts [0, E/2) and
    [E/2, E) with vLLM's expert maps; their partial outputs sum to the full one.
"""

import shutil
import sys
import tempfile

import torch
from vllm.model_executor.layers.fused_moe import modular_kernel as mk
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import (FUSED_MOE_UNQUANTIZED_CONFIG,
                                                         FusedMoEConfig, FusedMoEParallelConfig,
                                                         RoutingMethodType)
from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
from vllm.model_executor.layers.fused_moe.prepare_finalize.no_dp_ep import (
    MoEPrepareAndFinalizeNoDPEPModular)

from moegen.vllm import MoegenExperts, _compile, experts_spec

CACHE = None  # fresh libraries, compiled by $MOEGEN: a temporary folder made by main()


def config(E, k, H, I, act, dtype, ep_size=1, ep_rank=0, pc=None):
    """The layer's FusedMoEConfig: pc, vLLM's parallel config of the layer, or
    no parallelism (with ep_size > 1: expert parallelism alone)."""
    if pc is None:
        pc = FusedMoEParallelConfig.make_no_parallel()
        if ep_size > 1:
            pc.use_ep, pc.ep_size, pc.ep_rank = True, ep_size, ep_rank
    ep_size = pc.ep_size if pc.use_ep else 1
    return FusedMoEConfig(num_experts=E, experts_per_token=k, hidden_dim=H,
                          intermediate_size=I, num_local_experts=E // ep_size,
                          num_logical_experts=E, activation=act, device="cpu",
                          routing_method=RoutingMethodType.Renormalize, moe_parallel_config=pc,
                          in_dtype=dtype)


class Layer(torch.nn.Module):
    def __init__(self, w13, w2):
        super().__init__()
        self.w13_weight = torch.nn.Parameter(w13.clone(), requires_grad=False)
        self.w2_weight = torch.nn.Parameter(w2.clone(), requires_grad=False)


def run(experts, layer, x, tw, ti, act, E, expert_map=None, on_input=False):
    kernel = mk.FusedMoEKernel(MoEPrepareAndFinalizeNoDPEPModular(), experts)
    return kernel.apply(x, layer.w13_weight, layer.w2_weight, tw, ti, activation=act,
                        global_num_experts=E, expert_map=expert_map,
                        apply_router_weight_on_input=on_input)


def formulas(x, w13, w2, tw, ti, act, I):
    """y[t] = sum_k w[t,k] * down(act(gate x) * up x) of expert ids[t,k], in float64."""
    x, w13, w2, tw = x.double(), w13.double(), w2.double(), tw.double()
    f = torch.nn.functional.silu if act == MoEActivation.SILU else torch.nn.functional.gelu
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ti.shape[1]):
            e = int(ti[t, k])
            h = f(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t])
            y[t] += tw[t, k] * (w2[e] @ h)
    return y


def compare(y, y_ref, y64, x, dtype):
    """moegen's output y against vLLM's y_ref and the float64 formulas y64: the
    scale max|y64|, the tolerance (f32 1e-5, bf16 2e-2 of it), the three max
    differences and whether all are within it."""
    assert y.shape == x.shape and y.dtype == dtype, (y.shape, y.dtype)
    scale = float(y64.abs().max())
    tol = 1e-5 * scale if dtype == torch.float32 else 2e-2 * scale
    d_ref = float((y.double() - y_ref.double()).abs().max())
    d_ours = float((y.double() - y64).abs().max())
    d_vllm = float((y_ref.double() - y64).abs().max())
    ok = scale > 0 and d_ref <= tol and d_ours <= tol and d_vllm <= tol
    return scale, tol, d_ref, d_ours, d_vllm, ok


def data(E, k, H, I, T, dtype, seed):
    """T tokens x, the weights w13, w2 (in dtype), and the top-k weights (f32,
    renormalized) and ids (int32) of a random softmax router."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    logits = torch.randn(T, E, generator=g)
    tw, ti = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return x, w13, w2, (tw / tw.sum(-1, keepdim=True)).to(torch.float32), ti.to(torch.int32)


def case(name, E, k, H, I, T, act, dtype, seed):
    x, w13, w2, tw, ti = data(E, k, H, I, T, dtype, seed)

    cfg = config(E, k, H, I, act, dtype)
    ref_layer, ours_layer = Layer(w13, w2), Layer(w13, w2)
    ref = CPUUnquantizedExperts(cfg, FUSED_MOE_UNQUANTIZED_CONFIG)
    ref.process_weights_after_loading(ref_layer)
    ours = MoegenExperts(cfg, FUSED_MOE_UNQUANTIZED_CONFIG, cache_dir=CACHE)
    ours.process_weights_after_loading(ours_layer)

    y_ref = run(ref, ref_layer, x, tw, ti, act, E)
    y = run(ours, ours_layer, x, tw, ti, act, E)
    y64 = formulas(x, w13, w2, tw, ti, act, I)
    scale, tol, d_ref, d_ours, d_vllm, ok = compare(y, y_ref, y64, x, dtype)
    print("%-28s max|y| %.3g  moegen-vllm %.3g  moegen-f64 %.3g  vllm-f64 %.3g  (tol %.3g)" %
          (name, scale, d_ref, d_ours, d_vllm, tol))

    # the experts run on moegen's packed copy: vLLM's tensors no longer matter
    with torch.no_grad():
        ours_layer.w13_weight.zero_()
        ours_layer.w2_weight.zero_()
    if not torch.equal(run(ours, ours_layer, x, tw, ti, act, E), y):
        print("the output changed with vLLM's copy of the weights")
        ok = False

    if k == 1:  # the routing weight applied to the input by vLLM's prepare()
        tw1 = tw * 0.625
        y1 = run(ours, ours_layer, x, tw1, ti, act, E, on_input=True)
        y1_ref = run(ref, ref_layer, x, tw1, ti, act, E, on_input=True)
        d_in = float((y1.double() - y1_ref.double()).abs().max())
        print("%-28s weight on input: moegen-vllm %.3g" % ("", d_in))
        ok = ok and d_in <= tol and not torch.equal(y1, y)

    # expert parallelism: two ranks holding halves, driven with vLLM's expert maps
    parts = []
    for r in range(2):
        b, e = r * E // 2, (r + 1) * E // 2
        rank = MoegenExperts(config(E, k, H, I, act, dtype, ep_size=2, ep_rank=r),
                             FUSED_MOE_UNQUANTIZED_CONFIG, cache_dir=CACHE)
        assert rank.experts == (b, e), rank.experts
        part = Layer(w13[b:e], w2[b:e])
        rank.process_weights_after_loading(part)
        emap = torch.full((E,), -1, dtype=torch.int32)
        emap[b:e] = torch.arange(e - b, dtype=torch.int32)
        parts.append(run(rank, part, x, tw, ti, act, E, expert_map=emap).double())
    d_ep = float((parts[0] + parts[1] - y.double()).abs().max())
    print("%-28s EP=2: |y0 + y1 - y| %.3g" % ("", d_ep))
    ok = ok and d_ep <= tol

    # a map that is not the rank's contiguous range is refused
    emap = torch.full((E,), -1, dtype=torch.int32)
    emap[E // 2:] = torch.arange(E - E // 2, dtype=torch.int32)
    try:
        run(ours, ours_layer, x, tw, ti, act, E, expert_map=emap)
        print("a foreign expert map was accepted")
        ok = False
    except ValueError as e:
        assert "contiguous range" in str(e), e
    return ok


def main():
    global CACHE
    CACHE = tempfile.mkdtemp(prefix="moegen-vllm-")
    torch.set_num_threads(2)
    ok = True
    ok &= case("f32 silu E8 k2 H64 I32", 8, 2, 64, 32, 37, MoEActivation.SILU, torch.float32, 1)
    ok &= case("f32 gelu E6 k3 H96 I64", 6, 3, 96, 64, 20, MoEActivation.GELU, torch.float32, 2)
    ok &= case("f32 silu E8 k1 H64 I64", 8, 1, 64, 64, 5, MoEActivation.SILU, torch.float32, 3)
    ok &= case("bf16 silu E8 k2 H64 I32", 8, 2, 64, 32, 16, MoEActivation.SILU, torch.bfloat16,
               4)
    # a given library is checked against the layer: silu experts for a gelu layer
    cfg = config(8, 2, 64, 32, MoEActivation.SILU, torch.float32)
    so = _compile(experts_spec(cfg), CACHE)
    w13, w2 = torch.randn(8, 64, 64) / 8, torch.randn(8, 64, 32) / 8
    MoegenExperts(cfg, FUSED_MOE_UNQUANTIZED_CONFIG, library=so).process_weights_after_loading(
        Layer(w13, w2))
    try:
        MoegenExperts(config(8, 2, 64, 32, MoEActivation.GELU, torch.float32),
                      FUSED_MOE_UNQUANTIZED_CONFIG,
                      library=so).process_weights_after_loading(Layer(w13, w2))
        print("silu experts were accepted for a gelu layer")
        ok = False
    except ValueError as e:
        assert "gated gelu" in str(e), e
    shutil.rmtree(CACHE)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
