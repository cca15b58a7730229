"""Task vectors: parity with PEFT's deltas, algebra, gamma, and merges checked against dense arithmetic and PEFT."""

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from trinityx.errors import TrinityXError
from trinityx.lora import adapters, taskvectors
from trinityx.lora.taskvectors import MERGE_RECORD, TaskVector, apply, gamma, merge, similarities

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = torch.tensor([[1, 17, 42, 5, 99, 230, 7, 64, 3, 150]])


def load_base(backbone):
    return AutoModelForCausalLM.from_pretrained(backbone)


def make_expert(backbone, out, seed, target_modules=ALL_MODULES, use_rslora=False):
    """A LoRA expert with random non-zero B (PEFT initialises B to zero), saved as a PEFT folder."""
    model = get_peft_model(
        load_base(backbone),
        LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0, use_rslora=use_rslora),
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn_like(param))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def experts(tiny_backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return {
        "a": make_expert(tiny_backbone, root / "a", seed=1),
        "b": make_expert(tiny_backbone, root / "b", seed=2),
        "c": make_expert(tiny_backbone, root / "c", seed=3),
        "rs": make_expert(tiny_backbone, root / "rs", seed=4, use_rslora=True),
        "qv": make_expert(tiny_backbone, root / "qv", seed=5, target_modules=["q_proj", "v_proj"]),
    }


@torch.no_grad()
def logits(model):
    return model(TOKENS).logits


def adapter_logits(backbone, adapter_dir):
    return logits(PeftModel.from_pretrained(load_base(backbone), adapter_dir))


# --------------------------------------------------------------------------------------------------------------
# Reading and algebra


@pytest.mark.parametrize("name", ["a", "rs"])
def test_from_adapter_equals_peft_delta(tiny_backbone, experts, name):
    tv = TaskVector.from_adapter(experts[name])
    model = PeftModel.from_pretrained(load_base(tiny_backbone), experts[name])
    peft_deltas = {
        module_name.removeprefix("base_model.model."): module.get_delta_weight("default")
        for module_name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    assert tv.deltas.keys() == peft_deltas.keys() and len(peft_deltas) == 2 * len(ALL_MODULES)
    for module_name, delta in peft_deltas.items():
        torch.testing.assert_close(tv.deltas[module_name], delta, rtol=1e-5, atol=1e-6)


def test_algebra(experts):
    a, b = TaskVector.from_adapter(experts["a"]), TaskVector.from_adapter(experts["b"])
    for module_name, delta in ((a + b) - b).deltas.items():
        torch.testing.assert_close(delta, a.deltas[module_name], rtol=1e-5, atol=1e-6)
    for module_name, delta in (-(-a)).deltas.items():
        assert torch.equal(delta, a.deltas[module_name])
    assert a.dot(b) == pytest.approx(b.dot(a), rel=1e-9)
    assert (2.0 * a + b).dot(b) == pytest.approx(2 * a.dot(b) + b.dot(b), rel=1e-5)
    assert (a * 3).dot(b) == pytest.approx(3 * a.dot(b), rel=1e-5)
    assert a.cosine(a) == pytest.approx(1.0, abs=1e-9)
    assert a.cosine(-a) == pytest.approx(-1.0, abs=1e-9)
    assert a.norm() ** 2 == pytest.approx(a.dot(a), rel=1e-9)


def test_algebra_rejects_mismatched_modules(experts):
    a, qv = TaskVector.from_adapter(experts["a"]), TaskVector.from_adapter(experts["qv"])
    with pytest.raises(TrinityXError, match="model.layers.0.mlp.down_proj"):
        a + qv
    with pytest.raises(TrinityXError, match="different modules"):
        a.dot(qv)


# --------------------------------------------------------------------------------------------------------------
# gamma


def toy(values):
    return TaskVector({"m": torch.tensor(values, dtype=torch.float32)})


def test_gamma_hand_computed():
    reference = toy([[2.0, 0.0], [0.0, 0.0]])
    experts = [toy([[1.0, 0.0], [0.0, 0.0]]), toy([[0.0, 3.0], [0.0, 0.0]]), toy([[-5.0, 0.0], [0.0, 0.0]])]
    dots, cosines = similarities(experts, reference)
    torch.testing.assert_close(dots, torch.tensor([2.0, 0.0, -10.0]))
    torch.testing.assert_close(cosines, torch.tensor([1.0, 0.0, -1.0]))
    # softmax([1, 0, -1]) = [e, 1, 1/e] / (e + 1 + 1/e)
    torch.testing.assert_close(
        gamma(experts, reference), torch.tensor([0.665241, 0.244728, 0.090031]), atol=1e-6, rtol=0
    )
    # temperature 0.5: softmax([2, 0, -2])
    torch.testing.assert_close(
        gamma(experts, reference, temperature=0.5), torch.tensor([0.866813, 0.117310, 0.015876]), atol=1e-6, rtol=0
    )


def test_gamma_prefers_the_reference_expert(experts):
    a, b, c = (TaskVector.from_adapter(experts[k]) for k in "abc")
    g = gamma([a, b, c], reference=b)
    assert g.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert g.argmax().item() == 1


# --------------------------------------------------------------------------------------------------------------
# Linear merge: exact, checked against the adapter itself, dense arithmetic and PEFT's "cat"


def test_linear_single_adapter_reproduces_it(tiny_backbone, experts, tmp_path):
    out = merge([experts["rs"]], [1.0], "linear", tmp_path / "merged")
    expected = adapter_logits(tiny_backbone, experts["rs"])
    assert not torch.allclose(expected, logits(load_base(tiny_backbone)), atol=1e-3)  # the expert does something
    torch.testing.assert_close(adapter_logits(tiny_backbone, out), expected, atol=1e-5, rtol=0)
    assert json.loads((out / MERGE_RECORD).read_text())["reconstruction_error"] == 0.0


def test_linear_negation_cancels(tiny_backbone, experts, tmp_path):
    out = merge([experts["a"], experts["a"]], [0.7, -0.7], "linear", tmp_path / "merged")
    torch.testing.assert_close(adapter_logits(tiny_backbone, out), logits(load_base(tiny_backbone)), atol=1e-5, rtol=0)


def test_linear_equals_dense_arithmetic_and_peft_cat(tiny_backbone, experts, tmp_path):
    names, weights = ["a", "b", "rs"], [0.7, -0.4, 1.3]
    out = merge([experts[n] for n in names], weights, "linear", tmp_path / "merged")
    merged = adapter_logits(tiny_backbone, out)

    dense = load_base(tiny_backbone)
    task_vectors = [TaskVector.from_adapter(experts[n]) for n in names]
    apply(dense, sum((w * t for w, t in zip(weights[1:], task_vectors[1:])), weights[0] * task_vectors[0]))
    torch.testing.assert_close(merged, logits(dense), atol=1e-5, rtol=0)

    # PEFT's "cat" inherits use_rslora from the first adapter; put a non-rsLoRA adapter first (see merge notes).
    peft_model = PeftModel.from_pretrained(load_base(tiny_backbone), experts["a"], adapter_name="a")
    for n in names[1:]:
        peft_model.load_adapter(experts[n], adapter_name=n)
    peft_model.add_weighted_adapter(names, weights, adapter_name="cat", combination_type="cat")
    peft_model.set_adapter("cat")
    torch.testing.assert_close(merged, logits(peft_model), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# TIES and DARE


def test_ties_hand_computed():
    deltas = torch.tensor([[[3.0, -1.0], [0.5, 2.0]], [[-1.0, -2.0], [0.1, -4.0]]])  # [K=2, 2, 2]
    # density 0.5 keeps the two largest magnitudes per expert: [[3, 0], [0, 2]] and [[0, -2], [0, -4]].
    # Elected signs from the summed mass [[3, -2], [0, -2]]: [[+, -], [+ (tie at 0), -]].
    # Disjoint mean of the weighted survivors that agree: [[3·1, -2·0.5], [0, -4·0.5]].
    merged = taskvectors._ties(deltas, torch.tensor([1.0, 0.5]), density=0.5)
    torch.testing.assert_close(merged, torch.tensor([[3.0, -1.0], [0.0, -2.0]]))


def test_ties_of_identical_adapters_is_that_adapter(tiny_backbone, experts, tmp_path):
    out = merge([experts["a"], experts["a"]], [1.0, 1.0], "ties", tmp_path / "ties", density=1.0)
    record = json.loads((out / MERGE_RECORD).read_text())
    assert record["method"] == "ties" and record["rank"] == 8 and record["reconstruction_error"] < 1e-4
    merged, original = TaskVector.from_adapter(out), TaskVector.from_adapter(experts["a"])
    assert (merged - original).norm() / original.norm() < 1e-4
    torch.testing.assert_close(
        adapter_logits(tiny_backbone, out), adapter_logits(tiny_backbone, experts["a"]), atol=1e-4, rtol=0
    )


def test_low_rank_svd_is_lossy_and_recorded(experts, tmp_path):
    out = merge([experts["a"], experts["b"]], [0.5, 0.5], "ties", tmp_path / "ties", density=0.3, rank=2)
    record = json.loads((out / MERGE_RECORD).read_text())
    dense = TaskVector.from_adapter(out)
    assert record["rank"] == 2 and 0.05 < record["reconstruction_error"] < 1.0
    assert set(record["reconstruction_error_per_module"]) == set(dense.deltas)


def test_randomized_svd_is_near_optimal_and_seeded():
    from trinityx.lora.taskvectors import _factorise

    torch.manual_seed(0)
    delta = torch.randn(200, 120) * (torch.rand(200, 120) > 0.5)  # sparse like TIES/DARE: a flat spectrum
    _, _, optimal = _factorise(delta, 8, "exact")
    A, B, residual = _factorise(delta, 8, "randomized", torch.Generator().manual_seed(3))
    assert optimal <= residual < 1.01 * optimal
    assert residual == pytest.approx(torch.linalg.matrix_norm(delta - B @ A).item())
    A2, B2, _ = _factorise(delta, 8, "randomized", torch.Generator().manual_seed(3))
    assert torch.equal(A, A2) and torch.equal(B, B2)


def test_merge_records_its_svd(experts, tmp_path):
    out = merge([experts["a"], experts["b"]], [0.5, 0.5], "ties", tmp_path / "t", density=0.3, rank=2, svd="exact")
    assert json.loads((out / MERGE_RECORD).read_text())["svd"] == "exact"
    with pytest.raises(TrinityXError, match="unknown svd='qr'"):
        merge([experts["a"], experts["b"]], [0.5, 0.5], "ties", tmp_path / "q", svd="qr")


def test_dare_is_seeded(tiny_backbone, experts, tmp_path):
    dirs, weights = [experts["a"], experts["b"]], [0.5, 0.5]
    first = merge(dirs, weights, "dare", tmp_path / "s0", density=0.5, seed=0)
    again = merge(dirs, weights, "dare", tmp_path / "s0_again", density=0.5, seed=0)
    other = merge(dirs, weights, "dare", tmp_path / "s1", density=0.5, seed=1)
    t0, t0_again, t1 = (TaskVector.from_adapter(d) for d in (first, again, other))
    assert all(torch.equal(t0.deltas[m], t0_again.deltas[m]) for m in t0.deltas)
    assert (t0 - t1).norm() > 0.1 * t0.norm()
    record = json.loads((first / MERGE_RECORD).read_text())
    assert record["seed"] == 0 and record["density"] == 0.5 and "reconstruction_error" in record
    assert record["adapters"] == [str(d.resolve()) for d in dirs]
    assert PeftModel.from_pretrained(load_base(tiny_backbone), first)(TOKENS).logits.isfinite().all()


# --------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_and_leave_no_output(experts, tmp_path):
    out = tmp_path / "merged"
    cases = [
        ([tmp_path / "missing"], [1.0], "linear", "missing"),
        ([experts["a"], experts["b"]], [1.0], "linear", "weights"),
        ([experts["a"]], [1.0], "slerp", "method"),
        ([experts["a"], experts["qv"]], [1.0, 1.0], "ties", "model.layers.0.mlp.down_proj"),
    ]
    for dirs, weights, method, named in cases:
        with pytest.raises(TrinityXError, match=named):
            merge(dirs, weights, method, out)
        assert not out.exists()
    with pytest.raises(TrinityXError, match="missing"):
        TaskVector.from_adapter(tmp_path / "missing")


def test_failed_write_leaves_no_output(experts, tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", broken_save)
    with pytest.raises(OSError):
        merge([experts["a"]], [1.0], "linear", tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []
