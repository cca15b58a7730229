"""`trinityx export` on a tiny MoCaE folder: exported artifacts compute what the MoCaE model computes.

- merged: a plain `AutoModelForCausalLM` folder whose logits equal the MoCaE model's with the same fixed gates
  (given weights, negative ones included; the router's gates for a prompt; uniform);
- peft: three PEFT adapters that load on their own (each equals MoCaE with that expert's one-hot gate), the
  router, and a README whose mixture recipe (a linear merge) reproduces the MoCaE mixture.
"""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from trinityx.apps.export import ExportConfig, export
from trinityx.errors import TrinityXError
from trinityx.lora.taskvectors import merge
from trinityx.mocae import MoCaEConfig, MoCaEModel

from tiny import NAMES, TARGETS, load, make_mocae_folder

PROMPTS = ["Give three tips for staying healthy.", "What happens if you eat watermelon seeds?"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def folder(tiny_backbone, tmp_path_factory):
    return make_mocae_folder(tiny_backbone, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def tokens(tiny_backbone):
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    tok.padding_side = "left"
    return tok(PROMPTS, return_tensors="pt", padding=True)


@torch.no_grad()
def mocae_logits(folder, backbone, tokens, **gating):
    model = MoCaEModel.from_pretrained(folder, load(backbone))
    model.set_gating(**gating)
    return model(tokens.input_ids, tokens.attention_mask).logits


@torch.no_grad()
def logits_of(model, tokens):
    from trinityx.mocae.model import positions

    return model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                 position_ids=positions(tokens.attention_mask)).logits


@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0), (0.5, 1.0, -0.5)])
def test_merged_export_equals_mocae_with_the_same_fixed_weights(folder, tiny_backbone, tokens, tmp_path, weights):
    out = export(ExportConfig(run=folder, format="merged", out=tmp_path / "merged", weights=weights))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no trinityx code
    assert AutoTokenizer.from_pretrained(out).chat_template
    want = mocae_logits(folder, tiny_backbone, tokens, gate_mode="fixed", fixed_weights=list(weights))
    got = logits_of(merged, tokens)
    assert torch.allclose(got, want, atol=ATOL), (got - want).abs().max()
    base = logits_of(load(tiny_backbone), tokens)
    assert not torch.allclose(got, base, atol=1e-2)  # the mixture is really in the weights
    record = json.loads((out / "trinityx_export.json").read_text())
    assert record["weights"] == list(weights) and record["weights_from"] == "weights"


def test_merged_export_of_a_prompts_gates_and_of_uniform(folder, tiny_backbone, tokens, tmp_path):
    out = export(ExportConfig(run=folder, format="merged", out=tmp_path / "routed", prompt=PROMPTS[1]))
    single = AutoTokenizer.from_pretrained(tiny_backbone)([PROMPTS[1]], return_tensors="pt")
    # The router routes the chat-formatted prompt; the export equals MoCaE with those gates fixed.
    model = MoCaEModel.from_pretrained(folder, load(tiny_backbone))
    from trinityx.apps.export import prompt_gates

    gates = prompt_gates(model, AutoTokenizer.from_pretrained(tiny_backbone), "chat", PROMPTS[1])
    assert not torch.allclose(gates, torch.full((3,), 1 / 3), atol=1e-2)  # a random router: gates not uniform
    recorded = json.loads((out / "trinityx_export.json").read_text())["weights"]
    assert recorded == pytest.approx(gates.tolist(), abs=1e-6)
    want = mocae_logits(folder, tiny_backbone, single, gate_mode="fixed", fixed_weights=recorded)
    assert torch.allclose(logits_of(AutoModelForCausalLM.from_pretrained(out), single), want, atol=ATOL)

    uniform = export(ExportConfig(run=folder, format="merged", out=tmp_path / "uniform"))
    want = mocae_logits(folder, tiny_backbone, tokens, gate_mode="uniform")
    assert torch.allclose(logits_of(AutoModelForCausalLM.from_pretrained(uniform), tokens), want, atol=ATOL)


