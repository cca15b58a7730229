"""The generation and scoring engine every evaluation axis runs on, for any `System`.

- `generate`: batched generation of left-padded prompts under `torch.inference_mode()`, greedy by default,
  with a token budget and stop strings. Prompts are written in the backbone's prompt format
  (`format_prompt`), except few-shot completion prompts (`raw`, e.g. TruthfulQA's QA primer). Answers
  are cached on disk, one JSON-lines file per system identity (its fingerprint hashes the backbone,
  the adapter weights and the gating), keyed by sha256(fingerprint, formatted prompt, settings); each
  finished batch is appended in one write and fsynced, so a rerun regenerates
  nothing and a killed run keeps every finished batch.
- `loglikelihoods`: summed log P(continuation | context), tokenised exactly as lm-evaluation-harness does
  (`_encode_pair`: context alone, context + continuation, the continuation is the difference), with the
  context computed once: its KV cache is repeated over all of its continuations, scored in one batch.

Legend: B batch, T tokens, C continuations of one context, L continuation tokens, V vocabulary.
"""

import copy
import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from trinityx.backbones import cache_root, format_prompt
from trinityx.errors import TrinityXError


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated; every field is part of the cache key."""

    max_new_tokens: int = 256
    """Token budget of one answer."""
    stop: tuple[str, ...] = ()
    """Generation stops at the first of these strings, which is cut from the answer."""
    do_sample: bool = False
    """Greedy decoding by default; sampling uses temperature, top_p and seed."""
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    raw: bool = False
    """Send prompts as they are, a completion prompt with the tokenizer's own special tokens (e.g. TruthfulQA's
    QA primer, as lm-evaluation-harness does), instead of in the backbone's prompt format."""
    batch_size: int = 8
    """Prompts per forward pass (not part of the answer: batched equals one-by-one)."""
    backend: str = "hf"
    """hf: Hugging Face `generate`; vllm: one vLLM engine (trinityx.infer.vllm_backend; optional extra)."""
    gate_decimals: int = 2
    """vllm backend, MoCaE systems: prompts whose gates agree to this many decimals share one merged LoRA."""

    def key(self) -> dict:
        settings = asdict(self)
        del settings["batch_size"]
        if self.backend == "hf":  # the key of every answer cached before the vllm backend existed
            del settings["backend"], settings["gate_decimals"]
        return settings


def default_cache_dir() -> Path:
    return cache_root() / "generations"


class StopOnStrings(StoppingCriteria):
    """Per-row stop once the generated text contains any stop string (HF pads finished rows)."""

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, stop, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


class Answers(list):
    """Answers (a list of str) that also say which ones ran out of tokens: `cut[i]` is True when answer i used
    all of max_new_tokens with no end of sequence and no stop string, so it may end mid-sentence (None: not
    known, for an answer cached before this was recorded, or from the vllm backend)."""

    def __init__(self, answers, cut):
        super().__init__(answers)
        self.cut = list(cut)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the first stop string, stripped."""
    for s in stop:
        text = text.split(s, 1)[0]
    return text.strip()


class GenerationCache:
    """Append-only JSON-lines file of {key, prompt, output}; a line cut by a killed run is ignored.

    Several processes (evaluation shards) may append to one file: each append holds an exclusive `flock`.
    """

    def __init__(self, path: Path):
        self.path = path
        self.outputs: dict[str, str] = {}
        self.cut: dict[str, bool | None] = {}  # did the answer run out of tokens (None: not recorded)
        if path.is_file():
            for line in path.read_bytes().splitlines():
                try:
                    row = json.loads(line.decode("utf-8"))
                except ValueError:  # not UTF-8 or not JSON
                    continue  # a line cut by a killed run, maybe inside a character: regenerated
                self.outputs[row["key"]] = row["output"]
                self.cut[row["key"]] = row.get("cut")

    def append(self, rows: list[dict]) -> None:
        """Append rows in one write, then fsync: a batch is either all on disk or (a cut last line) ignored."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        with open(self.path, "ab+") as f:  # bytes: a cut line may end inside a UTF-8 character
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(f.tell() - 1)
                if f.read(1) != b"\n":  # a previous run was killed mid-line: start on a fresh line
                    text = b"\n" + text
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for row in rows:
            self.outputs[row["key"]] = row["output"]
            self.cut[row["key"]] = row.get("cut")


