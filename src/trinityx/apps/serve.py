"""`trinityx serve`: an OpenAI-compatible HTTP server for a MoCaE folder, with the router's gates in every answer.

Routes: `POST /v1/chat/completions` and `POST /v1/completions` (streamed as server-sent events or not),
`GET /v1/models`, `GET /health`. Every answer carries `"trinityx": {"gates": {name: g_k}, "routing": mode}`;
a request may override the routing with the extra body field `"trinityx": {"weights": {name: w}}` (fixed
weights, negative values negate an expert; missing names weigh 0) or `{"gate_mode": "top1" | "uniform" |
"learned"}`, within the server's `--max-abs-weight`.

How requests run: the HTTP handlers only validate, tokenise and queue; the decode engine
(`trinityx.infer.engine`) runs them in micro-batches with continuous batching, each row with its own gates.
"""

import asyncio
import hmac
import json
import math
import os
import threading
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trinityx.backbones import context_error, load_backbone
from trinityx.errors import TrinityXError
from trinityx.infer.engine import Engine, QueueFull, Row, ShuttingDown, render_chat
from trinityx.mocae import MoCaEModel
from trinityx.mocae.model import read_config

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    """Serve a MoCaE folder over an OpenAI-compatible HTTP API (chat and text completions, streaming)."""

    run: Path
    """A MoCaE folder (experts/, router.safetensors, mocae_config.json) as `trinityx fit-router` writes."""
    host: str = "127.0.0.1"
    """Address to bind; loopback by default. Set an API key before binding anything else."""
    port: int = 8000
    """TCP port."""
    backbone: str | None = None
    """Backbone (default: the one named in mocae_config.json)."""
    model_name: str | None = None
    """Model id served on /v1/models and expected in requests (default: the run folder's name)."""
    max_batch_size: int = 8
    """Most requests decoded together in one micro-batch (1 = one request at a time)."""
    batch_wait_ms: float = 5.0
    """How long the worker waits for more requests after the first one before starting a batch."""
    max_queue: int = 64
    """Most requests waiting for the worker; past it the server answers 503 with Retry-After."""
    join_ratio: float = 0.0
    """Queued requests join a running batch once they are at least this many times its rows (or fill it);
    0 joins each at the next decode step. Like TGI's --waiting-served-ratio: one prefill of several requests
    costs less a request than several of one, so a little waiting buys throughput (docs/serving.md)."""
    join_wait_steps: int = 0
    """...or once they have waited this many decode steps (TGI's --max-waiting-tokens)."""
    max_prompt_tokens: int = 2048
    """Longest prompt in tokens (after the chat template); longer prompts get a 400."""
    max_tokens: int = 512
    """Largest `max_tokens` a request may ask for; more gets a 400."""
    default_max_tokens: int = 256
    """`max_tokens` of a request that does not give one."""
    max_abs_weight: float = 2.0
    """Largest |weight| a request's fixed routing weights may have."""
    allow_routing_override: bool = True
    """Let requests override the routing with the `trinityx` body field."""
    api_key_env: str = "TRINITYX_API_KEY"
    """Environment variable holding the API key; when it is set, every route but /health needs it."""
    allow_keyless_remote: bool = False
    """Serve on a --host other than loopback without an API key (anyone who reaches the port can generate)."""
    allow_origins: tuple[str, ...] = ()
    """Origins (e.g. http://localhost:3000) whose web pages may call the API; a request with another Origin
    header (a page in the user's browser) gets a 403."""
    max_body_bytes: int = 1_000_000
    """Largest request body; more gets a 413."""
    retry_after: int = 1
    """Seconds sent in the Retry-After header of a 503 (queue full)."""
    shutdown_timeout: int = 30
    """Seconds in-flight requests get to finish on shutdown (Ctrl-C) before they are cancelled."""
    threads: int | None = None
    """torch threads (default: torch's choice)."""


