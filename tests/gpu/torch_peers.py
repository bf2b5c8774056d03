"""torch_peers.py: the ceilings and the PyTorch peers of the moegen GPU benchmark,
measured in the same device run (tests/gpu/device_check.sh).

Ceilings: device-to-device copy bandwidth (bytes read + written) and a large
bf16 matrix product. Peers, for the same layer shapes and token counts as
moe_runner bench, bf16 weights and activations, with the layer's own routing
(router logits in f32, softmax or sigmoid, top-k, normalization) done in torch:
  grouped: tokens sorted by expert, torch._grouped_mm for up and down, one
           index_add for the combine (no host synchronization);
  eager:   the per-expert loop of reference implementations (a host read of
           the counts, then two matmuls per expert hit).
Weights rotate over several copies, as in moe_runner, so L2 cannot serve
repeats. Times are CUDA-event medians.

  python3 tests/gpu/torch_peers.py --csv OUT.csv [--tokens 1,16,256,4096]
"""

import argparse
import csv
import sys

import torch
import torch.nn.functional as F

# name: hidden, experts, width, top_k, score, normalize, shared width, copies
SHAPES = {
    "qwen3-30b-a3b": (2048, 128, 768, 8, "softmax", True, 0, 3),
    "olmoe-1b-7b": (2048, 64, 1024, 8, "softmax", False, 0, 3),
    "mixtral-8x7b": (4096, 8, 14336, 2, "softmax", True, 0, 2),
    "deepseek-v3-tp8": (7168, 256, 256, 8, "sigmoid", True, 256, 2),
}


def timed(fn, iters, warm=3):
    for _ in range(warm):
        fn(0)
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    for i in range(iters):
        ev[i].record()
        fn(i)
    ev[iters].record()
    torch.cuda.synchronize()
    t = sorted(ev[i].elapsed_time(ev[i + 1]) for i in range(iters))
    return t[len(t) // 2] * 1e-3


def ceilings():
    n = 1 << 31  # 2 GiB
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    t = timed(lambda i: b.copy_(a), 10)
    copy_gbps = 2 * n / t * 1e-9
    del a, b
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    t = timed(lambda i: x @ y, 10)
    mm_tflops = 2 * m**3 / t * 1e-12
    return copy_gbps, mm_tflops


class Layer:
    def __init__(self, shape, gen):
        H, E, I, k, score, norm, Is, _ = shape
        self.H, self.E, self.I, self.k, self.score, self.norm = H, E, I, k, score, norm
        s = H**-0.5
        self.router = torch.randn(E, H, device="cuda", generator=gen) * s
        # nn.Linear layout [out, in]; the grouped GEMM takes the transposed view
        self.w_up = (torch.randn(E, 2 * I, H, device="cuda", generator=gen) * s).bfloat16()
        self.w_down = (torch.randn(E, H, I, device="cuda", generator=gen) * I**-0.5).bfloat16()
        self.s_up = self.s_down = None
        if Is:
            self.s_up = (torch.randn(2 * Is, H, device="cuda", generator=gen) * s).bfloat16()
            self.s_down = (torch.randn(H, Is, device="cuda", generator=gen) * Is**-0.5).bfloat16()

    def route(self, x):
        logits = x.float() @ self.router.t()
        p = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        w, ids = p.topk(self.k, dim=-1)
        if self.norm:
            w = w / w.sum(-1, keepdim=True)
        return w, ids

    def shared(self, x, y):
        if self.s_up is not None:
            g, u = (x @ self.s_up.t()).chunk(2, dim=-1)
            y += (F.silu(g) * u) @ self.s_down.t()
        return y

    def grouped(self, x):
        T = x.shape[0]
        w, ids = self.route(x)
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        tok = order // self.k
        offs = torch.bincount(flat, minlength=self.E).cumsum(0).to(torch.int32)
        xs = x[tok]
        g, u = torch._grouped_mm(xs, self.w_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        o = torch._grouped_mm(F.silu(g) * u, self.w_down.transpose(-2, -1), offs=offs)
        o = o * w.flatten()[order].unsqueeze(1).to(o.dtype)
        y = torch.zeros(T, self.H, dtype=torch.float32, device="cuda")
        y.index_add_(0, tok, o.float())
        return self.shared(x, y)

    def eager(self, x):
        T = x.shape[0]
        w, ids = self.route(x)
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.E).tolist()  # host sync
        y = torch.zeros(T, self.H, dtype=torch.float32, device="cuda")
        wf = w.flatten()
        start = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            sel = order[start : start + n]
            start += n
            t = sel // self.k
            g, u = (x[t] @ self.w_up[e].t()).chunk(2, dim=-1)
            o = (F.silu(g) * u) @ self.w_down[e].t()
            y.index_add_(0, t, o.float() * wf[sel].unsqueeze(1))
        return self.shared(x, y)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", required=True)
    ap.add_argument("--tokens", default="1,16,256,4096")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    props = torch.cuda.get_device_properties(0)
    print(f"torch {torch.__version__} on {props.name}, {props.multi_processor_count} SMs, "
          f"L2 {getattr(props, 'L2_cache_size', 0) / 2**20:.0f} MiB", flush=True)
    copy_gbps, mm_tflops = ceilings()
    print(f"ceilings: device copy {copy_gbps:.0f} GB/s (read + write), "
          f"bf16 matmul 8192^3 {mm_tflops:.0f} TFLOP/s", flush=True)
    rows = [("ceiling", "copy", 0, "", "", copy_gbps), ("ceiling", "matmul_bf16", 0, "", "", mm_tflops)]
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1)
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        H, copies = shape[0], shape[7]
        layers = [Layer(shape, gen) for _ in range(copies)]
        for T in tokens:
            xs = [torch.randn(T, H, device="cuda", generator=gen).bfloat16() for _ in range(copies)]
            for path in ("grouped", "eager"):
                fn = lambda i: getattr(layers[i % copies], path)(xs[i % copies])
                try:
                    fn(0)
                    torch.cuda.synchronize()
                    # about a fifth of a second per point
                    t0 = timed(fn, 3, warm=1)
                    iters = max(3 * copies, min(500, int(0.2 / max(t0, 1e-6))))
                    t = timed(fn, iters)
                    rows.append((name, path, T, copies, iters, t * 1e6))
                    print(f"  {name:16s} {path:7s} T {T:5d}: {t * 1e6:9.1f} us", flush=True)
                except Exception as e:  # a peer that cannot run is reported, not fatal
                    rows.append((name, path, T, copies, 0, float("nan")))
                    print(f"  {name:16s} {path:7s} T {T:5d}: failed: {e}", flush=True)
        del layers
        torch.cuda.empty_cache()
    with open(args.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["shape", "path", "T", "copies", "iters", "value"])
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