def cache_path(system, cache_dir: str | Path | None) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in system.name)
    return Path(cache_dir or default_cache_dir()) / f"{slug}-{system.fingerprint[:16]}.jsonl"


def digest(payload: dict) -> str:
    """sha256 of a JSON-able cache payload (keys sorted): the one key function of both caches."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def loglikelihood_cache_path(system, cache_dir: str | Path | None) -> Path:
    """The file of a system's cached log-likelihoods, beside its generation cache."""
    path = cache_path(system, cache_dir)
    return path.with_name(f"{path.stem}.loglikelihood.jsonl")


def loglikelihood_key(fingerprint: str, context: str, continuations: list[str], batch_size: int,
                      gates: list[float] | None) -> str:
    """sha256 of what one context's scores depend on: the system, the context, its continuations in order, the
    batch they are scored in and, when the caller routed the context, its gates."""
    return digest({"system": fingerprint, "context": context, "continuations": continuations,
                   "batch_size": batch_size, "gates": None if gates is None else [round(g, 6) for g in gates]})


def cache_key(fingerprint: str, text: str, settings: GenerationSettings, gates: list[float] | None = None) -> str:
    """sha256 of the system, the prompt, the settings and, when the caller routed the prompt itself, its gates."""
    payload = {"system": fingerprint, "prompt": text, "settings": settings.key()}
    if gates is not None:
        payload["gates"] = [round(g, 6) for g in gates]
    return digest(payload)


BACKENDS = ("hf", "vllm")
VLLM_CHUNK = 256  # prompts per vLLM call: it batches them itself; each finished call is cached


@torch.inference_mode()
def generate_batch(system, texts: list[str], settings: GenerationSettings, gates: torch.Tensor | None = None) -> Answers:
    """Answers to already formatted prompts, as one left-padded batch (or one vLLM call), with which ones ran
    out of tokens (`Answers.cut`).

    `gates` [B, K]: sequence gates the caller routed (from each item's request); None lets the system route
    the prompt it is given."""
    tokenizer = system.tokenizer
    if settings.backend == "vllm":
        from trinityx.infer import vllm_backend

        ids = tokenizer(texts, add_special_tokens=settings.raw).input_ids
        answers = vllm_backend.generate(system, ids, settings, gates)
        return Answers([cut_at_stop(a, settings.stop) for a in answers], [None] * len(answers))
    # A chat template writes its own special tokens; a raw prompt gets the tokenizer's (lm-eval's tok_encode).
    batch = tokenizer(texts, add_special_tokens=settings.raw, padding=True, padding_side="left",
                      return_tensors="pt").to(system.backbone.model.device)
    prompt_length = batch.input_ids.shape[1]
    kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                  pad_token_id=tokenizer.pad_token_id)
    if settings.do_sample:
        torch.manual_seed(settings.seed)
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)  # silence the model's sampling defaults
    if settings.stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnStrings(tokenizer, settings.stop, prompt_length)])
    out = system.generate_ids(batch.input_ids, batch.attention_mask, gates=gates, **kwargs)  # [B, T + new]
    new = out[:, prompt_length:]  # [B, new]; a row that ended early is padded after its end token
    answers = tokenizer.batch_decode(new, skip_special_tokens=True)
    ends = system.backbone.model.generation_config.eos_token_id
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id, *(ends if isinstance(ends, list) else [ends])} - {None}
    cut = [new.shape[1] >= settings.max_new_tokens and int(row[-1]) not in ends and not any(s in a for s in settings.stop)
           for row, a in zip(new, answers)]
    return Answers([cut_at_stop(a, settings.stop) for a in answers], cut)


