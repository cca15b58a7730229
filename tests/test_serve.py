"""`trinityx serve` and `trinityx chat` on a tiny MoCaE folder: the real uvicorn server, the official openai client.

Meaning, not coverage: answers equal the MoCaE model's own greedy generation, streaming concatenates to the
same answer, overrides change the gates, batching changes no greedy answer, and every bad request or overload
gets an OpenAI-style error instead of a crash.
"""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from trinityx.apps.chat import ChatSession, parse_weights, run_chat
from trinityx.apps.serve import ServeConfig, ServerThread, build_app, load_served
from trinityx.errors import TrinityXError
from trinityx.infer.engine import Engine, Row, TextTracker, render_chat
from trinityx.mocae import MoCaEConfig, MoCaEModel

from tiny import NAMES, load, make_mocae_folder

MODEL = "tiny"
QUESTIONS = ["Give three tips for staying healthy.", "What happens if you eat watermelon seeds?", "yes",
             "The quick brown fox", "Is it true or false?"]


@pytest.fixture(scope="module")
def folder(tiny_backbone, tmp_path_factory):
    return make_mocae_folder(tiny_backbone, tmp_path_factory.mktemp("serve"))


def start(folder, **limits):
    cfg = ServeConfig(run=folder, model_name=MODEL, **{"max_tokens": 64, "default_max_tokens": 12, **limits})
    served = load_served(cfg)
    return served, ServerThread(build_app(served))


@pytest.fixture(scope="module")
def server(folder):
    served, thread = start(folder, max_prompt_tokens=120, max_body_bytes=50_000, batch_wait_ms=30)
    with thread as url:
        yield served, url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(folder, tiny_backbone):
    """The MoCaE model and tokenizer outside the server, for its own greedy answers."""
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    return MoCaEModel.from_pretrained(folder, load(tiny_backbone)), tok


def hf_answer(reference, question, max_new_tokens=12, weights=None):
    """Greedy answer of MoCaEModel.generate (HF generate) for one chat question, and its gates."""
    model, tok = reference
    model.set_gating(gate_mode="fixed", fixed_weights=weights) if weights else model.set_gating(gate_mode="learned")
    ids = tok(render_chat(tok, "chat", [{"role": "user", "content": question}]), add_special_tokens=False,
              return_tensors="pt")
    gates = model.gates(model.route(ids.input_ids, ids.attention_mask))[0]
    out = model.generate(ids.input_ids, attention_mask=ids.attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True), gates


def ask(client, question, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}], **kwargs)


def test_health_and_models(server, client):
    served, url = server
    assert httpx2.get(url + "/health").json()["status"] == "ok"
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["trinityx"]["experts"] == NAMES


def test_chat_answer_is_the_models_greedy_answer_with_gates(client, reference):
    for question in QUESTIONS[:2]:
        response = ask(client, question, max_tokens=12)
        want, gates = hf_answer(reference, question)
        assert response.choices[0].message.content == want
        assert response.choices[0].finish_reason in ("stop", "length")
        got = response.model_extra["trinityx"]
        assert got["routing"] == "learned"
        assert list(got["gates"]) == NAMES
        assert torch.allclose(torch.tensor(list(got["gates"].values())), gates, atol=1e-5)
        assert response.usage.completion_tokens <= 12


def test_stream_concatenates_to_the_answer(client):
    full = ask(client, QUESTIONS[0], max_tokens=20)
    chunks = list(ask(client, QUESTIONS[0], max_tokens=20, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[0].model_extra["trinityx"]["gates"] == full.model_extra["trinityx"]["gates"]


def test_completions_and_stop_strings(client):
    prompt = "The quick brown fox"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20)
    text = full.choices[0].text
    assert full.model_extra["trinityx"]["gates"]
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=20,
                                                                              stream=True))
    assert streamed == text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), f"answer {text!r} too short to cut"
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, stop=[stop])
    assert cut.choices[0].text == text.split(stop)[0]
    assert cut.choices[0].finish_reason == "stop"
    streamed_cut = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, stop=[stop], stream=True))
    assert streamed_cut == cut.choices[0].text


