"""The decode engine of `trinityx serve` and `trinityx chat`: rows of prompts decoded together on a MoCaE model.

One worker thread owns the model and runs micro-batches: it takes the first queued request, waits up to
`--batch-wait-ms` for more (up to `--max-batch-size`), left-pads them into one batch and decodes them together
with a KV cache. Each row has its own gates (sequence routing: K*R rank-space scales per row, applied between
the experts' two batched products, `mocae/layer.py`), its own sampling settings, token budget and stop strings;
a row that finishes leaves the batch at once (its cache rows and gates are dropped), so a short answer never waits for a
long one, and a request that arrives while a batch decodes joins it between two decode steps (prefilled on its
own, its cache rows appended; continuous batching, as vLLM and TGI do), so it never waits for a long answer
either. A client that disconnects stops its row at the next step. Left padding with position ids that skip
the pads makes a row's greedy answer the same in any batch up to float rounding: padding changes the shapes of
the products, so on a real model a near-tie between two tokens can flip (3 of 8 prompts of
`benchmarks/greedy_answers.py` under HF `generate`; 0 of 32 in `bench serve`).

Legend: B batch (active rows), T tokens, K experts, V vocabulary.
"""

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from trinityx.backbones import PLAIN_TEMPLATE
from trinityx.mocae import MoCaEModel
from trinityx.mocae.model import positions
from trinityx.mocae.router import gates_from_logits


# --- generation core (shared with `trinityx chat`) -------------------------------------------------------------


@dataclass
class Row:
    """One prompt to answer, with its own settings; events go to `emit` (called from the worker thread).

    Events: ("gates", [K] floats), ("delta", text), ("done", finish_reason, completion_tokens),
    ("error", status, message, code).
    """

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]
    temperature: float | None = None
    """None or 0: greedy."""
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    weights: list[float] | None = None
    """Fixed gate weights (one per expert) instead of the router."""
    gate_mode: str | None = None
    """`learned`, `uniform` or `top1` instead of the model's configured gate mode."""
    cancelled: bool = False
    """Set by the owner (client gone, shutdown): the row leaves the batch at the next step."""
    generator: torch.Generator | None = field(default=None, repr=False)


class TextTracker:
    """Incremental detokenisation with stop strings: `add(token)` returns the new text that is safe to send.

    Text that could still become a stop string, or ends in an incomplete UTF-8 character, is held back, so
    the streamed deltas concatenate exactly to the final answer, which ends before the first stop string.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; returns (delta to send, whether a stop string was reached)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self.flush(), True
        safe = len(self.text)
        while safe > self.sent and self.text[safe - 1] == "\ufffd":
            safe -= 1
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        delta, self.sent = self.text[self.sent:max(safe, self.sent)], max(safe, self.sent)
        return delta, False

    def flush(self) -> str:
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


def row_gates(model: MoCaEModel, gate_logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Gates [B, K] of each row: the model's configured gating, or the row's own override."""
    gates = model.gates(gate_logits).clone()  # [B, K]
    for i, row in enumerate(rows):
        if row.weights is not None:
            gates[i] = torch.tensor(row.weights, dtype=gates.dtype)
        elif row.gate_mode is not None:
            gates[i] = gates_from_logits(gate_logits[i:i + 1], row.gate_mode, model.config.temperature)[0]
    return gates


