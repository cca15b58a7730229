"""MoCaE meaning tests on a tiny Llama: parity with PEFT, routing invariants, objective, training, artifacts."""

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from trinityx.mocae import MixtureLinear, MoCaEConfig, MoCaEModel
from trinityx.mocae.layer import mixture_delta, rank_gates
from trinityx.mocae.objective import mean_gate, router_objective

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATOL = 1e-5
PROMPTS = ["Give three tips for staying healthy.", "What happens if you eat watermelon seeds?", "yes"]


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_expert(backbone, out, seed: int, zero: bool = False):
    """A PEFT LoRA adapter folder with seeded random A and B (B = 0 if zero)."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(load(backbone), config)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.zeros_like(p) if zero else torch.randn(p.shape, generator=g) * 0.3
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def experts(tiny_backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return [make_expert(tiny_backbone, root / f"e{k}", seed=k + 1) for k in range(3)]


@pytest.fixture(scope="module")
def tokenizer(tiny_backbone):
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    tok.padding_side = "left"
    return tok


def mocae(backbone, experts, **config):
    names = [f"x{k}" for k in range(len(experts))]
    return MoCaEModel(load(backbone), experts, MoCaEConfig(expert_names=names, backbone=str(backbone), **config)).eval()


def randomize_router(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.router.parameters():
        p.data = torch.randn(p.shape, generator=g) * 2.0
    return model


def peft_model(backbone, experts):
    model = PeftModel.from_pretrained(load(backbone), experts[0], adapter_name="e0")
    for k, folder in enumerate(experts[1:], start=1):
        model.load_adapter(folder, adapter_name=f"e{k}")
    return model.eval()


def batch(tokenizer, prompts=PROMPTS):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def test_mixture_delta_is_the_sum_over_experts():
    g = torch.Generator().manual_seed(0)
    K, R, D_in, D_out, Bsz, T = 3, 4, 6, 5, 2, 7
    A, B, x = torch.randn(K, R, D_in, generator=g), torch.randn(K, D_out, R, generator=g), torch.randn(Bsz, T, D_in, generator=g)
    gates = torch.softmax(torch.randn(Bsz, K, generator=g), -1)
    # The reference: a loop over examples and experts of g_bk * s * B_k A_k x_b.
    want = torch.stack([sum(gates[b, k] * 2.0 * x[b] @ (B[k] @ A[k]).T for k in range(K)) for b in range(Bsz)])
    A_cat, B_cat_T = A.reshape(K * R, D_in), B.transpose(1, 2).reshape(K * R, D_out)
    assert rank_gates(gates, R, 2.0).shape == (Bsz, 1, K * R)
    torch.testing.assert_close(mixture_delta(x, A_cat, B_cat_T, rank_gates(gates, R, 2.0)), want, atol=ATOL, rtol=0)
    token_gates = gates[:, None, :].expand(Bsz, T, K)  # the same gate on every token
    assert rank_gates(token_gates, R, 2.0).shape == (Bsz, T, K * R)
    torch.testing.assert_close(mixture_delta(x, A_cat, B_cat_T, rank_gates(token_gates, R, 2.0)), want, atol=ATOL, rtol=0)
    # The layer's own fast path (one accumulating product) and its views of the stored experts give the same.
    layer = MixtureLinear(torch.nn.Linear(D_in, D_out, bias=True), A, B, 2.0)
    for view, stored in zip(layer.stacked(), (layer.lora_A, layer.lora_B)):
        assert view.data_ptr() == stored.data_ptr() and view._base is not None  # a view, not a copy
    torch.testing.assert_close(layer.lora_B, B, atol=0, rtol=0)
    base = layer(x)
    layer.set_gates(gates)
    torch.testing.assert_close(layer(x), base + want, atol=ATOL, rtol=0)
    layer.base_layer.double()  # a backbone in another dtype than its experts: the mixed-dtype path
    torch.testing.assert_close(layer(x.double()), (base + want).double(), atol=ATOL, rtol=0)
    layer.base_layer.float()
    layer.clear()
    torch.testing.assert_close(layer(x), base, atol=0, rtol=0)


@torch.no_grad()
def test_one_hot_and_constant_gates_equal_peft(tiny_backbone, experts, tokenizer):
    ids, mask = tokenizer(PROMPTS[:1] * 2, return_tensors="pt").values()
    reference = peft_model(tiny_backbone, experts)
    model = mocae(tiny_backbone, experts, gate_mode="fixed", fixed_weights=[1.0, 0.0, 0.0])
    assert sum(isinstance(m, MixtureLinear) for m in model.modules()) == 2 * len(TARGETS)
    base = load(tiny_backbone)(ids, attention_mask=mask).logits
    for k in range(3):
        reference.set_adapter(f"e{k}")
        want = reference(input_ids=ids, attention_mask=mask).logits
        assert (want - base).abs().max() > 1e-2  # the expert really changes the model
        model.set_gating(fixed_weights=[float(j == k) for j in range(3)])
        torch.testing.assert_close(model(ids, mask).logits, want, atol=ATOL, rtol=0)

    w = [0.5, 0.3, 0.2]
    reference.add_weighted_adapter(["e0", "e1", "e2"], w, "mix", combination_type="cat")
    reference.set_adapter("mix")
    model.set_gating(fixed_weights=w)
    torch.testing.assert_close(model(ids, mask).logits, reference(input_ids=ids, attention_mask=mask).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_zero_experts_and_negated_twins_equal_base(tiny_backbone, experts, tokenizer, tmp_path):
    ids, mask = batch(tokenizer)
    base = load(tiny_backbone)(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    zeros = [make_expert(tiny_backbone, tmp_path / f"z{k}", seed=k, zero=True) for k in range(3)]
    model = randomize_router(mocae(tiny_backbone, zeros))
    torch.testing.assert_close(model(ids, mask).logits, base, atol=ATOL, rtol=0)
    # Behaviour negation: +T_0 - T_0 is no change at all (K = 2 here: nothing assumes 3).
    twins = mocae(tiny_backbone, [experts[0], experts[0]], gate_mode="fixed", fixed_weights=[1.0, -1.0])
    torch.testing.assert_close(twins(ids, mask).logits, base, atol=ATOL, rtol=0)


@torch.no_grad()
def test_mixed_gate_batch_equals_rows_alone_and_set_gates_is_exact(tiny_backbone, experts, tokenizer):
    model = randomize_router(mocae(tiny_backbone, experts))
    ids, mask = batch(tokenizer)
    out = model(ids, mask)
    assert out.gates.shape == (3, 3)
    assert (out.gates[0] - out.gates[1]).abs().max() > 0.05  # rows really get different gates
    for b, prompt in enumerate(PROMPTS):
        one_ids, one_mask = batch(tokenizer, [prompt])
        alone = model(one_ids, one_mask)
        n = int(one_mask.sum())
        torch.testing.assert_close(out.gates[b], alone.gates[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(out.logits[b, -n:], alone.logits[0], atol=ATOL, rtol=0)

    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with model.apply_gates(out.gates):  # the gates generation sets once for a whole answer
        gated = model.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(gated, out.logits, atol=ATOL, rtol=0)
    assert all(m.routed is None for m in model.mixtures)  # gates never leak


@torch.no_grad()
def test_router_features_concatenate_layers_and_poolings(tiny_backbone, experts, tokenizer):
    from trinityx.mocae.router import last_prompt_token, pool_prompt

    ids, mask = batch(tokenizer)  # left-padded
    full = mocae(tiny_backbone, experts).backbone.get_decoder()(
        input_ids=ids, attention_mask=mask, output_hidden_states=True,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).hidden_states
    model = mocae(tiny_backbone, experts, pool_layer=1, pool_layers=[0], pooling="mean+last")
    D = full[0].shape[-1]
    assert model.router.head[0].in_features == 4 * D  # 2 layers x (mean, last)
    normed = [model.router_input(full[layer]) for layer in (1, 0)]
    expected = torch.cat([pool_prompt(normed[0], mask), last_prompt_token(normed[0], mask),
                          pool_prompt(normed[1], mask), last_prompt_token(normed[1], mask)], -1)
    torch.testing.assert_close(model.pooled_prompt(ids, mask), expected)
    # Left padding: the last prompt token is the last position; right padding: the last 1 of the mask.
    h = torch.arange(12.0).reshape(2, 3, 2)
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(last_prompt_token(h, right), torch.stack([h[0, 1], h[1, 2]]))


@torch.no_grad()
def test_routing_pass_stops_at_the_pool_layer(tiny_backbone, experts, tokenizer):
    ids, mask = batch(tokenizer)
    decoder = mocae(tiny_backbone, experts).backbone.get_decoder()
    full = decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).hidden_states  # embeddings, layer 1, ..., L
    n_layers = len(decoder.layers)
    for pool_layer in [*range(n_layers + 1), -1]:
        model = mocae(tiny_backbone, experts, pool_layer=pool_layer)
        ran = []
        for i, layer in enumerate(model.backbone.get_decoder().layers):
            layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
        torch.testing.assert_close(model.pooled_hidden(ids, mask), full[pool_layer], atol=0, rtol=0)
        # embeddings (0) and the last layer need a full pass; an intermediate layer l runs layers 1..l only
        assert len(ran) == (n_layers if pool_layer in (0, n_layers, -1) else pool_layer), pool_layer


@torch.no_grad()
def test_generate_batch_equals_rows(tiny_backbone, experts, tokenizer):
    model = randomize_router(mocae(tiny_backbone, experts))
    ids, mask = batch(tokenizer)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    out = model.generate(ids, mask, **kw)
    base = load(tiny_backbone).generate(input_ids=ids, attention_mask=mask, **kw)
    assert not torch.equal(out, base)  # the experts change what is generated
    for b, prompt in enumerate(PROMPTS):
        one_ids, one_mask = batch(tokenizer, [prompt])
        row = model.generate(one_ids, one_mask, **kw)[0, one_ids.shape[1]:]
        assert out[b, ids.shape[1]: ids.shape[1] + len(row)].tolist() == row.tolist()


@torch.no_grad()
def test_token_routing(tiny_backbone, experts, tokenizer):
    ids, mask = batch(tokenizer)
    model = randomize_router(mocae(tiny_backbone, experts, router="token", head_hidden=8))
    out = model(ids, mask)
    L, (B, T) = 2, ids.shape
    assert out.gates.shape == (L, B, T, 3)  # a [B, T, K] gate per adapted decoder layer
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(L, B, T))
    assert out.gates[:, 0].std(dim=1).max() > 1e-3  # gates vary from token to token
    assert out.gate_logits.shape == (B, 3)
    generated = model.generate(ids, mask, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (B, T + 3)

    # A one-hot gate on every token is expert k alone, as for sequence routing.
    ids, mask = tokenizer(PROMPTS[:1], return_tensors="pt").values()
    model.set_gating(gate_mode="fixed", fixed_weights=[0.0, 1.0, 0.0])
    reference = peft_model(tiny_backbone, experts)
    reference.set_adapter("e1")
    torch.testing.assert_close(model(ids, mask).logits, reference(input_ids=ids, attention_mask=mask).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_unload_leaves_the_backbone_bare_and_merge_and_unload_equals_the_mixture(tiny_backbone, experts, tokenizer):
    ids, mask = batch(tokenizer)
    kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    base = load(tiny_backbone)(ids, **kwargs).logits
    model = randomize_router(mocae(tiny_backbone, experts, router="token", head_hidden=8))
    bare = model.unload()
    assert not any(isinstance(m, MixtureLinear) for m in bare.modules()) and not model.mixtures
    assert not any(m._forward_pre_hooks for m in bare.modules())  # the token router's hooks are gone too
    torch.testing.assert_close(bare(ids, **kwargs).logits, base, atol=ATOL, rtol=0)

    w = [0.5, 0.3, 0.2]
    model = mocae(tiny_backbone, experts, gate_mode="fixed", fixed_weights=w)
    want = model(ids, mask).logits
    merged = model.merge_and_unload(torch.tensor(w))
    assert not any(isinstance(m, MixtureLinear) for m in merged.modules())
    torch.testing.assert_close(merged(ids, **kwargs).logits, want, atol=1e-4, rtol=0)


def test_router_objective_golden():
    logits = torch.zeros(2, 2)  # both gates are [0.5, 0.5]
    labels = torch.tensor([0, 1])
    gamma = torch.tensor([0.75, 0.25])
    # GL = CE of uniform logits = log 2; RL = KL([.5, .5] || [.75, .25]) = .5 log(.5/.75) + .5 log(.5/.25) = .5 log(4/3)
    total, parts = router_objective(torch.tensor(2.0), logits, labels, gamma, {"lm": 1, "gl": 1, "rl": 1})
    assert parts["gl"] == pytest.approx(math.log(2))
    assert parts["rl"] == pytest.approx(0.5 * math.log(4 / 3))
    assert float(total) == pytest.approx(2.0 + math.log(2) + 0.5 * math.log(4 / 3))
    assert "entropy" not in parts and "step_kl" not in parts  # weight 0 (default) and no previous step: off
    total, parts = router_objective(None, logits, labels, gamma, {"lm": 0, "gl": 0, "rl": 0, "entropy": 2, "step_kl": 1},
                                    prev_mean=torch.tensor([0.5, 0.5]))
    # entropy of [.5, .5] = log 2; the mean gate equals the previous one, so the step KL is 0
    assert set(parts) == {"entropy", "step_kl", "total"}
    assert float(total) == pytest.approx(2 * math.log(2))
    assert parts["step_kl"] == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="unknown"):
        router_objective(None, logits, labels, gamma, {"gating": 1})


TOY = {  # prompts differ by dimension, so the dimension is learnable from the prompt alone
    0: ["Give three tips for staying healthy.", "Give tips: eat well, sleep enough.", "Give three tips for exercise.",
        "Give tips for a healthy sleep."],
    1: ["I cannot help with that request.", "It could hurt someone.", "I cannot help, it could hurt.",
        "That request could hurt someone."],
    2: ["What happens if you eat watermelon seeds?", "true or false?", "Nothing happens; they pass through.",
        "Is it true? yes or no"],
}


def toy_batch(tokenizer):
    """Chat-formatted prompt + answer, right padded; labels mask prompt and padding out of the LM loss."""
    rows, dims = [], []
    for dim, prompts in TOY.items():
        for prompt in prompts:
            p = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
            rows.append((tokenizer(p)["input_ids"], tokenizer("helpful harmless honest<|im_end|>")["input_ids"]))
            dims.append(dim)
    T = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_token_id)
    mask, prompt_mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
        prompt_mask[i, : len(p)] = 1
        labels[i, len(p): len(p) + len(a)] = torch.tensor(a)
    return ids, mask, prompt_mask, labels, torch.tensor(dims)


def test_router_training_smoke(tiny_backbone, experts, tokenizer):
    torch.manual_seed(0)
    model = mocae(tiny_backbone, experts, head_hidden=16).train()
    ids, mask, prompt_mask, labels, dims = toy_batch(tokenizer)
    gamma = torch.full((3,), 1 / 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in before if n.startswith("router.")}

    # The LM loss alone reaches the router through the gates.
    out = model(ids, mask, prompt_mask, labels)
    out.loss.backward()
    assert model.router.head[-1].weight.grad.abs().sum() > 0
    model.zero_grad()

    def accuracy():
        with torch.no_grad():
            return float((model.route(ids, mask, prompt_mask).argmax(-1) == dims).float().mean())

    acc_before = accuracy()
    opt = torch.optim.AdamW(model.router.parameters(), lr=3e-2)
    weights, prev, totals = {"lm": 1.0, "gl": 1.0, "rl": 0.1, "step_kl": 0.1}, None, []
    for _ in range(25):
        out = model(ids, mask, prompt_mask, labels)
        total, parts = router_objective(out.loss, out.gate_logits, dims, gamma, weights, prev_mean=prev)
        opt.zero_grad()
        total.backward()
        opt.step()
        prev = mean_gate(out.gate_logits).detach()
        totals.append(parts["total"])
    assert totals[-1] < totals[0] - 0.5
    assert accuracy() > acc_before and accuracy() >= 0.9
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed == {n for n in before if n.startswith("router.")}


@torch.no_grad()
def test_save_load_round_trip(tiny_backbone, experts, tokenizer, tmp_path):
    model = randomize_router(mocae(tiny_backbone, experts, head_hidden=8, temperature=1.7))
    ids, mask = batch(tokenizer)
    want = model(ids, mask)
    folder = model.save_pretrained(tmp_path / "mocae")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["experts/x0/adapter_config.json", "experts/x0/adapter_model.safetensors",
                     "experts/x1/adapter_config.json", "experts/x1/adapter_model.safetensors",
                     "experts/x2/adapter_config.json", "experts/x2/adapter_model.safetensors",
                     "mocae_config.json", "router.safetensors"]
    for loaded in (MoCaEModel.from_pretrained(folder, backbone_model=load(tiny_backbone)), MoCaEModel.from_pretrained(folder)):
        got = loaded(ids, mask)
        assert loaded.config == model.config
        assert torch.equal(got.logits, want.logits) and torch.equal(got.gate_logits, want.gate_logits)
    # A folder saved before `normalize_hidden` existed loads as it was trained: without the normalisation.
    config_file = folder / "mocae_config.json"
    old = {k: v for k, v in json.loads(config_file.read_text()).items() if k != "normalize_hidden"}
    config_file.write_text(json.dumps(old))
    assert model.config.normalize_hidden and not MoCaEModel.from_pretrained(folder).config.normalize_hidden
    # The expert folders are still plain PEFT adapters.
    alone = PeftModel.from_pretrained(load(tiny_backbone), folder / "experts" / "x2")
    model.set_gating(gate_mode="fixed", fixed_weights=[0.0, 0.0, 1.0])
    ids, mask = tokenizer(PROMPTS[:1], return_tensors="pt").values()
    torch.testing.assert_close(model(ids, mask).logits, alone(input_ids=ids, attention_mask=mask).logits, atol=ATOL, rtol=0)
