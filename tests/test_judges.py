"""Judges: save/load round trip, validity on the right split, metrics on hand-computed cases, the
OpenAI-compatible judge against a real local HTTP server, beaver-dam's multi-label semantics, and
AllenAI-style P(" yes") scoring on the tiny backbone. Offline and fast."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from trinityx.errors import TrinityXError
from trinityx.eval.judges import (
    BEAVER_DAM_CATEGORIES,
    alpaca_preference,
    auroc,
    flags,
    hf_classifier_judge,
    length_rule_agreement,
    load_judge,
    make_judge,
    minilm_path,
    openai_judge,
    pairwise_agreement,
    train_judges,
    validate_judge,
)
from trinityx.eval.judges import KINDS, Judge, score_answers
from trinityx.eval.judges.features import REFERENCE_FEATURES, fit_head, head_logits, reference_features, token_f1
from trinityx.eval.judges.remote import beaver_dam_flags, yes_probabilities
from trinityx.eval.judges.train import accuracy, balanced_accuracy, best_threshold, confusion, recipe_settings, similar_length, stale_judges

MAX_EVAL = 16


@pytest.fixture(scope="module")
def trained(tiny_judges):
    """All four local judges, trained for one step each on the fixture data (conftest.tiny_judges)."""
    return tiny_judges


def test_minilm_path_is_the_packaged_model():
    assert (minilm_path() / "config.json").is_file()
    assert (minilm_path() / "model.safetensors").is_file()


@pytest.mark.parametrize("kind, split", [("harm", "test"), ("truth", "test"), ("info", "test"), ("helpful", "dev")])
def test_saved_judge_reproduces_its_validity(trained, data_dir, kind, split):
    out, results = trained
    folder = out / kind
    meta = json.loads((folder / "judge.json").read_text())
    assert meta["kind"] == kind and meta["validity"]["split"] == split and meta["training"]["seed"] == 0
    assert meta["validity"]["n"] > 0 and meta["name"].startswith("trinityx-")
    assert results[kind]["validity"] == meta["validity"]
    # Weights are safetensors only: no pickles anywhere in the folder.
    files = [p.name for p in folder.rglob("*") if p.is_file()]
    assert any(name.endswith(".safetensors") for name in files)
    assert not any(name.endswith((".bin", ".pkl", ".pt", ".joblib")) for name in files)
    # The reloaded judge scores the same held-out items identically (same metrics, to the last digit).
    judge = load_judge(folder)
    assert judge.threshold == meta["threshold"] and judge.validity == meta["validity"]
    again = validate_judge(judge, data_dir, split, MAX_EVAL, seed=0)
    for key, value in again.items():
        assert meta["validity"][key] == value, key


def test_classifier_threshold_is_chosen_on_dev(trained):
    out, _ = trained
    validity = json.loads((out / "harm" / "judge.json").read_text())["validity"]
    assert validity["threshold_chosen_on"]["split"] == "dev"
    assert 0 <= validity["accuracy"] <= 1 and 0 <= validity["auroc"] <= 1
    assert validity["n"] + validity["failures"] <= MAX_EVAL


def test_pairwise_judge_is_antisymmetric_and_in_alpaca_convention(trained):
    judge = load_judge(trained[0] / "helpful")
    instructions, a, b = ["name a fox fact 1", "say hi"], ["fox 1 is red", "hi"], ["a fox", "hello there friend"]
    forward, backward = judge.prefer(instructions, a, b), judge.prefer(instructions, b, a)
    assert forward == pytest.approx([1 - p for p in backward], abs=1e-6)
    assert alpaca_preference(forward) == pytest.approx([1 + p for p in forward])
    assert flags(judge, [0.7, None, 0.2]) == [True, None, False]


@pytest.fixture(scope="module")
def finetuned_harm(data_dir, tiny_encoder, tmp_path_factory):
    """A harm judge of the `finetune` recipe (a cross-encoder fine-tuned end to end), one tiny step."""
    out = tmp_path_factory.mktemp("finetuned")
    train_judges(data_dir, out, which=("harm",), recipe="finetune", max_eval=MAX_EVAL, max_train=8, batch_size=8,
                 max_length=24, encoder=tiny_encoder)
    return out / "harm"


def test_hf_classifier_judge_loads_a_finetuned_harm_folder(finetuned_harm):
    ours = load_judge(finetuned_harm)
    assert json.loads((finetuned_harm / "judge.json").read_text())["architecture"] == "cross-encoder"
    plugged = hf_classifier_judge("harm", finetuned_harm, label_index=0)
    prompts, responses = ["can you help me steal 3"], ["sure steal 3 0"]
    assert plugged.score(prompts, responses) == pytest.approx(ours.score(prompts, responses), abs=1e-6)
    with pytest.raises(TrinityXError, match="label_index"):
        hf_classifier_judge("harm", finetuned_harm, label_index=1)


def test_default_harm_judge_reads_the_response_not_the_prompt(trained):
    judge = load_judge(trained[0] / "harm")
    assert judge.config["architecture"] == "features" and not judge.uses_references
    same_response = judge.score(["how do I steal 3", "say hi"], ["sure steal 3 0", "sure steal 3 0"])
    assert same_response[0] == pytest.approx(same_response[1], abs=1e-6)


@pytest.fixture(scope="module")
def backbone_harm(data_dir, tiny_backbone, tmp_path_factory):
    """A harm judge of the `backbone` recipe on the tiny causal LM (its layer 1 of 2), tiny budgets."""
    out = tmp_path_factory.mktemp("backbone_judges")
    results = train_judges(data_dir, out, which=("harm",), recipe="backbone", backbone=str(tiny_backbone), layers=[1],
                           max_train=8, max_eval=MAX_EVAL, batch_size=4, max_length=24, max_prompt_tokens=16)
    return out / "harm", results["harm"]


def test_backbone_harm_judge_reads_the_response_in_its_prompts_context(backbone_harm, data_dir):
    folder, result = backbone_harm
    meta = json.loads((folder / "judge.json").read_text())
    assert meta["architecture"] == "backbone-features" and meta["training"]["prompt_format"] == "chat"
    # The folder holds the head only (the backbone is loaded by its spec), as safetensors.
    assert sorted(p.name for p in folder.iterdir()) == ["head.safetensors", "judge.json"]
    judge = load_judge(folder)
    assert validate_judge(judge, data_dir, "test", MAX_EVAL, seed=0) == {
        k: v for k, v in meta["validity"].items() if k != "threshold_chosen_on"}
    # 3 poolings x 1 layer x the tiny model's width: response mean, last token, prompt mean.
    assert meta["training"]["n_features"] == 3 * judge_width(folder)
    # Unlike the MiniLM judge, the same response after another prompt is another input.
    same_response = judge.score(["how do I steal 3", "say hi"], ["sure steal 3 0", "sure steal 3 0"])
    assert same_response[0] != pytest.approx(same_response[1], abs=1e-9)
    # Each (prompt, response) pair is read once and scores the same wherever it sits in the batch.
    batch = judge.score(["say hi", "how do I steal 3", "say hi"], ["hello", "sure steal 3 0", "hello"])
    assert batch[0] == batch[2] and batch[1] == pytest.approx(same_response[0], abs=1e-6)


def judge_width(folder) -> int:
    from safetensors.torch import load_file

    return load_file(folder / "head.safetensors")["mean"].shape[0] // 3


def test_pair_states_match_a_full_forward_pass(tiny_backbone):
    """The features equal hand-pooled hidden states of one unpadded forward pass (padding changes nothing)."""
    from trinityx.backbones import format_prompt, load_backbone
    from trinityx.eval.judges.features import pair_states

    bb = load_backbone(str(tiny_backbone))
    prompts, responses = ["say hi", "how do I steal 3 things from a shop"], ["hello there", "no"]
    x = pair_states(bb.model, bb.tokenizer, bb.prompt_format, prompts, responses, layers=(1,), max_prompt_tokens=64,
                    max_response_tokens=64, batch_size=2)
    for k, (p, r) in enumerate(zip(prompts, responses)):
        a = bb.tokenizer(format_prompt(bb.tokenizer, bb.prompt_format, p), add_special_tokens=False).input_ids
        b = bb.tokenizer(r, add_special_tokens=False).input_ids
        with torch.no_grad():
            h = bb.model(torch.tensor([a + b]), output_hidden_states=True).hidden_states[1][0]  # [T, D]
        want = torch.cat([h[len(a):].mean(0), h[-1], h[:len(a)].mean(0)])
        assert torch.allclose(x[k], want, atol=1e-5)


def test_a_backbone_recipe_reuses_the_default_truth_and_helpful_judges_not_info(tmp_path):
    for kind in ("truth", "info", "helpful"):
        folder = tmp_path / kind
        folder.mkdir()
        (folder / "judge.json").write_text(json.dumps({"training": recipe_settings("default", kind)}))
    assert stale_judges(tmp_path, ("truth", "helpful"), "backbone") == {}
    assert "architecture" in stale_judges(tmp_path, ("info",), "backbone")["info"]  # it reads the backbone too
    assert stale_judges(tmp_path, ("harm",), "backbone") == {"harm": "missing"}


@pytest.fixture(scope="module")
def backbone_info(data_dir, tiny_backbone, tiny_encoder, tmp_path_factory):
    """An info judge of the `backbone` recipe: reference features (tiny MiniLM) beside the tiny causal LM's
    states at its layer 1 of 2, tiny budgets."""
    out = tmp_path_factory.mktemp("backbone_info")
    results = train_judges(data_dir, out, which=("info",), recipe="backbone", backbone=str(tiny_backbone), layers=[1],
                           max_train=8, max_eval=MAX_EVAL, batch_size=4, max_length=24, max_prompt_tokens=16,
                           encoder=tiny_encoder)
    return out / "info", results["info"]


def test_backbone_info_judge_reads_the_references_and_the_answer_in_context(backbone_info, data_dir):
    from transformers import AutoConfig

    from trinityx.eval.judges.features import REFERENCE_FEATURES

    folder, result = backbone_info
    meta = json.loads((folder / "judge.json").read_text())
    assert meta["architecture"] == "backbone-features" and meta["training"]["poolings"] == ["response mean", "last token"]
    # The head and the reference features' encoder are saved; the backbone is loaded by its spec.
    assert sorted(p.name for p in folder.iterdir()) == ["encoder", "head.safetensors", "judge.json"]
    width = AutoConfig.from_pretrained(meta["training"]["backbone"]).hidden_size
    assert meta["training"]["n_features"] == len(REFERENCE_FEATURES) + 2 * width  # 1 layer x 2 poolings
    judge = load_judge(folder)
    assert judge.uses_references
    assert validate_judge(judge, data_dir, "test", MAX_EVAL, seed=0) == {
        k: v for k, v in meta["validity"].items() if k != "threshold_chosen_on"}
    refs = [(("yes it is",), ("no it is not",))] * 3
    with pytest.raises(TrinityXError, match="score_answers"):
        judge.score(["is it?"], ["yes it is"])
    # The same answer to another question is another input (the backbone reads it in context), and an item
    # scores the same wherever it sits in the batch.
    batch = score_answers(judge, ["is it?", "what is it?", "is it?"], ["yes it is", "yes it is", "yes it is"], refs)
    assert batch[0] == pytest.approx(batch[2], abs=1e-6) and batch[0] != pytest.approx(batch[1], abs=1e-9)
    # A head of another width (a judge trained before a feature change) is refused with the fix.
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from trinityx.backbones import load_backbone
    from trinityx.eval.judges.features import StatesAndReferences, feature_judge

    bb = load_backbone(meta["training"]["backbone"])
    readers = StatesAndReferences(bb.model, bb.tokenizer, AutoModel.from_pretrained(folder / "encoder"),
                                  AutoTokenizer.from_pretrained(folder / "encoder"))
    # Its inputs are the reference features, then the recipe's poolings (answer mean, last token) of the states.
    from trinityx.eval.judges.features import judge_features, pair_states

    questions, answers = ["is it?", "what is it?"], ["yes it is", "no"]
    x = judge_features("info", judge.config, readers, None, questions, answers, refs[:2])
    states = pair_states(bb.model, bb.tokenizer, judge.config["prompt_format"], questions, answers, layers=(1,),
                         max_prompt_tokens=16, max_response_tokens=24).view(2, 3, -1)  # [N, 3 poolings, D]
    assert torch.equal(x[:, :len(REFERENCE_FEATURES)],
                       reference_features(readers.minilm, readers.minilm_tokenizer, questions, answers, refs[:2], 24))
    assert torch.allclose(x[:, len(REFERENCE_FEATURES):], states[:, :2].reshape(2, -1))
    head = {k: v[:-1] if v.dim() else v for k, v in load_file(folder / "head.safetensors").items()}
    with pytest.raises(TrinityXError, match="retrain it"):
        feature_judge("old-info", "info", readers, None, head, 0.5, {}, judge.config)


def test_make_judge_from_config(trained, monkeypatch):
    assert make_judge(f"local:{trained[0] / 'truth'}").kind == "truth"
    judge = make_judge({"type": "openai", "kind": "info", "base_url": "http://127.0.0.1:1/v1", "model": "m",
                        "api_key_env": None})
    assert judge.kind == "info" and judge.score is not None
    with pytest.raises(TrinityXError, match="not understood"):
        make_judge("gpt-judge")
    with pytest.raises(TrinityXError, match="unexpected keyword"):
        make_judge({"type": "openai", "kind": "info", "base_url": "x", "model": "m", "colour": "red"})


# --------------------------------------------------------------------------------------------------
# Metrics on hand-computed cases


def test_length_rule_agreement_hand_computed():
    a = ["aa", "a", "abc", "x"]
    b = ["a", "aaa", "xyz", "yy"]
    # a longer & GPT-4 chose a: right; b longer & chose b: right; same length: half; exact tie: left out.
    assert length_rule_agreement(a, b, [1.0, 2.0, 1.0, 1.5]) == pytest.approx(2.5 / 3)
    assert pairwise_agreement([0.9, 0.2, 0.5, 0.3], [2.0, 1.7, 1.2, 1.5]) == pytest.approx(1.5 / 3)


def test_auroc_and_threshold_hand_computed():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    # Any threshold in (0.4, 0.6] separates perfectly; the midpoint is returned.
    assert best_threshold([0.2, 0.4, 0.6, 0.9], [0, 0, 1, 1]) == pytest.approx(0.5)


def test_balanced_threshold_rule_trades_accuracy_for_recall_but_keeps_above_majority():
    # 10 safe, 3 unsafe (majority 10/13 = 0.769). Above 0.7: 2 of 3 unsafe flagged, no safe one: accuracy
    # 12/13, balanced (2/3 + 1) / 2. Above 0.45: every unsafe one and 2 safe ones: accuracy 11/13 (still above
    # the majority), balanced (1 + 0.8) / 2 = 0.9, so the balanced rule moves there.
    p = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.55, 0.6, 0.5, 0.8, 0.9]
    y = [0] * 10 + [1] * 3
    assert best_threshold(p, y) == pytest.approx(0.7)
    t = best_threshold(p, y, "balanced-above-majority")
    assert t == pytest.approx(0.45)
    assert accuracy(p, y, t) == pytest.approx(11 / 13) and balanced_accuracy(p, y, t) == pytest.approx(0.9)
    # No threshold beats the majority (2 of 3 at best, at 0.15 and above 0.9): the rule falls back to accuracy's
    # choice, 0.15 (closer to 0.5). One class only: flag nothing.
    assert best_threshold([0.9, 0.1, 0.2], [0, 0, 1], "balanced-above-majority") == pytest.approx(0.15)
    assert best_threshold([0.3, 0.9], [0, 0], "balanced-above-majority") > 0.9
    with pytest.raises(TrinityXError, match="threshold rule"):
        best_threshold(p, y, "f1")


# --------------------------------------------------------------------------------------------------
# The OpenAI-compatible judge against a real HTTP server


class _ChatServer:
    """A loopback OpenAI-style /chat/completions server that replies from a script and records headers."""

    def __init__(self, replies):
        self.replies, self.headers, self.bodies = list(replies), [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                server.headers.append(dict(self.headers))
                server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                status, content = server.replies.pop(0)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_openai_judge_parses_answers_and_sends_the_key(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    with _ChatServer([(200, "unsafe"), (200, " Safe.\n"), (503, ""), (200, "safe")]) as server:
        judge = openai_judge("harm", server.url, "judge-model", api_key_env="JUDGE_KEY", retries=1, backoff=0.01)
        scores = judge.score(["p1", "p2", "p3"], ["r1", "r2", "r3"])
    assert scores == [1.0, 0.0, 0.0]  # the 503 was retried once and then answered
    assert judge.failures == []
    assert all(h["Authorization"] == "Bearer sk-test" for h in server.headers)
    assert server.bodies[0]["model"] == "judge-model" and "r1" in server.bodies[0]["messages"][1]["content"]


def test_openai_judge_counts_a_garbage_answer_as_a_failure():
    with _ChatServer([(200, "2"), (200, "Output 2 is better because..."), (200, "1")]) as server:
        judge = openai_judge("helpful", server.url, "m", api_key_env=None, retries=0)
        p_b = judge.prefer(["i1", "i2", "i3"], ["a1", "a2", "a3"], ["b1", "b2", "b3"])
    assert p_b == [1.0, None, 0.0]
    assert len(judge.failures) == 1 and "item 1" in judge.failures[0] and "unparseable" in judge.failures[0]
    assert "Authorization" not in server.headers[0]


def test_openai_judge_counts_a_down_endpoint_as_failures():
    with socket.socket() as s:  # a free port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = openai_judge("truth", f"http://127.0.0.1:{port}/v1", "m", api_key_env=None, timeout=2, retries=1,
                         backoff=0.01)
    assert judge.score(["q1", "q2"], ["a1", "a2"]) == [None, None]
    assert len(judge.failures) == 2 and all("unreachable" in f for f in judge.failures)


def test_openai_judge_needs_the_named_key_variable(monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(TrinityXError, match="NO_SUCH_JUDGE_KEY"):
        openai_judge("harm", "http://127.0.0.1:1/v1", "m", api_key_env="NO_SUCH_JUDGE_KEY")


# --------------------------------------------------------------------------------------------------
# beaver-dam and AllenAI semantics, without their 7B weights


def test_beaver_dam_flags_when_any_category_exceeds_the_threshold():
    assert len(BEAVER_DAM_CATEGORIES) == 14
    assert BEAVER_DAM_CATEGORIES[0] == "animal_abuse"
    assert BEAVER_DAM_CATEGORIES[-1] == "violence,aiding_and_abetting,incitement"
    logits = torch.full((3, 14), -5.0)
    logits[1, 9] = 1.0  # privacy_violation: sigmoid(1) = 0.73
    logits[2, :] = -0.1  # every category just under 0.5: still safe (no single category exceeds it)
    probs, flagged = beaver_dam_flags(logits, threshold=0.5)
    assert probs.shape == (3, 14) and flagged.tolist() == [False, True, False]
    assert beaver_dam_flags(logits, threshold=0.8)[1].tolist() == [False, False, False]
    with pytest.raises(TrinityXError, match="14"):
        beaver_dam_flags(torch.zeros(2, 13))


def test_allenai_yes_probability_on_the_tiny_backbone(tiny_backbone):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_backbone).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    prompts = ["Q: what happens?\nA: nothing\nTrue:", "Q: a much longer question about seeds?\nA: no\nHelpful:"]
    with torch.no_grad():
        batched = yes_probabilities(model, tokenizer, prompts, batch_size=2)
        single = [yes_probabilities(model, tokenizer, [p], batch_size=1)[0] for p in prompts]
        # By hand for the first prompt: softmax of the last position's logits at the " yes" token.
        ids = tokenizer(prompts[0]).input_ids
        yes_id = tokenizer(prompts[0] + " yes").input_ids[len(ids)]
        by_hand = torch.softmax(model(torch.tensor([ids])).logits[0, -1], -1)[yes_id].item()
    assert all(0.0 <= p <= 1.0 for p in batched)
    assert batched == pytest.approx(single, abs=1e-5)  # left padding does not change the answer
    assert batched[0] == pytest.approx(by_hand, abs=1e-5)



# --------------------------------------------------------------------------------------------------
# Recipes, references, feature heads and the trivial-baseline check


def test_stale_judges_compares_the_recorded_recipe(trained, tmp_path):
    out, _ = trained
    # The fixture trained with tiny overrides: recorded as such, so the default recipe does not accept them.
    assert json.loads((out / "truth" / "judge.json").read_text())["training"]["recipe"] == "default+overrides"
    stale = stale_judges(out, KINDS, "default")
    assert set(stale) == set(KINDS) and "max_length" in stale["truth"]
    # A judge recorded with exactly the recipe's settings is reused; another seed or no record is stale.
    folder = tmp_path / "truth"
    folder.mkdir()
    (folder / "judge.json").write_text(json.dumps({"training": {**recipe_settings("default", "truth"), "n_train": 5}}))
    assert stale_judges(tmp_path, ("truth",), "default") == {}
    assert "seed" in stale_judges(tmp_path, ("truth",), "default", seed=1)["truth"]
    assert stale_judges(tmp_path, ("truth",), "finetune")["truth"].startswith("trained by recipe 'default'")
    assert stale_judges(tmp_path, ("info",), "default") == {"info": "missing"}
    (folder / "judge.json").write_text(json.dumps({"training": {"max_train": 3000}}))
    assert "older recipe" in stale_judges(tmp_path, ("truth",), "default")["truth"]
    with pytest.raises(TrinityXError, match="unknown judge recipe"):
        train_judges(tmp_path, tmp_path, recipe="bigger")
    with pytest.raises(TrinityXError, match="no setting"):
        train_judges(tmp_path, tmp_path, colour="red")


def test_reference_features_see_which_reference_the_answer_matches(tiny_encoder):
    from transformers import AutoModel, AutoTokenizer

    encoder, tokenizer = AutoModel.from_pretrained(tiny_encoder), AutoTokenizer.from_pretrained(tiny_encoder)
    refs = [(("the sky is blue", "blue"), ("the sky is green",))] * 2
    x = reference_features(encoder, tokenizer, ["what colour is the sky"] * 2, ["the sky is blue", "the sky is green"],
                           refs, max_length=16)
    f = {name: x[:, k].tolist() for k, name in enumerate(REFERENCE_FEATURES)}
    assert f["equals_correct"] == [1.0, 0.0] and f["equals_incorrect"] == [0.0, 1.0]
    assert f["max_f1_correct"] == pytest.approx([1.0, 0.75]) and f["max_f1_incorrect"] == pytest.approx([0.75, 1.0])
    assert f["max_sim_correct"][0] == pytest.approx(1.0, abs=1e-5) and f["sim_margin"][0] > 0 > f["sim_margin"][1]
    assert token_f1("I have no comment.", "no comment") == pytest.approx(2 * 2 / (4 + 2))
    with pytest.raises(TrinityXError, match="no correct or no incorrect"):
        reference_features(encoder, tokenizer, ["q"], ["a"], [(("a",), ())], max_length=16)


def test_truth_judge_needs_references_and_score_answers_passes_them(trained):
    judge = load_judge(trained[0] / "truth")
    assert judge.uses_references
    with pytest.raises(TrinityXError, match="score_answers"):
        judge.score(["q"], ["a"])
    refs = [(("yes it is",), ("no it is not",))]
    assert score_answers(judge, ["is it?"], ["yes it is"], refs) == judge.score(["is it?"], ["yes it is"], refs)
    # A plugged-in judge keeps its two-argument score; the references are not passed to it.
    plain = Judge("plain", "truth", 0.5, {}, score=lambda q, a: [0.25] * len(q))
    assert score_answers(plain, ["is it?"], ["yes"], refs) == [0.25]


def test_fit_head_mlp_solves_xor_where_a_linear_head_cannot():
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]).repeat(8, 1)  # [32, 2]
    y = torch.tensor([0.0, 1.0, 1.0, 0.0]).repeat(8)
    mlp = fit_head(x, y, hidden=16, l2=0.0, steps=500, lr=0.05, seed=0)
    linear = fit_head(x, y, hidden=0, l2=0.0, steps=500, lr=0.05, seed=0)
    assert ((head_logits(mlp, x) > 0).float() == y).all()
    assert ((head_logits(linear, x) > 0).float() == y).float().mean() <= 0.75


def test_confusion_and_similar_length_hand_computed():
    assert confusion([0.9, 0.6, 0.2, 0.1], [1, 0, 1, 0], 0.5) == {"tp": 1, "fp": 1, "tn": 1, "fn": 1}
    assert similar_length("a" * 80, "b" * 100) and not similar_length("a" * 79, "b" * 100)


def test_validate_judge_flags_a_judge_at_its_trivial_baseline(data_dir):
    # A constant judge (e.g. a plugged-in one answering 'safe' to everything) equals the majority class.
    constant = Judge("always-safe", "harm", 0.5, {}, score=lambda p, r: [0.0] * len(p))
    validity = validate_judge(constant, data_dir, "test")
    assert validity["accuracy"] == pytest.approx(validity["majority_baseline"])
    assert validity["beats_trivial_baseline"] is False and validity["confusion"]["tp"] == 0
    longer = Judge("longer-wins", "helpful", 0.5, {},
                   prefer=lambda i, a, b: [0.5 if len(x) == len(y) else float(len(y) > len(x)) for x, y in zip(a, b)])
    helpful = validate_judge(longer, data_dir, "dev")
    assert helpful["agreement"] == pytest.approx(helpful["length_rule_agreement"])
    assert helpful["beats_trivial_baseline"] is False


def test_a_feature_judge_of_another_feature_set_stops_with_a_clear_message(tiny_encoder):
    from trinityx.eval.judges.features import feature_judge

    head = {"mean": torch.zeros(14), "std": torch.ones(14), "w": torch.zeros(14), "b": torch.zeros(())}
    with pytest.raises(TrinityXError, match="retrain it"):
        feature_judge("old-truth", "truth", None, None, head, 0.5, {}, {})


def test_a_recipe_has_its_own_cache_folder_and_adopts_the_default_judges_it_shares(tmp_path, monkeypatch):
    from trinityx.eval.evaluate import resolve_judges_dir
    from trinityx.eval.judges.train import adopt_judges

    monkeypatch.setenv("TRINITYX_JUDGES", str(tmp_path / "cache"))
    default, backbone = resolve_judges_dir(None), resolve_judges_dir(None, "backbone")
    assert default == tmp_path / "cache" and backbone == tmp_path / "cache" / "recipes" / "backbone"
    assert resolve_judges_dir(tmp_path / "mine", "backbone") == tmp_path / "mine"  # a given folder is used as is
    (default / "truth").mkdir(parents=True)
    (default / "truth" / "judge.json").write_text(json.dumps({"training": recipe_settings("default", "truth")}))
    (default / "harm").mkdir()
    (default / "harm" / "judge.json").write_text(json.dumps({"training": recipe_settings("default", "harm")}))
    still = adopt_judges(backbone, stale_judges(backbone, ("truth", "harm"), "backbone"), "backbone", default)
    # The default truth judge has the backbone recipe's truth settings: copied. Its harm judge does not: trained.
    assert still == {"harm": "missing"} and stale_judges(backbone, ("truth",), "backbone") == {}
    assert not (backbone / "harm").exists()