def test_routing_override(client, reference):
    fixed = ask(client, QUESTIONS[0], max_tokens=12, extra_body={"trinityx": {"weights": {"helpful": 1.0}}})
    assert fixed.model_extra["trinityx"] == {"gates": {"helpful": 1.0, "harmless": 0.0, "honest": 0.0},
                                             "routing": "fixed"}
    assert fixed.choices[0].message.content == hf_answer(reference, QUESTIONS[0], weights=[1.0, 0.0, 0.0])[0]
    negated = ask(client, QUESTIONS[0], max_tokens=12,
                  extra_body={"trinityx": {"weights": {"helpful": 1.0, "harmless": 1.0, "honest": -0.5}}})
    assert negated.model_extra["trinityx"]["gates"]["honest"] == -0.5
    assert negated.choices[0].message.content == hf_answer(reference, QUESTIONS[0], weights=[1.0, 1.0, -0.5])[0]
    top1 = ask(client, QUESTIONS[0], max_tokens=4, extra_body={"trinityx": {"gate_mode": "top1"}})
    assert sorted(top1.model_extra["trinityx"]["gates"].values()) == [0.0, 0.0, 1.0]
    uniform = ask(client, QUESTIONS[0], max_tokens=4, extra_body={"trinityx": {"gate_mode": "uniform"}})
    assert all(abs(g - 1 / 3) < 1e-6 for g in uniform.model_extra["trinityx"]["gates"].values())
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, QUESTIONS[0], extra_body={"trinityx": {"weights": {"helpful": 3.0}}})
    assert e.value.body["code"] == "weight_out_of_range" and e.value.body["param"] == "trinityx.weights.helpful"
    with pytest.raises(openai.BadRequestError):
        ask(client, QUESTIONS[0], extra_body={"trinityx": {"weights": {"funny": 1.0}}})


def post(url, body, **kwargs):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx2.post(url + "/v1/chat/completions", content=content,
                       headers={"Content-Type": "application/json", **kwargs.pop("headers", {})}, **kwargs)


@pytest.mark.parametrize("body, status, param", [
    ('{"model": "tiny", "messages": [', 400, None),  # malformed JSON
    ("[1, 2]", 400, None),  # not an object
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 422, "frobnicate"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 422, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 422, "temperature"),
    ({"model": "tiny", "messages": []}, 422, "messages"),
    ({"model": "tiny"}, 422, "messages"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 422, "messages.0.role"),
    ({"model": "tiny", "messages": [{"role": "system", "content": "hi"}]}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 422, "n"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi " * 200}]}, 400, "messages"),
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "trinityx": {"weights": {"helpful": "1"}}},
     422, "trinityx.weights.helpful"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 60_000}]}, 413, None),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    response = post(server[1], body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_unknown_route_and_context_length_code(server):
    assert httpx2.get(server[1] + "/v1/nothing").json()["error"]["code"] == "not_found"
    long = post(server[1], {"model": "tiny", "messages": [{"role": "user", "content": "hi " * 200}]})
    assert long.json()["error"]["code"] == "context_length_exceeded"


def test_api_key(folder, monkeypatch):
    monkeypatch.setenv("TRINITYX_API_KEY", "sesame")
    served, thread = start(folder)
    with thread as url:
        assert httpx2.get(url + "/health").status_code == 200  # health needs no key
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            ask(wrong, "hi", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert httpx2.post(url + "/v1/completions", json={"model": MODEL, "prompt": "a"}).status_code == 401
        right = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert ask(right, "hi", max_tokens=2).choices[0].message.content is not None


def slow(served, seconds):
    forward = served.engine.forward

    def slow_forward(**kwargs):
        time.sleep(seconds)
        return forward(**kwargs)

    served.engine.forward = slow_forward


def wait_for(served, key, value, timeout=10.0):
    end = time.monotonic() + timeout
    while served.engine.stats()[key] != value:
        assert time.monotonic() < end, f"engine never reached {key}={value}: {served.engine.stats()}"
        time.sleep(0.01)


def test_queue_full_is_503_with_retry_after(folder):
    served, thread = start(folder, max_queue=1, max_batch_size=1, batch_wait_ms=0)
    slow(served, 0.05)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}
    with thread as url, ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, url, body, timeout=30)
        wait_for(served, "running", 1)
        queued = pool.submit(post, url, body, timeout=30)
        wait_for(served, "queued", 1)
        refused = post(url, body)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        assert running.result().status_code == 200 and queued.result().status_code == 200