def check_config(cfg: ServeConfig) -> None:
    """Validate the server's limits in one place; the error names the flag."""
    for flag, value, low in (("--max-batch-size", cfg.max_batch_size, 1), ("--max-queue", cfg.max_queue, 1),
                             ("--max-prompt-tokens", cfg.max_prompt_tokens, 1), ("--max-tokens", cfg.max_tokens, 1),
                             ("--default-max-tokens", cfg.default_max_tokens, 1),
                             ("--max-body-bytes", cfg.max_body_bytes, 1), ("--retry-after", cfg.retry_after, 0),
                             ("--shutdown-timeout", cfg.shutdown_timeout, 0), ("--port", cfg.port, 0)):
        if value < low:
            raise TrinityXError(f"{flag}={value} must be >= {low}")
    if cfg.port > 65535:
        raise TrinityXError(f"--port={cfg.port} is not a TCP port: give 0 (any free port) to 65535")
    key = os.environ.get(cfg.api_key_env)
    if cfg.host not in LOOPBACK and not key and not cfg.allow_keyless_remote:
        raise TrinityXError(f"--host {cfg.host} serves beyond this machine, and ${cfg.api_key_env} holds no API key: "
                            f"set it (every request then needs `Authorization: Bearer <key>`), or pass "
                            "--allow-keyless-remote to serve without one")
    if cfg.default_max_tokens > cfg.max_tokens:
        raise TrinityXError(f"--default-max-tokens={cfg.default_max_tokens} is above --max-tokens={cfg.max_tokens}")
    if cfg.max_abs_weight < 0:
        raise TrinityXError(f"--max-abs-weight={cfg.max_abs_weight} must be >= 0")
    if cfg.batch_wait_ms < 0:
        raise TrinityXError(f"--batch-wait-ms={cfg.batch_wait_ms} must be >= 0")
    if cfg.join_ratio < 0 or cfg.join_wait_steps < 0:
        raise TrinityXError(f"--join-ratio={cfg.join_ratio} and --join-wait-steps={cfg.join_wait_steps} must be >= 0")


# --- HTTP: request schemas and OpenAI-style errors ------------------------------------------------------------


class APIError(Exception):
    """An OpenAI-style error answer: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    # Unknown fields and wrong types are errors (no silent coercion of "5" to 5).
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class RoutingOverride(Strict):
    weights: dict[str, float] | None = None
    """Fixed gate weights by expert name (missing experts weigh 0; negative values negate an expert)."""
    gate_mode: Literal["learned", "uniform", "top1"] | None = None

    @model_validator(mode="after")
    def one_of(self):
        if (self.weights is None) == (self.gate_mode is None):
            raise ValueError("give exactly one of `weights` or `gate_mode`")
        return self


class StreamOptions(Strict):
    include_usage: bool = False


class CommonRequest(Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    trinityx: RoutingOverride | None = None
    """TrinityX's extra field: override the routing of this request."""

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop", code="invalid_value")
        return tuple(stop)


