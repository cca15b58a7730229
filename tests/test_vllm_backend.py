"""The vLLM generation backend's plumbing, against a stand-in `vllm` module (vLLM needs CUDA; CI has none).

The stand-in implements the part of vLLM's API the backend uses (`LLM.generate` with token-id prompts and one
`LoRARequest` per prompt, `SamplingParams`) with transformers + PEFT greedy decoding, so the tests check what
the backend sends: the right adapter for each prompt (for MoCaE, the merged LoRA of that prompt's gates), the
same tokens as the Hugging Face path, and the answers coming back in order.
"""

import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from test_evaluate import PROMPTS, make_expert, make_mocae, DIMS  # noqa: F401  (fixtures below reuse them)
from trinityx.backbones import load_backbone
from trinityx.errors import TrinityXError
from trinityx.infer import vllm_backend
from trinityx.infer.generation import GenerationSettings
from trinityx.infer.systems import load_system


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list = field(default_factory=list)


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


class LLM:
    """Greedy decoding of token-id prompts with transformers; each prompt's LoRA loaded with PEFT."""

    instances: list = []

    def __init__(self, model, dtype="float32", seed=0, enable_lora=False, max_lora_rank=None, max_loras=1):
        self.model, self.kwargs = model, dict(enable_lora=enable_lora, max_lora_rank=max_lora_rank)
        self.calls = []
        LLM.instances.append(self)

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model)
        requests = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
        self.calls.append(requests)
        outputs = []
        for prompt, request in zip(prompts, requests):
            assert params.temperature == 0.0
            if request is not None:
                assert self.kwargs["enable_lora"]
                assert self.kwargs["max_lora_rank"] >= vllm_backend.lora_rank(__import__("pathlib").Path(request.lora_path))
            model = AutoModelForCausalLM.from_pretrained(self.model)
            if request is not None:
                model = PeftModel.from_pretrained(model, request.lora_path)
            ids = torch.tensor([prompt["prompt_token_ids"]])
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=params.max_tokens, pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            for s in params.stop:
                text = text.split(s, 1)[0]
            outputs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(text=text)]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    for name, module in {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(vllm_backend, "_ENGINES", {})
    LLM.instances = []
    return vllm


@pytest.fixture(scope="module")
def run(tiny_backbone, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    (run / "run.json").write_text(f'{{"backbone": "{tiny_backbone}"}}')
    for k, d in enumerate(DIMS):
        make_expert(tiny_backbone, run / "experts" / d, seed=k + 1)
    make_mocae(tiny_backbone, run, "mocae", "sequence", seed=7)
    make_mocae(tiny_backbone, run, "mocae-token", "token", seed=8)
    return run


@pytest.fixture(scope="module")
def backbone(tiny_backbone):
    torch.set_num_threads(1)
    return load_backbone(str(tiny_backbone))


def answers(system, backend, tmp_path, **kw):
    settings = GenerationSettings(max_new_tokens=6, batch_size=2, backend=backend, **kw)
    return system.generate(PROMPTS, settings, tmp_path / backend)


def test_missing_vllm_is_a_clear_error(run, backbone, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    s = load_system("base", run, backbone)
    with pytest.raises(TrinityXError, match=r"pip install \"trinityx\[vllm\]\""):
        answers(s, "vllm", tmp_path)
    s.close()


@pytest.mark.parametrize("spec", ["base", "expert:harmless"])
def test_vllm_answers_equal_hf_answers(spec, run, backbone, tmp_path, fake_vllm):
    s = load_system(spec, run, backbone)
    hf = answers(s, "hf", tmp_path)
    vllm = answers(s, "vllm", tmp_path)
    s.close()
    assert vllm == hf and any(a.strip() for a in hf)
    (engine,) = LLM.instances
    if spec == "base":
        assert engine.calls == [[None] * len(PROMPTS)] or engine.calls == [None]
    else:
        assert {r.lora_path for r in engine.calls[0]} == {str(run / "experts" / "harmless")}


@pytest.mark.parametrize("gate_mode", ["learned", "top1"])
def test_vllm_serves_each_prompt_the_merge_of_its_gates(gate_mode, run, backbone, tmp_path, fake_vllm):
    spec = "trinityx" if gate_mode == "learned" else "trinityx:top1"
    s = load_system(spec, run, backbone)
    hf = answers(s, "hf", tmp_path)
    vllm = answers(s, "vllm", tmp_path, gate_decimals=8)  # groups only prompts with equal gates
    gates = s.gates(PROMPTS)
    s.close()
    assert vllm == hf
    requests = LLM.instances[0].calls[0]
    distinct = {tuple(round(x, 8) for x in g) for g in gates.tolist()}
    assert len({r.lora_path for r in requests}) == len(distinct)
    if gate_mode == "top1":
        assert all(set(g) <= {0.0, 1.0} for g in distinct)
    else:
        assert len(distinct) == len(PROMPTS)  # learned gates: one merged LoRA per prompt


def test_vllm_refuses_the_token_router(run, backbone, tmp_path, fake_vllm):
    s = load_system("trinityx-token", run, backbone)
    with pytest.raises(TrinityXError, match="per token"):
        answers(s, "vllm", tmp_path)
    s.close()


def test_vllm_answers_are_cached_apart_from_hf_answers(run, backbone, tmp_path, fake_vllm):
    hf = GenerationSettings(max_new_tokens=6)
    assert "backend" not in hf.key()  # old caches stay valid
    assert GenerationSettings(max_new_tokens=6, backend="vllm").key() != hf.key()