def test_concurrent_requests_are_batched_and_unchanged(folder):
    served, thread = start(folder, max_batch_size=8, batch_wait_ms=50)
    requests = [(QUESTIONS[i % len(QUESTIONS)], 4 + (i * 7) % 13,
                 {"trinityx": {"weights": {"honest": -1.0, "helpful": 1.0}}} if i % 4 == 0 else None)
                for i in range(20)]
    with thread as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def one(request):
            question, max_tokens, extra = request
            r = ask(client, question, max_tokens=max_tokens, extra_body=extra)
            return r.choices[0].message.content, r.model_extra["trinityx"]["gates"]

        alone = [one(r) for r in requests]  # one at a time: batches of one
        before = served.engine.stats()
        assert before["decoded_rows"] == before["decode_steps"] > 0  # one row per decode step
        assert before["prefilled_rows"] == before["prefills"] == len(requests)  # and per prefill
        assert before["prefill_seconds"] > 0 and before["decode_seconds"] > 0
        with ThreadPoolExecutor(20) as pool:
            together = list(pool.map(one, requests))
        after = served.engine.stats()
    assert after["batches"] - before["batches"] < 20, "the 20 concurrent requests were not batched"
    rows_per_step = (after["decoded_rows"] - before["decoded_rows"]) / (after["decode_steps"] - before["decode_steps"])
    assert rows_per_step > 1.5, "concurrent requests were not decoded together"
    assert after["prefilled_rows"] - before["prefilled_rows"] == len(requests)  # each request prefilled once
    for (text, gates), (want_text, want_gates) in zip(together, alone):
        assert text == want_text
        assert gates == pytest.approx(want_gates, abs=1e-5)


def test_sampling_is_seeded(client):
    a = ask(client, QUESTIONS[1], max_tokens=12, temperature=1.5, top_p=0.9, seed=7).choices[0].message.content
    b = ask(client, QUESTIONS[1], max_tokens=12, temperature=1.5, top_p=0.9, seed=7).choices[0].message.content
    assert a == b


def test_graceful_shutdown_finishes_in_flight_requests(folder):
    served, thread = start(folder, batch_wait_ms=0)
    slow(served, 0.05)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}
    url = thread.__enter__()
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(post, url, body, timeout=30)
        wait_for(served, "running", 1)
        stopper = threading.Thread(target=thread.__exit__)
        stopper.start()
        assert in_flight.result().status_code == 200
        stopper.join(30)
    assert not thread.thread.is_alive() and not served.engine.thread.is_alive()
    with pytest.raises(httpx2.HTTPError):
        httpx2.get(url + "/health", timeout=2)


def test_text_tracker_holds_back_stop_prefixes(tiny_backbone):
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    ids = tok("yes no true false", add_special_tokens=False).input_ids
    tracker, deltas = TextTracker(tok, ("true",)), []
    for i in ids:
        delta, stopped = tracker.add(i)
        deltas.append(delta)
        if stopped:
            break
    assert stopped and "".join(deltas) == "yes no "


def test_chat_core(folder, tiny_backbone):
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    session = ChatSession(MoCaEModel.from_pretrained(folder, load(tiny_backbone)), tok, "chat", max_tokens=8)
    out = []
    run_chat(session, ["/weights helpful=1,harmless=0,honest=0", "Give three tips for staying healthy.", "/reset",
                       "/weights nonsense", "/quit", "never read"], out.append)
    text = "".join(out)
    assert "[gates helpful=1.000 harmless=0.000 honest=0.000 (fixed)]" in text
    assert "assistant: " in text and "[conversation reset]" in text and "[error:" in text
    assert session.history == []
    assert parse_weights("honest=-0.5", NAMES) == [0.0, 0.0, -0.5]
    # A second turn sees the first: the rendered prompt holds the whole conversation.
    session.weights = None
    first, gates = session.reply("yes", out.append)
    assert len(gates) == 3 and abs(sum(gates) - 1) < 1e-5
    session.reply("no", out.append)
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first


def test_bench_serve_runs_and_batching_changes_nothing(folder, capsys):
    from trinityx.bench.serve import BenchServeConfig, bench_serve

    result = bench_serve(BenchServeConfig(run=folder, clients=3, requests=6, max_tokens=4, overload_clients=8,
                                          overload_queue=1, time_limit=60))
    batched, single = result["phases"]["batched"], result["phases"]["one-at-a-time"]
    assert batched["ok"] == single["ok"] == 6 and batched["errors"] == single["errors"] == 0
    assert result["batched_vs_single_mismatches"] == 0
    overload = result["phases"]["overload"]
    assert overload["errors"] == 0 and overload["ok"] + overload["status_503"] == 6
    # The engine's counts are of the measured requests: each prefilled once, the warm-up request left out.
    for phase in (batched, single, overload):
        assert phase["prefilled_rows"] == phase["ok"]
        assert 0 < phase["prefill_share"] < 1 and 0 < phase["forward_share"] <= 1
    assert single["rows_per_prefill"] == single["rows_per_step"] == 1.0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "one-at-a-time" in "\n".join(lines) and json.loads(lines[-1])["bench"] == "serve"