class ChatRequest(CommonRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(CommonRequest):
    prompt: str = Field(min_length=1)


def validation_error(e: ValidationError) -> APIError:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return APIError(422, f"unknown field {param!r}: this server does not support it", param, "unknown_field")
    if first["type"] == "missing":
        return APIError(422, f"missing required field {param!r}", param, "missing_field")
    if first["type"] == "string_unicode":  # as make_row answers a lone surrogate that reached it
        return APIError(400, f"{param} is not valid Unicode text: {first['msg']}", param, "invalid_value")
    got = json.dumps(first.get("input"), default=str)[:80]
    return APIError(422, f"{param}: {first['msg']} (got {got})", param, "invalid_value")


# --- HTTP: the app -----------------------------------------------------------------------------------------


@dataclass
class Served:
    """What the HTTP layer needs: the engine, the served model's id, and the server's limits."""

    engine: Engine
    name: str
    cfg: ServeConfig
    api_key: str | None = None


def build_app(served: Served):
    """The FastAPI app; the engine's worker starts and stops with the app's lifespan."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    engine, cfg = served.engine, served.cfg
    names = engine.model.config.expert_names
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        if not engine.thread.is_alive():
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="TrinityX", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if cfg.allow_origins:  # answer the browsers' preflight requests of the allowed origins
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                     code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        traceback.print_exception(e)
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type="server_error",
                                     code="internal_error").body(), status_code=500)

    def authorise(request: Request) -> None:
        # A page in the user's browser can send requests to a local server (cross-site request forgery, or DNS
        # rebinding through the Host header): refuse other origins, and other hosts on a loopback server.
        origin = request.headers.get("origin")
        if origin is not None and origin not in cfg.allow_origins:
            raise APIError(403, f"cross-origin request from {origin} refused; start the server with "
                           f"--allow-origins {origin} to allow it", code="origin_not_allowed")
        host = urlsplit("//" + request.headers.get("host", "")).hostname
        if cfg.host in LOOPBACK and host not in LOOPBACK:
            raise APIError(403, f"Host {host!r} refused: this server listens on loopback only", code="host_not_allowed")
        if served.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), served.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    async def parse(request: Request, schema):
        authorise(request)
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise APIError(415, f"Content-Type is {media_type or 'missing'!r}; send the body as application/json",
                           code="unsupported_media_type")
        body = await request.body()
        if len(body) > cfg.max_body_bytes:
            raise APIError(413, f"request body is {len(body)} bytes, above the limit of {cfg.max_body_bytes}",
                           code="body_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model != served.name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {served.name!r}",
                           param="model", code="model_not_found")
        return req

    def make_row(req: CommonRequest, text: str, add_special_tokens: bool) -> Row:
        param = "messages" if isinstance(req, ChatRequest) else "prompt"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON allows "\ud800", a lone surrogate no tokenizer can read
            raise APIError(400, f"{param} is not valid Unicode text: {e.reason} at character {e.start}", param=param,
                           code="invalid_value") from None
        prompt_ids = engine.tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        max_tokens = req.max_completion_tokens or req.max_tokens or cfg.default_max_tokens
        if max_tokens > cfg.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {cfg.max_tokens}",
                           param="max_tokens", code="invalid_value")
        if len(prompt_ids) > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens, above this server's limit of "
                           f"{cfg.max_prompt_tokens}", param="messages", code="context_length_exceeded")
        too_long = context_error(len(prompt_ids), max_tokens, engine.model.backbone)
        if too_long:
            raise APIError(400, f"{too_long}; shorten the prompt or lower max_tokens", param="max_tokens",
                           code="context_length_exceeded")
        row = Row(prompt_ids, max_tokens, emit=lambda event: None, temperature=req.temperature, top_p=req.top_p,
                  seed=req.seed, stop=req.stop_strings())
        if req.trinityx is not None:
            if not cfg.allow_routing_override:
                raise APIError(400, "this server does not allow routing overrides", param="trinityx",
                               code="routing_override_disabled")
            if req.trinityx.weights is not None:
                unknown = sorted(set(req.trinityx.weights) - set(names))
                if unknown:
                    raise APIError(400, f"unknown experts {unknown} in trinityx.weights; the experts are {names}",
                                   param="trinityx.weights", code="invalid_value")
                for n, w in req.trinityx.weights.items():
                    if not math.isfinite(w):
                        raise APIError(400, f"trinityx.weights.{n}={w}: a weight must be a finite number",
                                       param=f"trinityx.weights.{n}", code="invalid_value")
                    if abs(w) > cfg.max_abs_weight:
                        raise APIError(400, f"trinityx.weights.{n}={w}: |weight| is above this server's limit of "
                                       f"{cfg.max_abs_weight}", param=f"trinityx.weights.{n}", code="weight_out_of_range")
                row.weights = [float(req.trinityx.weights.get(n, 0.0)) for n in names]
            else:
                row.gate_mode = req.trinityx.gate_mode
        return row

    def routing_name(row: Row) -> str:
        return "fixed" if row.weights is not None else row.gate_mode or engine.model.config.gate_mode

    def submit(row: Row) -> asyncio.Queue:
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        row.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        try:
            engine.submit(row)
        except QueueFull:
            raise APIError(503, f"the server is busy ({cfg.max_queue} requests queued); retry later",
                           type="server_error", code="queue_full",
                           headers={"Retry-After": str(cfg.retry_after)}) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
        return events

    async def cancel_on_disconnect(request: Request, row: Row) -> None:
        # The body has been read, so the next ASGI message is the client's disconnect (or the answer's end):
        # a client that gave up stops its row at the next decode step instead of holding a batch slot.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        row.cancelled = True

    async def answer(request: Request, req: CommonRequest, row: Row, chat: bool):
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        events = submit(row)
        gates: dict[str, float] = {}

        def extra() -> dict:
            return {"trinityx": {"gates": gates, "routing": routing_name(row)}}

        def usage(completion_tokens: int) -> dict:
            return {"prompt_tokens": len(row.prompt_ids), "completion_tokens": completion_tokens,
                    "total_tokens": len(row.prompt_ids) + completion_tokens}

        if not req.stream:
            text = []
            watcher = asyncio.create_task(cancel_on_disconnect(request, row))
            try:
                while True:
                    event = await events.get()
                    if event[0] == "gates":
                        gates.update(zip(names, event[1]))
                    elif event[0] == "delta":
                        text.append(event[1])
                    elif event[0] == "error":
                        raise APIError(event[1], event[2], type="server_error", code=event[3])
                    else:
                        finish, n_tokens = event[1], event[2]
                        break
            finally:
                watcher.cancel()
                row.cancelled = True  # no-op once done; stops the row if this handler is cancelled
            content = "".join(text)
            choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                       "finish_reason": finish} if chat else
                      {"index": 0, "text": content, "logprobs": None, "finish_reason": finish})
            return JSONResponse({"id": rid, "object": kind, "created": int(time.time()), "model": served.name,
                                 "choices": [choice], "usage": usage(n_tokens), **extra()})

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                body = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            payload = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": int(time.time()),
                       "model": served.name, "choices": [choice], **extra()}
            return f"data: {json.dumps(payload)}\n\n"

        async def stream():
            try:
                while True:
                    event = await events.get()
                    if event[0] == "gates":
                        gates.update(zip(names, event[1]))
                        if chat:
                            yield chunk("", None, first=True)
                    elif event[0] == "delta":
                        if event[1]:
                            yield chunk(event[1], None)
                    elif event[0] == "error":
                        yield f"data: {json.dumps(APIError(event[1], event[2], code=event[3], type='server_error').body())}\n\n"
                        return
                    else:
                        yield chunk(None, event[1])
                        if req.stream_options is not None and req.stream_options.include_usage:
                            yield f"data: {json.dumps({'id': rid, 'object': kind + ('.chunk' if chat else ''), 'created': int(time.time()), 'model': served.name, 'choices': [], 'usage': usage(event[2]), **extra()})}\n\n"
                        yield "data: [DONE]\n\n"
                        return
            finally:
                row.cancelled = True  # the client went away or the answer is complete

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, **engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        authorise(request)
        card = {"id": served.name, "object": "model", "created": created, "owned_by": "trinityx",
                "trinityx": {"experts": names, "backbone": engine.model.config.backbone,
                             "router": engine.model.config.router, "gate_mode": engine.model.config.gate_mode}}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatRequest)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if not any(m["role"] == "user" for m in messages):
            raise APIError(400, "messages has no user message", param="messages", code="invalid_value")
        text = render_chat(engine.tokenizer, engine.prompt_format, messages)
        return await answer(request, req, make_row(req, text, add_special_tokens=False), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        return await answer(request, req, make_row(req, req.prompt, add_special_tokens=True), chat=False)

    return app


# --- running it ----------------------------------------------------------------------------------------------


def load_served(cfg: ServeConfig, model: MoCaEModel | None = None, backbone=None) -> Served:
    """Load the MoCaE folder (or take a loaded model and its backbone) and build the engine."""
    check_config(cfg)
    run = Path(cfg.run)
    if not (run / "mocae_config.json").is_file():
        raise TrinityXError(f"--run {run} is not a MoCaE folder (no mocae_config.json); create it with "
                            "`trinityx fit-router`")
    if backbone is None:
        backbone = load_backbone(cfg.backbone or read_config(run).backbone)
    if model is None:
        model = MoCaEModel.from_pretrained(run, backbone.model)
    if model.config.router != "sequence":
        raise TrinityXError(f"--run {run}: router={model.config.router!r}; `serve` batches sequence-routed models "
                            "only (per-row folded gates); use `trinityx generate` for token routing")
    engine = Engine(model, backbone.tokenizer, backbone.prompt_format, cfg.max_batch_size, cfg.batch_wait_ms,
                    cfg.max_queue, cfg.join_ratio, cfg.join_wait_steps)
    key = os.environ.get(cfg.api_key_env) or None
    return Served(engine, cfg.model_name or run.resolve().name, cfg, key)


class ServerThread:
    """Run a uvicorn server for `app` in a background thread (tests, benchmarks): `with ServerThread(app) as url:`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: int = 5):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=shutdown_timeout))
        self.thread = threading.Thread(target=self.server.run, name="trinityx-uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped before it started (port in use?)")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def serve(cfg: ServeConfig) -> None:
    """`trinityx serve`: load the MoCaE folder and serve it until Ctrl-C (in-flight requests finish first)."""
    import uvicorn

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    served = load_served(cfg)
    if served.api_key is None and cfg.host not in LOOPBACK:
        print(f"warning: serving on {cfg.host} without an API key; set ${cfg.api_key_env} to require one")
    print(f"serving {served.name} ({', '.join(served.engine.model.config.expert_names)}) on "
          f"http://{cfg.host}:{cfg.port}/v1 (API key {'required' if served.api_key else 'off'})")
    uvicorn.run(build_app(served), host=cfg.host, port=cfg.port, timeout_graceful_shutdown=cfg.shutdown_timeout,
                log_level="info")
