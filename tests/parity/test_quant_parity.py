"""Parity with Hugging Face transformers for checkpoints whose experts stay
quantized in moegen's kernels (docs/import.md, "Quantized checkpoints").

For each format a tiny random model is built in transformers (seeded, f32),
its expert matrices are written as the official release stores them, packed
by this file's own quantizer, with the release's `quantization_config` in
config.json:

- gpt-oss, mxfp4: `*_blocks` u8 [E, out, in/32, 16] (two E2M1 codes per byte,
  the even input in the low nibble) and `*_scales` u8 E8M0 [E, out, in/32];
- DeepSeek-V3, fp8: every decoder-layer nn.Linear weight (not the router) as
  e4m3 with an f32 `weight_scale_inv` per [128, 128] tile.

The reference is transformers itself reading that checkpoint:
`from_pretrained(dir, dtype=torch.float32, quantization_config=
Mxfp4Config(dequantize=True) / FineGrainedFP8Config(dequantize=True))`. On a
CPU both quantizers can only dequantize (their kernels need a GPU or Triton
kernels from the Hub); they decode the codes into the f32 parameters of the
plain GptOssExperts / DeepseekV3 modules (the dtype of the parameter they load
into, so f32 here, not bf16), and the test checks those parameters are exactly
the values the codes stand for. The eager MoE block then runs in f32 on random
hidden states.

moegen imports the same config.json (which writes `quant:`, the experts kept
in mxfp4 / fp8 codes in the kernels), compiles it and loads the same
safetensors file: max |y - ref| / max |ref| <= 1e-5 (f32 on both sides; the
kernels sum s * sum(q * x) per group where transformers sums (q * s) * x, a
different rounding order only) and the same experts for every token. A
checkpoint with its codes or scales misplaced fails the same comparison."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import moegen  # noqa: E402
from test_parity import _moegen, _reinit  # noqa: E402

TOL = 1e-5
TOKENS = 48

# E2M1 magnitudes of codes 0..7; bit 3 is the sign.
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E4M3_MAX = 448.0


def pack_mxfp4(w):
    """w [..., rows, K] (K a multiple of 32) into gpt-oss's blocks
    [..., rows, K/32, 16] u8 and scales [..., rows, K/32] u8. Each group of 32
    inputs shares the power of two 2^x with x = floor(log2(amax)) - 2 (E2M1's
    largest exponent, as the OCP MX format has it), stored as x + 127; each
    value becomes the nearest E2M1 code of w / 2^x, saturating at 6."""
    g = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32).astype(np.float64)
    amax = np.abs(g).max(-1)
    x = np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2
    x = np.clip(np.where(amax > 0, x, -127), -127, 127)
    v = g / np.exp2(x)[..., None]
    code = np.abs(np.abs(v)[..., None] - E2M1).argmin(-1).astype(np.uint8)
    code |= np.where(np.signbit(v), 8, 0).astype(np.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks.astype(np.uint8), (x + 127).astype(np.uint8)


def unpack_mxfp4(blocks, scales):
    """The f32 values [..., rows, K] the blocks and scales stand for."""
    lut = np.concatenate([E2M1, -E2M1])
    codes = np.stack([blocks & 15, blocks >> 4], -1).reshape(*blocks.shape[:-2], -1)
    s = np.exp2(scales.astype(np.float64) - 127).repeat(32, -1)
    return (lut[codes] * s).astype(np.float32)


def pack_fp8(w, block=128):
    """w [rows, cols] f32 into e4m3 codes and the f32 scale of each
    [block, block] tile ([ceil(rows/block), ceil(cols/block)]): scale = amax /
    448, code = e4m3(w / scale) rounded to nearest (torch's float8_e4m3fn)."""
    rows, cols = w.shape
    gr, gc = -(-rows // block), -(-cols // block)
    s = torch.ones(gr, gc, dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(gr):
        for j in range(gc):
            t = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            a = float(t.abs().max())
            if a > 0:
                s[i, j] = a / E4M3_MAX
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = \
                (t / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def unpack_fp8(q, s, block=128):
    rows, cols = q.shape
    full = s.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return q.to(torch.float32) * full


def _build(cfg_name, kwargs, out_dir):
    cfg_cls = getattr(transformers, cfg_name, None)
    if cfg_cls is None:
        pytest.skip("transformers %s has no %s" % (transformers.__version__, cfg_name))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg_cls(**kwargs), dtype=torch.float32)
    _reinit(model, 1234)
    model.save_pretrained(out_dir, safe_serialization=True)
    files = sorted(out_dir.glob("*.safetensors"))
    assert len(files) == 1, files
    return files[0]


def _add_quant_config(out_dir, qc):
    path = out_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"] = qc
    path.write_text(json.dumps(cfg, indent=2))


def _hf_load(out_dir, qconfig):
    """transformers reading the quantized checkpoint, dequantized (the only
    path its quantizers have on a CPU). A load transformers refuses here (its
    fp8 quantizer wants the accelerate package, which run.sh installs) skips
    with transformers' own error."""
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            out_dir, dtype=torch.float32, quantization_config=qconfig,
            experts_implementation="eager")
    except ImportError as e:
        pytest.skip("transformers %s cannot load the checkpoint here: %s"
                    % (transformers.__version__, e))
    model.eval()
    return model


def _moegen_model(cmd, out_dir, kept):
    """moegen import + compile of out_dir/config.json; the spec must keep the
    experts quantized (`quant:` with KEPT)."""
    spec = out_dir / "spec.yaml"
    r = _moegen(cmd, "import", str(out_dir / "config.json"), "-o", str(spec))
    assert r.returncode == 0, r.stderr
    text = spec.read_text()
    assert "\nquant:" in text and kept in text, "the import did not keep the experts quantized"
    so = out_dir / "model.so"
    r = _moegen(cmd, str(spec), "-o", str(so))
    assert r.returncode == 0, r.stderr
    return so


def _compare(model, layers, so, weights, hidden, kind):
    """Each MoE layer of the transformers model against moegen's on the same
    random hidden states: (max relative error, tokens routed differently)."""
    m = moegen.load(so, weights=[str(weights)])
    try:
        assert m.info.moe_layers == layers
        for role in ("up", "down"):  # the model.so keeps the codes (moegen -d)
            assert "quant %s kind %s " % (role, kind) in m.info.description
        rng = np.random.default_rng(42)
        results = []
        for L in layers:
            block = model.model.layers[L].mlp
            x = rng.standard_normal((TOKENS, hidden)).astype(np.float32)
            seen = {}

            def pre(mod, args, kwargs):
                seen["idx"] = args[1].detach().clone()
            h = block.experts.register_forward_pre_hook(pre, with_kwargs=True)
            try:
                with torch.no_grad():
                    out = block(torch.from_numpy(x).reshape(1, TOKENS, hidden))
            finally:
                h.remove()
            out = (out[0] if isinstance(out, tuple) else out).reshape(TOKENS, hidden)
            ref = out.double().numpy()
            y, rt = m.forward(x, layer=L, routing=True)
            err = float(np.abs(y.astype(np.float64) - ref).max() / np.abs(ref).max())
            hf = [sorted(r) for r in seen["idx"].reshape(TOKENS, -1).tolist()]
            ours = [sorted(e for e in row if e >= 0) for row in rt.expert_ids.tolist()]
            results.append((L, err, sum(a != b for a, b in zip(hf, ours))))
        return results
    finally:
        m.close()


def _check(results, what):
    bad = ["layer %d: max relative error %.3g, experts differ on %d of %d tokens"
           % (L, err, n, TOKENS) for L, err, n in results if not (err <= TOL and n == 0)]
    assert not bad, "%s: %s" % (what, "; ".join(bad))


GPT_OSS = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               vocab_size=64, max_position_embeddings=64, intermediate_size=64,
               num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
               sliding_window=16)

# config.json's quantization_config as the gpt-oss release has it.
MXFP4_CONFIG = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
                "quant_method": "mxfp4"}