def next_tokens(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """Greedy argmax per row, or temperature / top-p (nucleus, Holtzman et al. 2020) sampling: [B, V] -> B ids."""
    chosen = logits.argmax(-1).tolist()  # [B]
    for i, row in enumerate(rows):
        if not row.temperature:
            continue
        probs = torch.softmax(logits[i].float() / row.temperature, -1)  # [V]
        if row.top_p is not None and row.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= row.top_p  # keep the smallest set with mass >= top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        chosen[i] = torch.multinomial(probs, 1, generator=row.generator).item()
    return chosen


def prefill(model: MoCaEModel, tokenizer, rows: list[Row], forward) -> tuple[DynamicCache, torch.Tensor,
                                                                              torch.Tensor, torch.Tensor]:
    """Route `rows` and prefill them as one left-padded batch: (KV cache, mask [B, T], gates [B, K], logits [B, V]).

    Leaves each row's gates set on the mixture layers, ready for the decode steps."""
    pad = tokenizer.pad_token_id
    longest = max(len(r.prompt_ids) for r in rows)
    ids = torch.tensor([[pad] * (longest - len(r.prompt_ids)) + r.prompt_ids for r in rows])  # [B, T]
    mask = torch.tensor([[0] * (longest - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows])  # [B, T]
    for row in rows:
        if row.temperature and row.seed is not None:
            row.generator = torch.Generator().manual_seed(row.seed)
    model.clear_gates()  # the routing pass reads the bare backbone, whatever gates a running batch has set
    gates = row_gates(model, model.route(ids, mask), rows)  # [B, K]
    for row, g in zip(rows, gates):
        row.emit(("gates", g.tolist()))
    cache = DynamicCache(config=model.backbone.config)
    model.set_gates(gates)
    out = forward(input_ids=ids, attention_mask=mask, position_ids=positions(mask), past_key_values=cache,
                  use_cache=True, logits_to_keep=1)
    return cache, mask, gates, out.logits[:, -1, :]


def joinable(model: MoCaEModel) -> bool:
    """Whether new rows can join a running batch: every cache layer a growing one (`stack_caches` knows how to
    append to both kinds HF builds for our backbones: the plain layer and Gemma 3's sliding-window layer)."""
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer)
               for layer in DynamicCache(config=model.backbone.config).layers)