def generate(system, prompts: list[str], settings: GenerationSettings | None = None,
             cache_dir: str | Path | None = None, desc: str | None = None,
             gates: torch.Tensor | None = None) -> Answers:
    """Answers to prompts (written in the backbone's prompt format unless settings.raw), cached on disk, with
    which ones ran out of tokens (`Answers.cut`, cached with them).

    `gates` [N, K], one row per prompt: sequence gates routed by the caller from each item's request (the
    evaluation routes a TruthfulQA question by the question, not by the few-shot primer it answers after);
    None lets a routed system route the prompt it is given."""
    settings = settings or GenerationSettings()
    if settings.backend not in BACKENDS:
        raise TrinityXError(f"generation backend {settings.backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    tokenizer, prompt_format = system.tokenizer, system.backbone.prompt_format
    texts = list(prompts) if settings.raw else [format_prompt(tokenizer, prompt_format, p) for p in prompts]
    if gates is not None and len(gates) != len(texts):
        raise TrinityXError(f"{len(gates)} gate rows for {len(texts)} prompts: give one row per prompt")
    rows = [None] * len(texts) if gates is None else gates.tolist()
    keys = [cache_key(system.fingerprint, t, settings, g) for t, g in zip(texts, rows)]
    cache = GenerationCache(cache_path(system, cache_dir))
    todo = list({k: i for i, k in reversed(list(enumerate(keys))) if k not in cache.outputs}.values())
    # Longest first: batches of similar length pad little, and the first batch shows the worst-case memory.
    lengths = {i: len(tokenizer(texts[i]).input_ids) for i in todo}
    todo.sort(key=lambda i: -lengths[i])
    with tqdm(total=len(todo), desc=desc or f"generate {system.name}", unit="prompt",
              disable=not todo) as progress:
        step = VLLM_CHUNK if settings.backend == "vllm" else settings.batch_size
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            answers = generate_batch(system, [texts[i] for i in chunk], settings,
                                     None if gates is None else gates[chunk])
            cache.append([{"key": keys[i], "prompt": prompts[i], "output": a, "cut": c}
                          for i, a, c in zip(chunk, answers, answers.cut)])
            progress.update(len(chunk))
    return Answers([cache.outputs[k] for k in keys], [cache.cut[k] for k in keys])


# --------------------------------------------------------------------------------------------------
# Log-likelihoods (multiple choice)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's `_encode_pair` for causal models: trailing spaces of the context move to
    the continuation; the continuation's tokens are those of context + continuation past the context's."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation).input_ids
    context_ids = tokenizer(context).input_ids
    return context_ids, whole[len(context_ids):]


MIN_SHARED_PREFIX = 16  # tokens a context must share with the previous one before its KV cache is reused


class PrefixCache:
    """The KV cache of the last context scored, reused by the next context that starts with the same tokens.

    TruthfulQA's contexts all start with the same QA primer (about 250 tokens): the primer is computed once per
    system instead of once per question. Exact for causal attention (a prefix's keys and values do not depend
    on what follows). Under sequence routing the keys and values also depend on the gates: a prefix is reused
    only under the same gates (the oracle's, or one expert's), and never when the system routes each context
    itself (its gates depend on the whole context).
    """

    def __init__(self):
        self.ids: list[int] = []
        self.kv = None
        self.gates: torch.Tensor | None = None

    def shared(self, ids: list[int], gates: torch.Tensor | None = None) -> int:
        if (gates is None) != (self.gates is None) or (gates is not None and not torch.equal(gates, self.gates)):
            return 0
        n = 0
        for a, b in zip(self.ids, ids[:-1]):  # at least the last token is computed anew: its logits are needed
            if a != b:
                break
            n += 1
        return n if n >= MIN_SHARED_PREFIX else 0


@torch.inference_mode()
def _context_pass(system, context_ids: list[int], reuse: PrefixCache | None, gates: torch.Tensor | None = None):
    """(gates, KV cache of the whole context, log-probabilities after its last token [V]).

    `gates` [1, K]: routed by the caller; None lets a routed system route the context itself."""
    device = system.backbone.model.device
    lm = system.causal_lm()
    ids = torch.tensor([context_ids], device=device)  # [1, T]
    mask = torch.ones_like(ids)
    reusable = reuse is not None
    if gates is None:
        gates = system.route(ids, mask)  # [1, K], routed by this whole context, or None (no sequence router)
        reusable = reusable and gates is None
    n = reuse.shared(context_ids, gates) if reusable else 0
    with system.gated(gates):
        if n:
            kv = copy.deepcopy(reuse.kv)
            if n < len(reuse.ids):
                kv.crop(n - len(reuse.ids))  # transformers 5: a negative count of tokens to drop
            out = lm(input_ids=ids[:, n:], attention_mask=mask, past_key_values=kv, use_cache=True,
                     position_ids=torch.arange(n, ids.shape[1], device=device)[None])
        else:
            out = lm(input_ids=ids, attention_mask=mask, use_cache=True)
    if reusable:
        reuse.ids, reuse.kv, reuse.gates = list(context_ids), out.past_key_values, gates
    return gates, out.past_key_values, torch.log_softmax(out.logits[0, -1].float(), -1)


@torch.inference_mode()
def _score_context(system, context_ids: list[int], continuations: list[list[int]], batch_size: int,
                   reuse: PrefixCache | None = None, gates: torch.Tensor | None = None) -> list[float]:
    """Summed log-probabilities of each continuation after one context, the context computed once."""
    device = system.backbone.model.device
    lm = system.causal_lm()
    mask = torch.ones((1, len(context_ids)), dtype=torch.long, device=device)
    gates, context_kv, first = _context_pass(system, context_ids, reuse, gates)  # first: [V], each continuation's 1st
    scores = []
    for start in range(0, len(continuations), batch_size):
        chunk = continuations[start:start + batch_size]
        C, L, T = len(chunk), max(len(c) for c in chunk), len(context_ids)
        cont = torch.full((C, L), system.tokenizer.pad_token_id, device=device)  # [C, L], right-padded
        cont_mask = torch.zeros((C, L), dtype=torch.long, device=device)
        for row, c in enumerate(chunk):
            cont[row, :len(c)] = torch.tensor(c)
            cont_mask[row, :len(c)] = 1
        cache = copy.deepcopy(context_kv)
        cache.batch_repeat_interleave(C)
        with system.gated(None if gates is None else gates.expand(C, -1)):
            out = lm(input_ids=cont, attention_mask=torch.cat([mask.expand(C, -1), cont_mask], 1),
                     past_key_values=cache, use_cache=True,
                     position_ids=torch.arange(T, T + L, device=device).expand(C, -1))
        logp = torch.log_softmax(out.logits.float(), -1)  # [C, L, V]; position j predicts token j + 1
        for row, c in enumerate(chunk):
            total = first[c[0]] + logp[row, torch.arange(len(c) - 1), torch.tensor(c[1:], dtype=torch.long)].sum()
            scores.append(float(total))
    return scores


def loglikelihoods(system, contexts: list[str], continuations: list[str], batch_size: int = 32,
                   desc: str | None = None, gates: torch.Tensor | None = None,
                   cache_dir: str | Path | None = None) -> list[float]:
    """log P(continuation | context), summed over the continuation's tokens, for each pair (no chat template).

    `gates` [N, K], one row per pair (pairs of one context share a row): sequence gates routed by the caller;
    None lets a routed system route each context itself. With `cache_dir`, each context's scores are appended
    to the system's log-likelihood cache as soon as they are computed (`loglikelihood_cache_path`) and read
    from it next time, so an interrupted or re-judged evaluation scores no context twice. A context scored
    after a cached one may reuse a shorter shared prefix than in an uninterrupted run: equal to float
    rounding (`test_loglikelihood_cache_resumes_and_changes_no_score`)."""
    if len(contexts) != len(continuations):
        raise TrinityXError(f"{len(contexts)} contexts but {len(continuations)} continuations: give one each")
    if gates is not None and len(gates) != len(contexts):
        raise TrinityXError(f"{len(gates)} gate rows for {len(contexts)} contexts: give one row per pair")
    groups: dict[str, list[int]] = {}
    for i, context in enumerate(contexts):
        groups.setdefault(context, []).append(i)
    scores = [0.0] * len(contexts)
    reuse = PrefixCache()
    cache = None if cache_dir is None else GenerationCache(loglikelihood_cache_path(system, cache_dir))
    for context, indices in tqdm(groups.items(), desc=desc or f"loglikelihood {system.name}", unit="context",
                                 disable=len(groups) < 2):
        context_gates = None if gates is None else gates[indices[0]:indices[0] + 1]  # [1, K]
        key = None if cache is None else loglikelihood_key(
            system.fingerprint, context, [continuations[i] for i in indices], batch_size,
            None if context_gates is None else context_gates[0].tolist())
        if key is not None and key in cache.outputs:
            values = json.loads(cache.outputs[key])
        else:
            pairs = [encode_pair(system.tokenizer, context, continuations[i]) for i in indices]
            if any(not c for _, c in pairs):
                raise TrinityXError(f"an empty continuation after context {context[-60:]!r}: nothing to score")
            values = _score_context(system, pairs[0][0], [c for _, c in pairs], batch_size, reuse, context_gates)
            if cache is not None:
                cache.append([{"key": key, "prompt": context[-200:], "output": json.dumps(values)}])
        for i, value in zip(indices, values):
            scores[i] = value
    return scores