def test_gpt_oss_mxfp4(tmp_path, moegen_cmd):
    """gpt-oss experts as mxfp4 blocks and scales (two groups of 32 per row
    on both matrices), read by transformers and by moegen kept in mxfp4."""
    H = GPT_OSS["hidden_size"]
    ckpt = _build("GptOssConfig", GPT_OSS, tmp_path)
    sd = safetensors_torch.load_file(str(ckpt))
    packed = {}
    for k in list(sd):
        if k.endswith(".experts.gate_up_proj") or k.endswith(".experts.down_proj"):
            # transformers holds [E, in, out]; the release stores out-major
            w = sd.pop(k).transpose(1, 2).contiguous().numpy()
            blocks, scales = pack_mxfp4(w)
            sd[k + "_blocks"] = torch.from_numpy(blocks)
            sd[k + "_scales"] = torch.from_numpy(scales)
            packed[k] = (blocks, scales)
    assert len(packed) == 2 * GPT_OSS["num_hidden_layers"]
    safetensors_torch.save_file(sd, str(ckpt), metadata={"format": "pt"})
    _add_quant_config(tmp_path, MXFP4_CONFIG)

    model = _hf_load(tmp_path, transformers.Mxfp4Config(dequantize=True))
    for k, (blocks, scales) in packed.items():
        p = model.get_parameter(k)
        assert p.dtype == torch.float32
        want = unpack_mxfp4(blocks, scales).transpose(0, 2, 1)
        assert np.array_equal(p.detach().numpy(), want), "%s: transformers decoded otherwise" % k

    so = _moegen_model(moegen_cmd, tmp_path, "experts: mxfp4")
    layers = list(range(GPT_OSS["num_hidden_layers"]))
    _check(_compare(model, layers, so, ckpt, H, "mxfp4"), "gpt_oss mxfp4")

    # The same comparison fails on the checkpoint with the two codes of each
    # byte swapped (the nibble order): it sees the layout.
    for k, (blocks, _) in packed.items():
        sd[k + "_blocks"] = torch.from_numpy(((blocks << 4) | (blocks >> 4)).astype(np.uint8))
    swapped = tmp_path / "swapped.safetensors"
    safetensors_torch.save_file(sd, str(swapped), metadata={"format": "pt"})
    for L, err, _ in _compare(model, layers, so, swapped, H, "mxfp4"):
        assert err > 10 * TOL, "layer %d: swapped nibbles went unnoticed (%.3g)" % (L, err)


