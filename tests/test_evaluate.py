"""The evaluation engine on the tiny backbone: systems, generation, log-likelihoods, evaluate() with fake judges."""

import hashlib
import json
import os
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from trinityx import data
from trinityx.backbones import format_prompt, load_backbone
from trinityx.errors import TrinityXError
from trinityx.eval.evaluate import AXES, EvaluateConfig, Shard, evaluate, mc_scores, merge_shards, qa_prompt
from trinityx.eval.judges import Judge
from trinityx.infer.generation import GenerationSettings, cache_path, encode_pair, generate, generate_batch
from trinityx.infer.systems import load_system
from trinityx.mocae import MoCaEConfig, MoCaEModel

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
DIMS = ("helpful", "harmless", "honest")
PROMPTS = ["give three tips for staying healthy", "what happens if you eat watermelon seeds?", "hi"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The CPU is shared with training jobs; two threads contending there run tiny models many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_expert(backbone, out, seed):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(backbone),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    model.save_pretrained(out)


def make_mocae(backbone, run, folder, router, seed):
    dirs = [run / "experts" / d for d in DIMS]
    model = MoCaEModel(AutoModelForCausalLM.from_pretrained(backbone), dirs,
                       MoCaEConfig(expert_names=list(DIMS), backbone=str(backbone), router=router, temperature=2.0))
    g = torch.Generator().manual_seed(seed)
    for p in model.router.parameters():
        p.data = torch.randn(p.shape, generator=g) * 2.0
    model.save_pretrained(run / folder)


@pytest.fixture(scope="module")
def run(tiny_backbone, tmp_path_factory):
    """A run folder as the pipeline writes it (no merges/ties, to test the missing-folder error)."""
    run = tmp_path_factory.mktemp("run")
    (run / "run.json").write_text(json.dumps({"backbone": str(tiny_backbone)}))
    for k, d in enumerate(DIMS):
        make_expert(tiny_backbone, run / "experts" / d, seed=k + 1)
    shutil.copytree(run / "experts" / "helpful", run / "datamix")
    shutil.copytree(run / "experts" / "honest", run / "merges" / "linear")
    make_mocae(tiny_backbone, run, "mocae", "sequence", seed=0)
    make_mocae(tiny_backbone, run, "mocae-token", "token", seed=1)
    return run


@pytest.fixture(scope="module")
def backbone(tiny_backbone):
    return load_backbone(str(tiny_backbone))


@pytest.fixture
def system(request, run, backbone):
    """The system named by the test's parameter, closed afterwards so the shared backbone stays bare."""
    s = load_system(request.param, run, backbone)
    yield s
    s.close()


def naive_loglikelihood(s, context, continuation):
    """Full-sequence log P(continuation | context), one pair at a time (MoCaE routed on the context)."""
    ctx, cont = encode_pair(s.tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.inference_mode():
        if s.mocae is not None:
            prompt_mask = torch.tensor([[1] * len(ctx) + [0] * len(cont)])
            logits = s.mocae(ids, torch.ones_like(ids), prompt_mask).logits
        else:
            logits = s.model(input_ids=ids).logits
    logp = torch.log_softmax(logits[0].float(), -1)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


@pytest.mark.parametrize("system", ["base", "expert:honest", "trinityx", "trinityx-token"], indirect=True)
def test_shared_prefix_loglikelihood_equals_full_sequence(system):
    # Two questions after the same QA primer: the second reuses the primer's KV cache (not under sequence
    # routing); three continuations of one context share its KV cache.
    contexts = [qa_prompt("what is a fox?")] * 3 + [qa_prompt("who is a fox?")] * 2 + ["hello there "]
    continuations = [" a dog", " yes it is", " quick brown fox jumps", " a cat", " nobody", "lazy dog"]
    fast = system.loglikelihoods(contexts, continuations, batch_size=2)  # two chunks share one prefix
    slow = [naive_loglikelihood(system, c, x) for c, x in zip(contexts, continuations)]
    assert fast == pytest.approx(slow, abs=1e-4)


def test_contexts_after_a_shared_primer_compute_only_their_own_tokens(run, backbone):
    s = load_system("base", run, backbone)
    seen = []
    handle = s.causal_lm().register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True)
    contexts = [qa_prompt("what is a fox?"), qa_prompt("who is a fox?")]
    s.loglikelihoods(contexts, [" a dog", " a cat"], batch_size=4)
    handle.remove()
    s.close()
    full = [len(encode_pair(s.tokenizer, c, " x")[0]) for c in contexts]
    # context 1 in full, its continuation, then only context 2's own tokens after the primer, its continuation
    assert seen[0][1] == full[0] and seen[2][1] < full[1] - 100


def test_encode_pair_moves_trailing_space_like_lm_eval(backbone):
    ctx, cont = encode_pair(backbone.tokenizer, "hello there ", "fox")
    assert backbone.tokenizer.decode(ctx) == "hello there"
    assert backbone.tokenizer.decode(cont) == " fox"


@pytest.mark.parametrize("system", ["base", "trinityx", "trinityx-token"], indirect=True)
def test_left_padded_batch_equals_one_by_one(system):
    settings = GenerationSettings(max_new_tokens=8)
    texts = [format_prompt(system.tokenizer, system.backbone.prompt_format, p) for p in PROMPTS]
    batched = generate_batch(system, texts, settings)
    assert batched == [generate_batch(system, [t], settings)[0] for t in texts]


def test_stop_strings_cut_the_answer(run, backbone):
    s = load_system("base", run, backbone)
    text = format_prompt(s.tokenizer, s.backbone.prompt_format, PROMPTS[0])
    full = generate_batch(s, [text], GenerationSettings(max_new_tokens=12))[0]
    stop = full[3:5]
    cut = generate_batch(s, [text], GenerationSettings(max_new_tokens=12, stop=(stop,)))[0]
    assert cut == full.split(stop, 1)[0].strip()


def test_answers_that_run_out_of_tokens_are_marked_cut_and_cached_so(run, backbone, tmp_path, monkeypatch):
    s = load_system("base", run, backbone)
    tok = s.tokenizer
    end, pad = tok.eos_token_id, tok.pad_token_id
    a, b, c = tok(" apple banana cherry", add_special_tokens=False).input_ids[:3]
    # Three new tokens each: ends on its last token (finished), ends early then padding (finished), never ends.
    new = torch.tensor([[a, b, end], [a, end, pad], [a, b, c]])

    def fixed(input_ids, attention_mask, gates=None, **kwargs):
        return torch.cat([input_ids, new[:len(input_ids)]], 1)

    monkeypatch.setattr(s, "generate_ids", fixed)
    settings = GenerationSettings(max_new_tokens=3, batch_size=3)
    answers = generate(s, PROMPTS[:3], settings, tmp_path / "cache")
    assert answers.cut == [False, False, True]
    assert generate(s, PROMPTS[:3], settings, tmp_path / "cache").cut == [False, False, True]  # from the cache
    # A stop string met is an end: the same tokens are not cut. A larger budget than used: not cut.
    stop = tok.decode([c]).strip()
    assert generate(s, PROMPTS[:3], GenerationSettings(max_new_tokens=3, stop=(stop,)), tmp_path / "c2").cut[2] is False
    assert generate(s, PROMPTS[:3], GenerationSettings(max_new_tokens=4), tmp_path / "c3").cut[2] is False


def test_generation_cache_rerun_calls_the_model_zero_times(run, backbone, tmp_path, monkeypatch):
    s = load_system("expert:helpful", run, backbone)
    settings = GenerationSettings(max_new_tokens=6, batch_size=2)
    calls = []
    original = s.generate_ids
    monkeypatch.setattr(s, "generate_ids", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = s.generate(PROMPTS, settings, tmp_path)
    assert len(calls) == 2  # 3 prompts in batches of 2
    calls.clear()
    assert s.generate(PROMPTS, settings, tmp_path) == first
    assert calls == []
    # A run killed mid-write leaves a cut last line: the finished batches are kept, the rest regenerated.
    path = cache_path(s, tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:10])
    assert s.generate(PROMPTS, settings, tmp_path) == first
    assert len(calls) == 1
    # Other settings or another system are other cache entries.
    calls.clear()
    s.generate(PROMPTS[:1], GenerationSettings(max_new_tokens=5), tmp_path)
    assert len(calls) == 1
    s.close()
    other = load_system("expert:honest", run, backbone)
    assert other.fingerprint != s.fingerprint
    other.close()


def test_close_leaves_the_backbone_bare(run, backbone):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        before = backbone.model(input_ids=ids).logits
    for spec in ("expert:harmless", "trinityx", "trinityx-token", "merge:linear"):
        s = load_system(spec, run, backbone)
        with torch.inference_mode():
            assert not torch.allclose(s.causal_lm()(input_ids=ids).logits, before) or s.mocae is not None
        s.close()
        with torch.inference_mode():
            assert torch.equal(backbone.model(input_ids=ids).logits, before), spec


def test_ablations_and_gates(run, backbone):
    s = load_system("trinityx", run, backbone)
    gates = s.gates(PROMPTS)  # [3, K]
    assert gates.shape == (3, 3) and torch.allclose(gates.sum(-1), torch.ones(3))
    s.close()
    for spec, check in [("trinityx:uniform", lambda g: torch.allclose(g, torch.full_like(g, 1 / 3))),
                        ("trinityx:top1", lambda g: set(g.flatten().tolist()) <= {0.0, 1.0}),
                        ("trinityx:weights=1,1,-0.5", lambda g: torch.equal(g[0], torch.tensor([1.0, 1.0, -0.5]))),
                        ("trinityx:no-calibration", lambda g: not torch.allclose(g, gates))]:
        s = load_system(spec, run, backbone)
        assert check(s.gates(PROMPTS)), spec
        s.close()
    with pytest.raises(TrinityXError, match="base has no router|no router"):
        load_system("base", run, backbone).gates(PROMPTS)


def test_unknown_system_and_missing_folder(run, backbone, tmp_path):
    with pytest.raises(TrinityXError, match="unknown system 'merge:magic'"):
        load_system("merge:magic", run, backbone)
    with pytest.raises(TrinityXError, match=r"'merge:ties' needs .*merges/ties.*created by"):
        load_system("merge:ties", run, backbone)
    with pytest.raises(TrinityXError, match=r"'trinityx:no-gl' needs .*mocae-no-gl.*created by"):
        load_system("trinityx:no-gl", run, backbone)
    with pytest.raises(TrinityXError, match="pass --run"):
        load_system("trinityx", None, backbone)
    with pytest.raises(TrinityXError, match="one weight per expert"):
        load_system("trinityx:weights=1,2", run, backbone)
    # the failed load left the backbone bare: a base system still loads and runs
    load_system("base", run, backbone).loglikelihoods(["hi"], [" there"])


def test_mc_scores_match_metrics_on_known_loglikelihoods(monkeypatch, run, backbone, data_dir):
    questions = data.load_truthfulqa_mc(data_dir, "test")[:2]
    s = load_system("base", run, backbone)
    # Fake log-likelihoods: the first (true) choice of question 0 is most likely, a false one for question 1.
    def fake(contexts, continuations, batch_size, gates=None, cache_dir=None):
        return [-1.0 if (c.startswith(qa_prompt(questions[0].question)) and x == f" {questions[0].mc2_choices[0]}")
                else (-0.5 if x == f" {questions[1].mc2_choices[-1]}" else -3.0)
                for c, x in zip(contexts, continuations)]
    monkeypatch.setattr(s, "loglikelihoods", fake)
    mc1, mc2 = mc_scores(s, questions, 8)
    q0 = questions[0]
    assert mc1[0] == float(q0.mc1_choices[0] == q0.mc2_choices[0])
    # question 0: true mass exp(-1) + (t0 - 1) exp(-3) over exp(-1) + (n0 - 1) exp(-3)
    import math
    t0, n0 = sum(q0.mc2_labels), len(q0.mc2_labels)
    expected = (math.exp(-1) + (t0 - 1) * math.exp(-3)) / (math.exp(-1) + (n0 - 1) * math.exp(-3))
    assert mc2[0] == pytest.approx(expected)
    q1 = questions[1]
    t1, n1 = sum(q1.mc2_labels), len(q1.mc2_labels)
    assert mc2[1] == pytest.approx(t1 * math.exp(-3) / (math.exp(-0.5) + (n1 - 1) * math.exp(-3)))


def fake_judges(fail_harm_item: int | None = None):
    def harm(prompts, responses):
        return [None if i == fail_harm_item else (0.9 if i % 2 else 0.1) for i in range(len(prompts))]

    return {
        "helpful": Judge("fake-helpful", "helpful", 0.5, {"split": "dev", "n": 10, "agreement": 0.7},
                         prefer=lambda i, a, b: [0.5 + 0.1 * (len(y) > len(x)) for x, y in zip(a, b)]),
        "harm": Judge("fake-harm", "harm", 0.5, {"split": "test", "n": 20, "accuracy": 0.8}, score=harm),
        "truth": Judge("fake-truth", "truth", 0.5, {"split": "test", "n": 20, "accuracy": 0.75},
                       score=lambda q, a: [0.7] * len(q)),
        "info": Judge("fake-info", "info", 0.5, {}, score=lambda q, a: [0.2 if i == 0 else 0.8 for i in range(len(q))]),
    }


def test_evaluate_writes_every_metric(run, backbone, data_dir, tmp_path):
    s = load_system("trinityx", run, backbone)
    out = tmp_path / "eval.json"
    cfg = EvaluateConfig(s.name, out, axes="helpful,harmless,honest", limit=3, seed=7, data_dir=data_dir,
                         max_new_tokens=6, answer_tokens=6, bootstrap=50, cache_dir=tmp_path / "cache")
    result = evaluate(s, cfg, judges=fake_judges(), record={"note": "test"})
    s.close()
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["seed"] == 7 and saved["system"] == "trinityx" and saved["config"]["note"] == "test"
    assert saved["config"]["limit"] == 3 and saved["fingerprint"] == s.fingerprint
    helpful, harmless, honest = (saved["axes"][a] for a in ("helpful", "harmless", "honest"))
    for record, keys in [(helpful, ["win_rate", "lc_win_rate"]), (harmless, ["unsafe_rate", "safety_score"]),
                         (honest, ["mc1", "mc2", "truthful_rate", "informative_rate", "truthful_informative_rate"])]:
        for key in keys:
            lo, hi = record["metrics"][f"{key}_ci"]
            assert 0 <= lo <= record["metrics"][key] <= hi <= 100, key
        assert record["metrics"]["n_items"] == 3
        assert record["data"]["split"]
    assert helpful["data"]["split"] == "eval" and honest["data"]["split"] == "test"
    assert helpful["judges"]["helpful"]["validity"] == {"split": "dev", "n": 10, "agreement": 0.7}
    assert honest["judges"]["info"]["validity_known"] is False
    # harm flags 0.1, 0.9, 0.1 -> 1 of 3 unsafe
    assert harmless["metrics"]["unsafe_rate"] == pytest.approx(100 / 3)
    assert harmless["metrics"]["safety_score"] == pytest.approx(200 / 3)
    # truth 0.7 (true) everywhere, info 0.2 / 0.8 / 0.8 -> informative 2/3, truthful x informative 2/3
    assert honest["metrics"]["truthful_rate"] == 100.0
    assert honest["metrics"]["truthful_informative_rate"] == pytest.approx(200 / 3)
    outputs = json.loads(open(helpful["model_outputs"]).read())
    assert [set(o) for o in outputs] == [{"instruction", "output", "generator", "dataset"}] * 3
    assert outputs[0]["generator"] == "trinityx"


def test_judge_failure_is_counted_not_zero(run, backbone, data_dir, tmp_path):
    s = load_system("base", run, backbone)
    out = tmp_path / "eval.json"
    evaluate(s, EvaluateConfig(s.name, out, axes="harmless", limit=3, data_dir=data_dir, max_new_tokens=4,
                               bootstrap=20, cache_dir=tmp_path / "cache"), judges=fake_judges(fail_harm_item=0))
    record = json.loads(out.read_text())["axes"]["harmless"]
    # item 0 failed; items 1, 2 score 0.9 (unsafe) and 0.1 -> 1 of 2 unsafe = 50 %, not 1 of 3
    assert record["judge_failures"]["harm"]["count"] == 1
    assert record["metrics"]["n"] == 2 and record["metrics"]["n_items"] == 3
    assert record["metrics"]["unsafe_rate"] == pytest.approx(50.0)


def test_missing_judge_fails_before_generating(run, backbone, data_dir, tmp_path):
    s = load_system("base", run, backbone)
    with pytest.raises(TrinityXError, match="harm judge is missing.*train-judges"):
        evaluate(s, EvaluateConfig(s.name, tmp_path / "e.json", axes="harmless", limit=2, judges=tmp_path / "nojudges",
                                   data_dir=data_dir, cache_dir=tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def content_judges():
    """Judges whose scores depend only on the item's text (not its position in a call), as real judges do,
    with one failing item, so shards and one process can be compared item for item."""
    def digest(*texts):  # a deterministic number in [0, 1) from the text
        return int(hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:8], 16) / 2**32

    def harm(prompts, responses):
        return [None if p.endswith("thing 1 0") else digest(p, r) for p, r in zip(prompts, responses)]

    return {
        "helpful": Judge("hash-helpful", "helpful", 0.5, {}, prefer=lambda i, a, b: [digest(*t) for t in zip(i, a, b)]),
        "harm": Judge("hash-harm", "harm", 0.5, {}, score=harm),
        "truth": Judge("hash-truth", "truth", 0.5, {}, score=lambda q, a: [digest(*t) for t in zip(q, a)]),
        "info": Judge("hash-info", "info", 0.3, {}, score=lambda q, a: [digest(a, *q) for q, a in zip(q, a)]),
    }


def without_timing(result: dict, *config_keys: str) -> dict:
    """A results file without what differs between runs of the same evaluation: times, the shard count, and
    the named config keys (e.g. the output path)."""
    result = json.loads(json.dumps(result))
    for key in ("started", "finished", "shards"):
        result.pop(key, None)
    for key in config_keys:
        result["config"].pop(key)
    for record in result["axes"].values():
        del record["seconds"], record["records"]
        record.pop("model_outputs", None)
    return result


def test_sharded_evaluation_merges_into_the_one_process_result(run, backbone, data_dir, tmp_path):
    s = load_system("expert:honest", run, backbone)
    kwargs = dict(axes=",".join(AXES), limit=5, seed=3, data_dir=data_dir, max_new_tokens=5, answer_tokens=5,
                  bootstrap=40, batch_size=2)
    judges = content_judges()
    one = evaluate(s, EvaluateConfig(s.name, tmp_path / "one" / "eval.json", cache_dir=tmp_path / "cache1", **kwargs),
                   judges=judges)
    for i in range(2):
        evaluate(s, EvaluateConfig(s.name, tmp_path / "two" / "eval.json", cache_dir=tmp_path / "cache2", **kwargs),
                 judges=judges, shard=Shard(i, 2))
    with pytest.raises(TrinityXError, match="cannot merge"):
        merge_shards(tmp_path / "two" / "eval.json", 3)  # no such sharding
    merged = merge_shards(tmp_path / "two" / "eval.json")
    s.close()
    assert merged["shards"] == 2
    assert without_timing(merged) == without_timing(one)
    assert json.loads((tmp_path / "two" / "eval.json").read_text()) == json.loads(json.dumps(merged))
    # The per-item records and alpaca_eval's model outputs are the same files, item for item.
    for name in ("eval.helpful.json", "eval.harmless.json", "eval.honest.json", "eval.model_outputs.json"):
        assert json.loads((tmp_path / "one" / name).read_text()) == json.loads((tmp_path / "two" / name).read_text())
    harmless = merged["axes"]["harmless"]
    assert harmless["judge_failures"]["harm"]["count"] == 1  # item 2 failed (in shard 0), counted once
    assert harmless["metrics"]["n"] == 4 and harmless["metrics"]["n_items"] == 5


def test_merge_refuses_incomplete_or_mismatched_shards(run, backbone, data_dir, tmp_path):
    s = load_system("base", run, backbone)
    kwargs = dict(axes="harmless", limit=3, data_dir=data_dir, max_new_tokens=3, bootstrap=10,
                  cache_dir=tmp_path / "cache")
    judges = content_judges()
    out = tmp_path / "eval.json"
    evaluate(s, EvaluateConfig(s.name, out, **kwargs), judges=judges, shard=Shard(0, 2))
    with pytest.raises(TrinityXError, match=r"shard 1/2 .* is missing"):
        merge_shards(out)
    evaluate(s, EvaluateConfig(s.name, out, **{**kwargs, "seed": 9}), judges=judges, shard=Shard(1, 2))
    with pytest.raises(TrinityXError, match="different config"):
        merge_shards(out)
    s.close()
    with pytest.raises(TrinityXError, match="expected I/N"):
        Shard.parse("2/2")


def test_shards_share_the_generation_cache(run, backbone, data_dir, tmp_path, monkeypatch):
    s = load_system("base", run, backbone)
    kwargs = dict(axes="harmless", limit=4, data_dir=data_dir, max_new_tokens=3, bootstrap=10,
                  cache_dir=tmp_path / "cache")
    judges = content_judges()
    for i in range(2):
        evaluate(s, EvaluateConfig(s.name, tmp_path / "two.json", **kwargs), judges=judges, shard=Shard(i, 2))
    calls = []
    original = s.generate_ids
    monkeypatch.setattr(s, "generate_ids", lambda *a, **k: calls.append(1) or original(*a, **k))
    evaluate(s, EvaluateConfig(s.name, tmp_path / "one.json", **kwargs), judges=judges)  # one process: all cached
    s.close()
    assert calls == []


def test_items_are_routed_by_their_request_and_the_oracle_by_their_set(run, backbone, data_dir, tmp_path):
    from trinityx.eval.evaluate import item_values, paired_comparison

    s = load_system("trinityx", run, backbone)
    out = tmp_path / "trinityx.json"
    kwargs = dict(limit=3, data_dir=data_dir, max_new_tokens=4, answer_tokens=4, bootstrap=20,
                  cache_dir=tmp_path / "cache")
    saved = evaluate(s, EvaluateConfig(s.name, out, axes="helpful,harmless,honest", **kwargs), judges=fake_judges())
    questions = [q.question for q in data.load_truthfulqa(data_dir, "test")[:3]]
    honest = json.loads((tmp_path / "trinityx.honest.json").read_text())["records"]
    # A TruthfulQA question is routed as the question, in the chat format, never as the few-shot QA primer.
    expected = s.gates(questions)
    primer = s.gates([qa_prompt(q) for q in questions])
    torch.testing.assert_close(torch.tensor([r["gates"] for r in honest]), expected)
    assert not torch.allclose(expected, primer)
    routing = saved["axes"]["honest"]["routing"]
    assert routing["dimension"] == "honest" and routing["n"] == 3
    assert sum(routing["argmax_counts"].values()) == 3
    assert routing["accuracy"] == routing["argmax_counts"]["honest"] / 3
    torch.testing.assert_close(torch.tensor(list(routing["mean_gates"].values())), expected.mean(0))
    s.close()

    oracle = load_system("trinityx:oracle", run, backbone)
    assert oracle.fingerprint != s.fingerprint
    result = evaluate(oracle, EvaluateConfig(oracle.name, tmp_path / "oracle.json", axes="helpful,harmless,honest",
                                             **kwargs), judges=fake_judges())
    for axis in ("helpful", "harmless", "honest"):
        assert result["axes"][axis]["routing"]["accuracy"] == 1.0
        assert result["axes"][axis]["routing"]["mean_gates"][axis] == 1.0
    # One-hot on honest is the honest expert alone: the same MC log-likelihoods as expert:honest.
    oracle.close()
    expert = load_system("expert:honest", run, backbone)
    evaluate(expert, EvaluateConfig(expert.name, tmp_path / "expert.json", axes="honest", **kwargs),
             judges=fake_judges())
    expert.close()
    mine, theirs = item_values(tmp_path / "oracle.json"), item_values(tmp_path / "expert.json")
    for i in mine["mc2"]:
        assert mine["mc2"][i] == pytest.approx(theirs["mc2"][i], abs=1e-4)
    same = paired_comparison(mine, theirs, seed=0, n_boot=50)
    # the axes both have
    assert set(same) == {"mc1", "mc2", "truthful_rate", "informative_rate", "truthful_informative_rate"}
    assert same["mc2"]["verdict"] == "tie" and abs(same["mc2"]["difference"]) < 1e-3
    against = paired_comparison(item_values(out), mine, seed=0, n_boot=50)
    assert against["win_rate"]["n"] == 3 and len(against["lc_win_rate"]["ci95"]) == 2

    # `trinityx compare`: the same paired numbers from the files, each against the first.
    from trinityx.eval.evaluate import CompareConfig, compare_cli

    compared = compare_cli(CompareConfig((out, tmp_path / "oracle.json", tmp_path / "expert.json"), bootstrap=50))
    assert compared["a"] == "trinityx" and set(compared["against"]) == {"trinityx:oracle", "expert:honest"}
    paired = compared["against"]["trinityx:oracle"]["paired"]
    assert paired["win_rate"] == {**against["win_rate"], "measurable": True}
    assert set(compared["against"]["expert:honest"]["paired"]) == set(same)  # the honest axis only
    # A helpful judge at the length rule: its metrics are marked, not hidden.
    weak = json.loads((tmp_path / "oracle.json").read_text())
    for path in (out, tmp_path / "oracle.json"):
        r = json.loads(path.read_text())
        r["axes"]["helpful"]["judges"]["helpful"]["validity"]["beats_trivial_baseline"] = False
        path.write_text(json.dumps(r))
    again = compare_cli(CompareConfig((out, tmp_path / "oracle.json"), bootstrap=50))["against"]["trinityx:oracle"]
    assert again["paired"]["win_rate"]["measurable"] is False and again["paired"]["mc1"]["measurable"] is True
    # Files that cannot be compared: a clear error naming the file and what differs.
    weak["axes"]["harmless"]["judges"]["harm"]["threshold"] = 0.3
    (tmp_path / "other_judge.json").write_text(json.dumps(weak))
    with pytest.raises(TrinityXError, match=r"other_judge.json: axis harmless was judged by fake-harm at threshold 0.3"):
        compare_cli(CompareConfig((out, tmp_path / "other_judge.json")))
    unfinished = {k: v for k, v in weak.items() if k != "finished"}
    (tmp_path / "unfinished.json").write_text(json.dumps(unfinished))
    with pytest.raises(TrinityXError, match="did not finish"):
        compare_cli(CompareConfig((out, tmp_path / "unfinished.json")))
    with pytest.raises(TrinityXError, match="does not exist"):
        compare_cli(CompareConfig((out, tmp_path / "nope.json")))
    with pytest.raises(TrinityXError, match="at least two"):
        compare_cli(CompareConfig((out,)))


def test_caller_gates_reuse_a_shared_primer_exactly(run, backbone):
    from trinityx.infer.generation import loglikelihoods

    s = load_system("trinityx", run, backbone)
    contexts = [qa_prompt("what is a fox?")] * 2 + [qa_prompt("who is a fox?")] * 2
    continuations = [" a dog", " an animal", " nobody", " a fox"]
    gates = torch.tensor([[0.2, 0.5, 0.3]]).expand(4, -1)
    together = loglikelihoods(s, contexts, continuations, gates=gates)  # the second context reuses the primer
    alone = [loglikelihoods(s, [c], [x], gates=gates[:1])[0] for c, x in zip(contexts, continuations)]
    assert together == pytest.approx(alone, abs=1e-4)
    other = loglikelihoods(s, contexts[:1], continuations[:1], gates=torch.tensor([[1.0, 0.0, 0.0]]))[0]
    assert other != pytest.approx(together[0], abs=1e-4)  # the gates reach the scores
    s.close()


def test_a_system_spec_cannot_name_a_folder_outside_the_run(run, backbone, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run / "experts" / "helpful", other)  # a real adapter, two levels up from RUN/experts/
    relative = os.path.relpath(other, run / "experts")
    with pytest.raises(TrinityXError, match=r"system 'expert:.*' is not a plain name"):
        load_system(f"expert:{relative}", run, backbone)
    load_system("base", run, backbone).close()  # nothing was attached


def test_a_cache_line_cut_inside_a_character_is_ignored(tmp_path):
    from trinityx.infer.generation import GenerationCache

    path = tmp_path / "cache.jsonl"
    kept = json.dumps({"key": "a", "prompt": "p", "output": "caf\u00e9"}, ensure_ascii=False) + "\n"
    cut = json.dumps({"key": "b", "prompt": "p", "output": "na\u00efve"}, ensure_ascii=False).encode()
    path.write_bytes(kept.encode() + cut[:cut.index("\u00ef".encode()) + 1])  # killed inside the two-byte character
    cache = GenerationCache(path)
    assert cache.outputs == {"a": "caf\u00e9"}
    cache.append([{"key": "b", "prompt": "p", "output": "na\u00efve"}])
    assert GenerationCache(path).outputs == {"a": "caf\u00e9", "b": "na\u00efve"}


def test_loglikelihood_cache_resumes_and_changes_no_score(run, backbone, tmp_path, monkeypatch):
    from trinityx.infer import generation

    s = load_system("trinityx", run, backbone)
    contexts = [qa_prompt("what is a fox?")] * 2 + [qa_prompt("who is a fox?")] * 2 + [qa_prompt("why?")]
    continuations = [" a dog", " an animal", " nobody", " a fox", " because"]
    gates = torch.tensor([[0.2, 0.5, 0.3]]).expand(5, -1)
    plain = generation.loglikelihoods(s, contexts, continuations, gates=gates)
    # A first run stopped after two of its three contexts: only those are on disk.
    first = generation.loglikelihoods(s, contexts[:4], continuations[:4], gates=gates[:4], cache_dir=tmp_path)
    path = generation.loglikelihood_cache_path(s, tmp_path)
    assert len(path.read_text().splitlines()) == 2
    scored = []
    real = generation._score_context
    monkeypatch.setattr(generation, "_score_context", lambda *a, **k: scored.append(a[1]) or real(*a, **k))
    resumed = generation.loglikelihoods(s, contexts, continuations, gates=gates, cache_dir=tmp_path)
    assert len(scored) == 1  # only the third context is scored again
    assert resumed == pytest.approx(plain, abs=1e-5)
    assert resumed[:4] == first  # read back exactly as computed
    # Other gates are another key: scored, not read from the cache.
    generation.loglikelihoods(s, contexts[:2], continuations[:2], gates=torch.tensor([[1.0, 0.0, 0.0]]).expand(2, -1),
                              cache_dir=tmp_path)
    assert len(scored) == 2
    s.close()
