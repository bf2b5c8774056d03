"""moegen.torch.swap_moe on whole transformers models: a tiny random Mixtral,
Qwen3-MoE and DeepSeek-V3 (the configurations of test_parity.py, f32, eval)
generate greedily with their own MoE blocks, then again with every block
swapped for moegen's (config imported, compiled, weights from the model's own
state dict): the tokens must be the same and every step's logits within
1e-5 of the largest logit."""

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import moegen.torch as mt  # noqa: E402
from test_parity import FAMILIES, _reinit  # noqa: E402

TOL = 1e-5
NEW = 4
SWAP = {f.name: f for f in FAMILIES if f.name in ("mixtral", "qwen3_moe", "deepseek_v3")}


def _model(fam):
    cfg_cls = getattr(transformers, fam.config, None)
    if cfg_cls is None:
        pytest.skip("transformers %s has no %s" % (transformers.__version__, fam.config))
    torch.manual_seed(0)
    kw = dict(fam.kwargs)
    if fam.model_type == "deepseek_v3":
        # multi-head latent attention has as many key/value heads as query
        # heads (test_parity.py runs the MoE blocks alone and never attends)
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    cfg = cfg_cls(**kw)
    try:
        model = transformers.AutoModelForCausalLM.from_config(
            cfg, dtype=torch.float32, experts_implementation="eager")
    except (TypeError, ValueError):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    _reinit(model, 1234)
    return model


def _generate(model, ids):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


def _err(logits, ref):
    return float((logits - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", sorted(SWAP))
def test_swap_generate(name, moegen_cmd):
    model = _model(SWAP[name])
    ids = torch.randint(0, model.config.vocab_size, (2, 6),
                        generator=torch.Generator().manual_seed(3))
    ref_tokens, ref_logits = _generate(model, ids)
    n_blocks = len(mt.find_moe_blocks(model))
    assert n_blocks >= 1

    mt.swap_moe(model, moegen=moegen_cmd)  # in a temporary directory
    swapped = [m for m in model.modules() if isinstance(m, mt.MoegenBlock)]
    assert len(swapped) == n_blocks and not mt.find_moe_blocks(model)
    assert sorted(b.layer for b in swapped) == swapped[0].moegen_model.info.moe_layers

    calls = []
    hooks = [b.register_forward_hook(lambda *a: calls.append(1)) for b in swapped]
    tokens, logits = _generate(model, ids)
    for h in hooks:
        h.remove()
    assert len(calls) == n_blocks * NEW  # one prefill and NEW - 1 decode steps per block
    assert torch.equal(tokens, ref_tokens)
    err = _err(logits, ref_logits)
    assert err <= TOL, "%s: logits differ by %.3g of the largest" % (name, err)
    # a copy of the swapped model shares the library and gives the same logits
    twin = copy.deepcopy(model)
    assert torch.equal(_generate(twin, ids)[1], logits)


def test_swap_takes_the_models_weights(moegen_cmd, tmp_path):
    # Experts perturbed by 1% in the model before the swap: moegen must run the
    # perturbed weights (it reads the state dict), so the logits move away from
    # the unperturbed model's by far more than TOL.
    model = _model(SWAP["mixtral"])
    ids = torch.randint(0, model.config.vocab_size, (1, 6),
                        generator=torch.Generator().manual_seed(4))
    _, ref_logits = _generate(model, ids)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for _, _, block in mt.find_moe_blocks(changed):
            for p in block.experts.parameters():
                p.mul_(1.01)
    _, changed_logits = _generate(changed, ids)
    mt.swap_moe(changed, workdir=tmp_path, moegen=moegen_cmd)
    _, logits = _generate(changed, ids)
    assert _err(logits, changed_logits) <= TOL
    assert _err(logits, ref_logits) > 10 * TOL


def test_swap_bf16_model(moegen_cmd, tmp_path):
    # A bf16 Mixtral: the imported spec keeps the weights in bf16 (the state
    # dict's bits), compiled here with compute f32 (the bf16 dot kernels of an
    # avx512bf16 CPU would round the FFN activations to bf16 too). Each swapped
    # block's output is then the original block run in f32 on the same bf16
    # weights, to within the final rounding to bf16 (2^-8 of max |y|) and the
    # f32 summation order.
    fam = SWAP["mixtral"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, fam.config)(**fam.kwargs), dtype=torch.bfloat16).eval()
    _reinit(model, 1234)
    originals = {L: copy.deepcopy(b).float() for L, _, b in mt.find_moe_blocks(model)}
    mt.swap_moe(model, workdir=tmp_path, moegen=moegen_cmd, sets={"dtype.compute": "f32"})
    swapped = {b.layer: b for b in model.modules() if isinstance(b, mt.MoegenBlock)}
    assert sorted(swapped) == sorted(originals)
    info = swapped[0].moegen_model.info
    assert info.weight_dtype == "bf16" and " compute f32 " in info.description
    x = torch.randn((1, 16, fam.kwargs["hidden_size"]),
                    generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    for L, block in swapped.items():
        with torch.no_grad():
            ref = originals[L](x.float())
            y = block(x)
        assert y.dtype == torch.bfloat16
        assert _err(y.float(), ref) <= 2 ** -8 + 1e-5, "layer %d" % L
    ids = torch.randint(0, model.config.vocab_size, (1, 6),
                        generator=torch.Generator().manual_seed(5))
    tokens, _ = _generate(model, ids)
    assert tokens.shape == (1, 6 + NEW)
