#!/usr/bin/env python3
"""The PyTorch peers of `moegen bench` on one MoE layer: torch._grouped_mm on
bf16 tensors (the one-liner a PyTorch user writes) and an eager per-expert loop
(gather, gate/up, SiLU, down, index_add). Same shapes, same token counts, same
routing draw as the bench (uniform: each token's k distinct experts uniformly
at random; zipf: expert of popularity rank r with probability 1/r over a random
ranking), the router matmul and softmax included, torch.set_num_threads equal
to moegen's --threads. Prints a CSV beside moegen bench's:

    peer,shape,tokens,weights,routing,ms,gflops

ms: median of --reps timed forwards after one warm-up; GFLOP/s counts
T (2HE + k 6HI) like the bench. Run with the parity venv's python:

    $HOME/.cache/moegen/parity-venv/bin/python scripts/bench_torch_peers.py \\
        --shapes qwen3,mixtral --tokens 1,16,256,4096 --threads 2
"""
import argparse
import statistics
import sys
import time

import torch

SHAPES = {  # E, k, H, I (the bench's shapes, no shared expert)
    "qwen3": (128, 8, 2048, 768),
    "olmoe": (64, 8, 2048, 1024),
    "mixtral": (8, 2, 4096, 14336),
}


def draw_routing(T, E, k, routing, gen):
    if routing == "uniform":
        p = torch.ones(E)
    else:
        rank = torch.randperm(E, generator=gen)
        p = 1.0 / (rank.double() + 1.0)
    p = p.expand(T, E)
    return torch.multinomial(p, k, replacement=False, generator=gen)  # [T, k]


class Layer:
    def __init__(self, E, k, H, I, dtype, gen):
        s = 0.02
        self.E, self.k, self.H, self.I = E, k, H, I
        self.router = (torch.randn(E, H, generator=gen) * s).to(dtype)
        # grouped_mm layout: [E, K, N]
        self.w13 = (torch.randn(E, H, 2 * I, generator=gen) * s).to(dtype)
        self.w2 = (torch.randn(E, I, H, generator=gen) * s).to(dtype)

    def route(self, x, ids):
        logits = x @ self.router.t()
        probs = torch.softmax(logits.float(), dim=-1)
        w = probs.gather(1, ids)
        return w / w.sum(dim=-1, keepdim=True)

    def grouped(self, x, ids):
        T = x.shape[0]
        w = self.route(x, ids)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // self.k
        counts = torch.bincount(flat, minlength=self.E)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = x[tok]
        gu = torch._grouped_mm(xs, self.w13, offs=offs)
        g, u = gu[:, : self.I], gu[:, self.I :]
        h = torch.nn.functional.silu(g) * u
        o = torch._grouped_mm(h, self.w2, offs=offs)
        o = o.float() * w.reshape(-1)[order].unsqueeze(1)
        y = torch.zeros(T, self.H, dtype=torch.float32)
        y.index_add_(0, tok, o)
        return y

    def eager(self, x, ids):
        T = x.shape[0]
        w = self.route(x, ids)
        y = torch.zeros(T, self.H, dtype=torch.float32)
        for e in range(self.E):
            t, slot = torch.nonzero(ids == e, as_tuple=True)
            if t.numel() == 0:
                continue
            xe = x[t]
            gu = xe @ self.w13[e]
            h = torch.nn.functional.silu(gu[:, : self.I]) * gu[:, self.I :]
            o = (h @ self.w2[e]).float() * w[t, slot].unsqueeze(1)
            y.index_add_(0, t, o)
        return y


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="qwen3,mixtral")
    ap.add_argument("--tokens", default="1,16,256,4096")
    ap.add_argument("--routing", default="uniform")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peers", default="grouped_mm,eager")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not hasattr(torch, "_grouped_mm"):
        print("torch._grouped_mm is not available in torch " + torch.__version__, file=sys.stderr)
    print("peer,shape,tokens,weights,routing,ms,gflops")
    gen = torch.Generator().manual_seed(a.seed)
    for shape in a.shapes.split(","):
        E, k, H, I = SHAPES[shape]
        layer = Layer(E, k, H, I, torch.bfloat16, gen)
        for T in (int(t) for t in a.tokens.split(",")):
            for routing in a.routing.split(","):
                ids = draw_routing(T, E, k, routing, gen)
                x = torch.empty(T, H).uniform_(-1, 1, generator=gen).to(torch.bfloat16)
                flops = T * (2 * H * E + k * 6 * H * I)
                for peer in a.peers.split(","):
                    if peer == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
                        continue
                    fn = layer.grouped if peer == "grouped_mm" else layer.eager
                    with torch.inference_mode():
                        fn(x, ids)  # warm-up
                        ts = []
                        for _ in range(a.reps):
                            t0 = time.perf_counter()
                            fn(x, ids)
                            ts.append(time.perf_counter() - t0)
                    ms = statistics.median(ts) * 1e3
                    print(f"{peer},{shape},{T},bf16,{routing},{ms:.3f},{flops / ms * 1e-6:.1f}",
                          flush=True)


if __name__ == "__main__":
    main()