def test_peft_export_loads_and_reproduces_the_mixture(folder, tiny_backbone, tokens, tmp_path):
    weights = (1.0, 0.5, -0.5)
    out = export(ExportConfig(run=folder, format="peft", out=tmp_path / "peft", weights=weights))
    assert {p.name for p in out.iterdir()} >= {"experts", "router.safetensors", "mocae_config.json", "README.md"}
    for k, name in enumerate(NAMES):
        expert = PeftModel.from_pretrained(load(tiny_backbone), out / "experts" / name).eval()
        one_hot = [float(i == k) for i in range(3)]
        want = mocae_logits(folder, tiny_backbone, tokens, gate_mode="fixed", fixed_weights=one_hot)
        assert torch.allclose(logits_of(expert, tokens), want, atol=ATOL)
    readme = (out / "README.md").read_text()
    assert "vllm serve BASE --enable-lora" in readme
    assert f"helpful={out}/experts/helpful harmless={out}/experts/harmless honest={out}/experts/honest" in readme
    assert "weights=[1, 0.5, -0.5]" in readme
    # The README's recipe: a linear merge of the exported experts is the MoCaE mixture as one LoRA.
    mixture = merge([out / "experts" / n for n in NAMES], weights=list(weights), method="linear", out=out / "mixture")
    merged = PeftModel.from_pretrained(load(tiny_backbone), mixture).eval()
    want = mocae_logits(folder, tiny_backbone, tokens, gate_mode="fixed", fixed_weights=list(weights))
    assert torch.allclose(logits_of(merged, tokens), want, atol=ATOL)
    # The export is itself a MoCaE folder with the same router.
    again = mocae_logits(out, tiny_backbone, tokens)
    assert torch.allclose(again, mocae_logits(folder, tiny_backbone, tokens), atol=1e-6)


def test_export_refuses_bad_input(folder, tmp_path):
    with pytest.raises(TrinityXError, match="--weights has 2 values"):
        export(ExportConfig(run=folder, format="merged", out=tmp_path / "x", weights=(1.0, 0.0)))
    with pytest.raises(TrinityXError, match="not both"):
        export(ExportConfig(run=folder, format="peft", out=tmp_path / "x", weights=(1.0, 0.0, 0.0), prompt="hi"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(TrinityXError, match="already exists"):
        export(ExportConfig(run=folder, format="peft", out=tmp_path / "taken"))
    with pytest.raises(TrinityXError, match="not a MoCaE folder"):
        export(ExportConfig(run=tmp_path, format="peft", out=tmp_path / "y"))


def test_expert_names_cannot_reach_outside_the_folders(folder, tmp_path):
    # A mocae_config.json whose expert name climbs out of experts/ is refused before anything is copied or written.
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    config = json.loads((run / "mocae_config.json").read_text())
    config["expert_names"][0] = "../../outside"
    (run / "mocae_config.json").write_text(json.dumps(config))
    out = tmp_path / "export" / "x"
    with pytest.raises(TrinityXError, match=r"mocae_config.json.*'\.\./\.\./outside' is not a plain name"):
        export(ExportConfig(run=run, format="peft", out=out))
    assert not (tmp_path / "export").exists()


def test_corrupt_expert_files_name_the_file(folder, tiny_backbone, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    weights = run / "experts" / NAMES[1] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(TrinityXError, match=f"{weights} cannot be read.*retrain or recopy"):
        MoCaEModel.from_pretrained(run, load(tiny_backbone))
    config = run / "experts" / NAMES[0] / "adapter_config.json"
    config.write_text('{"r": 4, "lora_alpha"')
    with pytest.raises(TrinityXError, match=f"{config} is not valid JSON"):
        MoCaEModel.from_pretrained(run, load(tiny_backbone))
    (run / "mocae_config.json").write_bytes(b'{"expert_names": ["\xff"]}')
    with pytest.raises(TrinityXError, match=f"{run / 'mocae_config.json'}: .*utf-8"):
        export(ExportConfig(run=run, format="peft", out=tmp_path / "y"))