DEEPSEEK_V3 = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   vocab_size=64, max_position_embeddings=64, intermediate_size=256,
                   moe_intermediate_size=256, num_hidden_layers=3, n_routed_experts=8,
                   n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                   n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                   kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                   v_head_dim=8)

# config.json's quantization_config as the DeepSeek-V3 release has it.
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
              "weight_block_size": [128, 128]}


def test_deepseek_v3_fp8(tmp_path, moegen_cmd):
    """DeepSeek-V3 with every decoder nn.Linear in fp8 e4m3 and [128, 128]
    block scales (the experts [256, 128] and [128, 256]: two tiles each way),
    read by transformers and by moegen kept in fp8."""
    H = DEEPSEEK_V3["hidden_size"]
    ckpt = _build("DeepseekV3Config", DEEPSEEK_V3, tmp_path)
    sd = safetensors_torch.load_file(str(ckpt))
    packed = {}
    for k in sorted(sd):
        w = sd[k]
        if (k.startswith("model.layers.") and k.endswith(".weight") and w.dim() == 2 and
                not k.endswith(".mlp.gate.weight")):
            q, s = pack_fp8(w)
            sd[k] = q
            sd[k[:-len("weight")] + "weight_scale_inv"] = s
            packed[k] = (q, s)
    assert any(".mlp.experts.7.down_proj." in k for k in packed)
    safetensors_torch.save_file(sd, str(ckpt), metadata={"format": "pt"})
    _add_quant_config(tmp_path, FP8_CONFIG)

    model = _hf_load(tmp_path, transformers.FineGrainedFP8Config(dequantize=True))
    E, I = DEEPSEEK_V3["n_routed_experts"], DEEPSEEK_V3["moe_intermediate_size"]
    layers = list(range(DEEPSEEK_V3["first_k_dense_replace"], DEEPSEEK_V3["num_hidden_layers"]))
    for L in layers:
        mlp = model.model.layers[L].mlp
        pre = "model.layers.%d.mlp." % L
        gate_up, down = mlp.experts.gate_up_proj.detach(), mlp.experts.down_proj.detach()
        assert gate_up.dtype == torch.float32
        for e in range(E):
            x = pre + "experts.%d." % e
            assert torch.equal(gate_up[e, :I], unpack_fp8(*packed[x + "gate_proj.weight"]))
            assert torch.equal(gate_up[e, I:], unpack_fp8(*packed[x + "up_proj.weight"]))
            assert torch.equal(down[e], unpack_fp8(*packed[x + "down_proj.weight"]))
        for p in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(mlp.shared_experts, p)
            want = unpack_fp8(*packed[pre + "shared_experts.%s.weight" % p])
            assert torch.equal(lin.weight.detach(), want), "shared %s decoded otherwise" % p

    so = _moegen_model(moegen_cmd, tmp_path, "experts: {kind: fp8, group: 128}")
    _check(_compare(model, layers, so, ckpt, H, "fp8"), "deepseek_v3 fp8")

    # The same comparison fails when the two row tiles' scales of every
    # routed gate_proj are exchanged: it sees which tile a scale covers.
    for L in layers:
        for e in range(E):
            k = "model.layers.%d.mlp.experts.%d.gate_proj.weight_scale_inv" % (L, e)
            sd[k] = sd[k].flip(0).contiguous()
    swapped = tmp_path / "swapped.safetensors"
    safetensors_torch.save_file(sd, str(swapped), metadata={"format": "pt"})
    for L, err, _ in _compare(model, layers, so, swapped, H, "fp8"):
        assert err > 10 * TOL, "layer %d: exchanged scales went unnoticed (%.3g)" % (L, err)