def stack_caches(cache: DynamicCache, mask: torch.Tensor, new: DynamicCache, new_mask: torch.Tensor) -> torch.Tensor:
    """Append the rows of `new` to `cache` (KV [B, H, T, D] per layer), left-padding the shorter batch with masked
    zeros, as the prefill pads a short prompt; returns the joint mask [B + B', T]. Positions come from the mask, so
    the padding changes no row's answer.

    A sliding-window layer (Gemma 3) keeps only the last W - 1 positions of its batch and counts every position it
    has seen (`cumulative_length`, from which HF places the window on the mask). Both batches' kept positions are
    the last ones of the joint timeline, so left-padding each to the longer kept length lines them up, and the
    joint layer has seen as many positions as the joint mask is long."""
    T = max(mask.shape[1], new_mask.shape[1])

    def left(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
        pad = [0, 0] * (-dim - 1) + [length - x.shape[dim], 0]
        return torch.nn.functional.pad(x, pad)

    for layer, other in zip(cache.layers, new.layers):
        kept = max(layer.keys.shape[-2], other.keys.shape[-2])  # T for a plain layer, min(T, W - 1) for a sliding one
        layer.keys = torch.cat([left(layer.keys, -2, kept), left(other.keys, -2, kept)])
        layer.values = torch.cat([left(layer.values, -2, kept), left(other.values, -2, kept)])
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = T
    return torch.cat([left(mask, -1, T), left(new_mask, -1, T)])


@torch.inference_mode()
def run_batch(model: MoCaEModel, tokenizer, rows: list[Row], stop_ids: set[int], forward=None,
              join: Callable[[list[Row]], list[Row]] | None = None,
              on_step: Callable[[int, float], None] | None = None,
              on_prefill: Callable[[int, float], None] | None = None) -> None:
    """Answer `rows` together: route, prefill a left-padded batch, then decode token by token with a KV cache.

    `forward` is the backbone call (default `model.backbone`); each row's events go to its `emit`. Between two
    decode steps, `join(running rows)` hands over rows that arrived since: they are prefilled on their
    own and their cache rows join the batch's (continuous batching, as vLLM and TGI do), so a long answer never
    holds a new request back. `on_step(rows, seconds)` is told how many rows each decode step ran and how long its
    forward pass took, `on_prefill(rows, seconds)` the same of each prefill (routing included), so a server can
    say where its time goes.
    """
    forward = forward or model.backbone

    def timed_prefill(batch: list[Row]):
        start = time.perf_counter()
        out = prefill(model, tokenizer, batch, forward)
        if on_prefill is not None:
            on_prefill(len(batch), time.perf_counter() - start)
        return out

    cache, mask, gates, logits = timed_prefill(rows)
    active = list(rows)
    trackers = [TextTracker(tokenizer, row.stop) for row in rows]
    try:
        while True:
            chosen = next_tokens(logits, active)  # [B]
            keep = []
            for j, (row, tracker) in enumerate(zip(active, trackers)):
                if row.cancelled:
                    continue
                if chosen[j] in stop_ids:
                    row.emit(("delta", tracker.flush()))
                    row.emit(("done", "stop", len(tracker.ids)))
                    continue
                delta, stopped = tracker.add(chosen[j])
                if delta:
                    row.emit(("delta", delta))
                if stopped or len(tracker.ids) >= row.max_tokens:
                    row.emit(("delta", tracker.flush()))
                    row.emit(("done", "stop" if stopped else "length", len(tracker.ids)))
                    continue
                keep.append(j)
            newcomers = join([active[j] for j in keep]) if join is not None else []
            if not keep and not newcomers:
                return
            if keep:
                tokens = torch.tensor([chosen[j] for j in keep])[:, None]  # [B, 1]
                if len(keep) < len(active):  # finished rows leave the batch: drop their cache rows and gates
                    index = torch.tensor(keep)
                    cache.batch_select_indices(index)
                    mask, gates = mask[index], gates[index]
                    active, trackers = [active[j] for j in keep], [trackers[j] for j in keep]
                    model.set_gates(gates)
                mask = torch.cat([mask, torch.ones(len(active), 1, dtype=mask.dtype)], dim=1)  # [B, T + 1]
                start = time.perf_counter()
                logits = forward(input_ids=tokens, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                                 past_key_values=cache, use_cache=True).logits[:, -1, :]  # [B, V]
                if on_step is not None:
                    on_step(len(active), time.perf_counter() - start)
            if newcomers:
                new_cache, new_mask, new_gates, new_logits = timed_prefill(newcomers)
                if keep:
                    mask = stack_caches(cache, mask, new_cache, new_mask)
                    gates, logits = torch.cat([gates, new_gates]), torch.cat([logits, new_logits])
                    active, trackers = active + newcomers, trackers + [TextTracker(tokenizer, r.stop) for r in newcomers]
                else:
                    cache, mask, gates, logits = new_cache, new_mask, new_gates, new_logits
                    active, trackers = list(newcomers), [TextTracker(tokenizer, r.stop) for r in newcomers]
                model.set_gates(gates)
    finally:
        model.clear_gates()


def stop_token_ids(model: MoCaEModel, tokenizer) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the generation config's (which may list several)."""
    ids = {tokenizer.eos_token_id}
    eos = model.backbone.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


def render_chat(tokenizer, prompt_format: str, messages: list[dict]) -> str:
    """Messages [{role, content}] -> the text before the answer: the chat template, or the plain format per turn."""
    if prompt_format == "chat":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Base models: system text first, then "### Instruction / ### Response" turns (backbones.PLAIN_TEMPLATE);
    # one user message gives exactly `format_prompt(tokenizer, "plain", prompt)`.
    text = ""
    for m in messages:
        if m["role"] in ("system", "developer"):
            text += m["content"] + "\n\n"
        elif m["role"] == "user":
            text += PLAIN_TEMPLATE.format(prompt=m["content"])
        else:
            text += m["content"] + "\n\n"
    return text


# --- the batching engine -------------------------------------------------------------------------------------


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class Engine:
    """A queue of rows and one worker thread that runs them in micro-batches on the model."""

    def __init__(self, model: MoCaEModel, tokenizer, prompt_format: str, max_batch_size: int = 8,
                 batch_wait_ms: float = 5.0, max_queue: int = 64, join_ratio: float = 0.0, join_wait_steps: int = 0):
        self.model, self.tokenizer, self.prompt_format = model, tokenizer, prompt_format
        self.max_batch_size, self.batch_wait, self.max_queue = max_batch_size, batch_wait_ms / 1000, max_queue
        # When queued rows join a running batch (TGI's waiting_served_ratio and max_waiting_tokens): once they are
        # at least `join_ratio` x the running rows, or fill every free slot, or have waited `join_wait_steps`
        # decode steps. A prefill holds every running row back, and one prefill of several rows costs less a row
        # than several of one, so waiting a few steps for company trades a newcomer's first token for throughput.
        self.join_ratio, self.join_wait_steps, self.join_waited = join_ratio, join_wait_steps, 0
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.forward = model.backbone  # the backbone call (tests wrap it to make a slow model)
        self.joins = joinable(model)
        self.pending: deque[Row] = deque()
        self.running: list[Row] = []
        self.cond = threading.Condition()
        self.closed = False
        self.batches = 0
        # Decode steps and prefills run, the rows they ran together (summed) and the seconds they took.
        self.decode_steps, self.decoded_rows, self.decode_seconds = 0, 0, 0.0
        self.prefills, self.prefilled_rows, self.prefill_seconds = 0, 0, 0.0
        self.thread = threading.Thread(target=self._work, name="trinityx-engine", daemon=True)

    def start(self) -> "Engine":
        self.thread.start()
        return self

    def submit(self, row: Row) -> None:
        with self.cond:
            if self.closed:
                raise ShuttingDown()
            if len(self.pending) >= self.max_queue:
                raise QueueFull()
            self.pending.append(row)
            self.cond.notify()

    def stats(self) -> dict:
        with self.cond:
            return {"queued": len(self.pending), "running": len(self.running), "batches": self.batches,
                    "decode_steps": self.decode_steps, "decoded_rows": self.decoded_rows,
                    "decode_seconds": self.decode_seconds, "prefills": self.prefills,
                    "prefilled_rows": self.prefilled_rows, "prefill_seconds": self.prefill_seconds}

    def _count_step(self, rows: int, seconds: float) -> None:
        with self.cond:
            self.decode_steps += 1
            self.decoded_rows += rows
            self.decode_seconds += seconds

    def _count_prefill(self, rows: int, seconds: float) -> None:
        with self.cond:
            self.prefills += 1
            self.prefilled_rows += rows
            self.prefill_seconds += seconds

    def _take_batch(self) -> list[Row] | None:
        with self.cond:
            while not self.pending and not self.closed:
                self.cond.wait()
            if self.closed:
                return None
            deadline = time.monotonic() + self.batch_wait
            while len(self.pending) < self.max_batch_size and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            batch = [self.pending.popleft() for _ in range(min(self.max_batch_size, len(self.pending)))]
            self.join_waited = 0
            self.running = [r for r in batch if not r.cancelled]
            return list(self.running)

    def _join(self, running: list[Row]) -> list[Row]:
        """Rows queued since the batch started, as many as fit beside its `running` rows."""
        with self.cond:
            rows, free = [], self.max_batch_size - len(running)
            if self.joins and not self.closed and self.pending and free > 0:
                self.join_waited += 1
                waiting = min(free, len(self.pending))
                if (waiting == free or waiting >= self.join_ratio * len(running)
                        or self.join_waited > self.join_wait_steps):
                    rows = [r for r in (self.pending.popleft() for _ in range(waiting)) if not r.cancelled]
                    self.join_waited = 0
            elif not self.pending:
                self.join_waited = 0
            self.running = running + rows
            return rows

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            try:
                run_batch(self.model, self.tokenizer, batch, self.stop_ids, self.forward, self._join,
                          self._count_step, self._count_prefill)
            except Exception as e:  # a failed batch answers its requests with a 500; the server keeps serving
                traceback.print_exc()
                with self.cond:
                    batch = list(self.running)  # with the rows that joined it
                for row in batch:
                    row.emit(("error", 500, f"generation failed: {type(e).__name__}: {e}", "generation_failed"))
            with self.cond:
                self.running = []
                self.batches += 1

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new rows, cancel the queued ones (503) and the running ones, and join the worker."""
        with self.cond:
            self.closed = True
            for row in self.pending:
                row.emit(("error", 503, "the server is shutting down", "shutting_down"))
            self.pending.clear()
            for row in self.running:
                row.cancelled = True
                row.emit(("error", 503, "the server is shutting down", "shutting_down"))
            self.cond.notify_all()
        self.thread.join(timeout)