@pytest.mark.parametrize("message, weights, param", [
    ("hi", {"helpful": float("nan")}, "trinityx.weights.helpful"),  # passed the range check, then broke the JSON
    ("hi \ud800", None, "messages"),  # a lone surrogate: the tokenizer raised
])
def test_unreadable_values_are_400s_not_500s(server, message, weights, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": message}], "max_tokens": 2}
    if weights is not None:
        body["trinityx"] = {"weights": weights}
    response = post(server[1], json.dumps(body, allow_nan=True))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    completion = httpx2.post(server[1] + "/v1/completions", content=json.dumps({"model": "tiny", "prompt": "\ud800"}),
                             headers={"Content-Type": "application/json"})
    assert completion.status_code == 400 and completion.json()["error"]["param"] == "prompt"


def test_the_context_rule_of_serve_and_generate_is_one(folder, capsys):
    from trinityx.cli import main

    prompt = "hi " * 250  # the tiny model has 256 positions
    served, thread = start(folder, max_prompt_tokens=2048)
    with thread as url:
        response = post(url, {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 2})
    served_error = response.json()["error"]
    assert response.status_code == 400 and served_error["code"] == "context_length_exceeded"
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--run", str(folder), "--prompt", "short", prompt, "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--prompt 2: the prompt (" in err and "model's context of 256 tokens" in err
    assert served_error["message"].split(" tokens)")[0] == err.split("--prompt 2: ")[1].split(" tokens)")[0]


def test_a_keyless_server_refuses_web_pages(server, folder, monkeypatch):
    url = server[1]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    # A form or fetch() from a page: text/plain needs no preflight, so the browser sends it as is.
    plain = post(url, body, headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
    page = post(url, body, headers={"Origin": "https://evil.example"})
    assert page.status_code == 403 and "--allow-origins https://evil.example" in page.json()["error"]["message"]
    assert httpx2.get(url + "/v1/models", headers={"Origin": "https://evil.example"}).status_code == 403
    rebound = post(url, body, headers={"Host": "evil.example:8000"})  # DNS rebinding: the page's name, our address
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
    assert post(url, body).status_code == 200  # a program on this machine (no Origin) is served

    served, thread = start(folder, allow_origins=("http://localhost:3000",))
    with thread as allowed_url:
        ok = post(allowed_url, body, headers={"Origin": "http://localhost:3000"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:3000"

    # Binding beyond loopback without a key is refused before the model loads, unless asked for.
    monkeypatch.delenv("TRINITYX_API_KEY", raising=False)
    with pytest.raises(TrinityXError, match="--host 0.0.0.0 .*--allow-keyless-remote"):
        load_served(ServeConfig(run=folder / "missing", host="0.0.0.0"))
    with pytest.raises(TrinityXError, match="--port=70000 is not a TCP port"):
        load_served(ServeConfig(run=folder / "missing", port=70000))


def long_question(client, max_tokens):
    """A question whose greedy answer runs to max_tokens (the tiny model's answers end at random)."""
    for question in QUESTIONS:
        if ask(client, question, max_tokens=max_tokens).choices[0].finish_reason == "length":
            return question
    pytest.skip("no fixture question runs to max_tokens on this tiny model")


def test_a_client_that_disconnects_cancels_its_generation(folder, client):
    question = long_question(client, 60)
    served, thread = start(folder, max_batch_size=2, batch_wait_ms=0)
    slow(served, 0.05)  # 60 steps: 3 s
    calls = {"n": 0}
    forward = served.engine.forward

    def counting(**kwargs):
        calls["n"] += 1
        return forward(**kwargs)

    served.engine.forward = counting
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 60}
    with thread as url:
        with pytest.raises(httpx2.TimeoutException):
            post(url, body, timeout=0.4)  # a non-streaming client that gives up
        wait_for(served, "batches", 1, timeout=2.0)  # the batch ended long before its 60 steps
    assert calls["n"] < 30


def test_a_new_request_joins_a_running_batch(folder, client, reference):
    question = long_question(client, 60)
    served, thread = start(folder, max_batch_size=4, batch_wait_ms=0)
    slow(served, 0.05)
    with thread as url, ThreadPoolExecutor(1) as pool:
        long = pool.submit(post, url, {"model": MODEL, "messages": [{"role": "user", "content": question}],
                                       "max_tokens": 60}, timeout=30)
        wait_for(served, "running", 1)
        short = post(url, {"model": MODEL, "messages": [{"role": "user", "content": QUESTIONS[2]}], "max_tokens": 4},
                     timeout=30)
        assert short.status_code == 200 and served.engine.stats()["batches"] == 0  # answered inside the long batch
        assert not long.done()
        # Joining changes no greedy answer: each equals the model's own answer alone.
        assert short.json()["choices"][0]["message"]["content"] == hf_answer(reference, QUESTIONS[2], 4)[0]
        assert long.result().json()["choices"][0]["message"]["content"] == hf_answer(reference, question, 60)[0]


def test_rows_join_across_a_sliding_window_and_keep_their_answers(tmp_path):
    """Gemma 3's sliding-window cache layers join a running batch too (continuous batching on Gemma-3-270M), and
    joining changes no greedy answer, whichever batch is longer and whether the window is full or not yet."""
    from trinityx.infer.engine import Row, joinable, run_batch

    from tiny import build_tiny_gemma3, build_tokenizer

    backbone = build_tiny_gemma3(tmp_path / "gemma3", sliding_window=6)
    model = MoCaEModel.from_pretrained(make_mocae_folder(backbone, tmp_path), load(backbone))
    tok = build_tokenizer()
    assert joinable(model)

    def answers(first, join_after=None, joiners=()):
        """{name: greedy text}: `first` rows decode together; `joiners` join them after `join_after` steps."""
        texts, calls = {}, {"n": 0}

        def row(name, text, max_tokens):
            texts[name] = []
            return Row(prompt_ids=tok(text, add_special_tokens=False).input_ids, max_tokens=max_tokens,
                       emit=lambda event: event[0] == "delta" and texts[name].append(event[1]))

        def join(running):
            calls["n"] += 1
            return [row(*spec) for spec in joiners] if calls["n"] == join_after else []

        run_batch(model, tok, [row(*spec) for spec in first], set(), join=join)
        return {name: "".join(parts) for name, parts in texts.items()}

    long = ("long", "The quick brown fox jumps over the lazy dog. Give three tips", 14)  # 27 tokens: beyond the window
    short, mid = ("short", "yes no", 16), ("mid", "What happens if you eat", 9)  # 3 tokens: within it; 8: beyond
    alone = {**answers([long]), **answers([short]), **answers([mid])}
    assert len(set(alone.values())) == 3
    for after in (1, 3, 8):  # the running batch is the longer one (its window full), the newcomers' full or not
        assert answers([long], after, [short, mid]) == alone
        assert answers([long], after, [short]) == {"long": alone["long"], "short": alone["short"]}
    for after in (1, 2, 5):  # the newcomer is longer: at step 1 the running batch has not filled its window yet
        assert answers([short], after, [long]) == {"short": alone["short"], "long": alone["long"]}


def test_queued_rows_join_a_running_batch_together_or_after_their_wait(reference):
    """--join-ratio / --join-wait-steps (TGI's waiting_served_ratio / max_waiting_tokens), on the engine alone."""
    model, tok = reference
    row = lambda: Row(prompt_ids=[1, 2], max_tokens=4, emit=lambda event: None)  # noqa: E731
    running = [row() for _ in range(4)]

    engine = Engine(model, tok, "chat", max_batch_size=8)  # the default: every queued row joins at the next step
    engine.pending.append(row())
    assert len(engine._join(running)) == 1

    engine = Engine(model, tok, "chat", max_batch_size=8, join_ratio=0.5, join_wait_steps=3)
    engine.pending.append(row())
    assert [len(engine._join(running)) for _ in range(3)] == [0, 0, 0]  # 1 waiting < 0.5 x 4 running
    assert len(engine._join(running)) == 1  # its fourth step: it has waited 3 decode steps
    engine.pending.extend([row(), row()])
    assert len(engine._join(running)) == 2  # 2 waiting = 0.5 x 4 running: they join at once
    engine.pending.extend([row() for _ in range(5)])
    assert len(engine._join(running + [row() for _ in range(3)])) == 1  # one free slot, filled at once
    assert len(engine.pending) == 4
    assert engine._join([row() for _ in range(8)]) == []  # a full batch takes no one
