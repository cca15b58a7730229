"""`trinityx chat`: a terminal conversation with a MoCaE model, streamed token by token, with each answer's gates.

Commands: `/weights helpful=1,harmless=1,honest=-0.5` (fixed gate weights; missing experts weigh 0),
`/weights off` (back to the router), `/mode learned|uniform|top1`, `/reset` (forget the conversation),
`/help`, `/quit`. The core, `run_chat`, reads lines from any iterable and writes through any callable, so
it runs (and is tested) without a terminal; generation is the server's (`infer.engine.run_batch`).
"""

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from trinityx.backbones import load_backbone
from trinityx.errors import TrinityXError
from trinityx.infer.engine import Row, render_chat, run_batch, stop_token_ids
from trinityx.mocae import MoCaEModel
from trinityx.mocae.model import read_config

HELP = """commands:
  /weights helpful=1,harmless=1,honest=-0.5   fixed gate weights (missing experts weigh 0; negative negates)
  /weights off                                back to the router's gates
  /mode learned|uniform|top1                  routing mode
  /reset                                      forget the conversation
  /quit                                       leave"""


@dataclass
class ChatConfig:
    """Chat with a MoCaE model in the terminal; every answer shows the router's gates."""

    run: Path
    """A MoCaE folder (experts/, router.safetensors, mocae_config.json)."""
    backbone: str | None = None
    """Backbone (default: the one named in mocae_config.json)."""
    weights: str | None = None
    """Start with fixed gate weights, as in /weights: helpful=1,harmless=1,honest=-0.5."""
    system: str | None = None
    """A system message opening the conversation."""
    max_tokens: int = 256
    """Longest answer in tokens."""
    temperature: float = 0.0
    """0 decodes greedily; above 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling mass when sampling."""


def parse_weights(text: str, names: list[str]) -> list[float]:
    """"helpful=1,honest=-0.5" -> one weight per expert in gate order (missing experts weigh 0)."""
    weights = dict.fromkeys(names, 0.0)
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise TrinityXError(f"weights {text!r}: write name=value pairs separated by commas, names among {names}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise TrinityXError(f"weights {text!r}: {value.strip()!r} is not a number") from None
    return list(weights.values())


class ChatSession:
    """A conversation: its history and routing, answered one turn at a time by `reply`."""

    def __init__(self, model: MoCaEModel, tokenizer, prompt_format: str, max_tokens: int = 256,
                 system: str | None = None, temperature: float = 0.0, top_p: float = 1.0):
        self.model, self.tokenizer, self.prompt_format = model, tokenizer, prompt_format
        self.max_tokens, self.system, self.temperature, self.top_p = max_tokens, system, temperature, top_p
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.names = model.config.expert_names
        self.weights: list[float] | None = None
        self.gate_mode: str | None = None
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def routing(self) -> str:
        return "fixed" if self.weights is not None else self.gate_mode or self.model.config.gate_mode

    def reply(self, text: str, write: Callable[[str], None]) -> tuple[str, list[float]]:
        """Answer `text`, streaming the answer through `write` after a line with the gates."""
        messages = self.history + [{"role": "user", "content": text}]
        prompt = render_chat(self.tokenizer, self.prompt_format, messages)
        answer, gates = [], []

        def emit(event):
            if event[0] == "gates":
                gates.extend(event[1])
                shown = " ".join(f"{n}={g:.3f}" for n, g in zip(self.names, event[1]))
                write(f"[gates {shown} ({self.routing()})]\nassistant: ")
            elif event[0] == "delta":
                answer.append(event[1])
                write(event[1])

        row = Row(self.tokenizer(prompt, add_special_tokens=False).input_ids, self.max_tokens, emit,
                  temperature=self.temperature, top_p=self.top_p, weights=self.weights, gate_mode=self.gate_mode)
        run_batch(self.model, self.tokenizer, [row], self.stop_ids)
        write("\n")
        self.history = messages + [{"role": "assistant", "content": "".join(answer)}]
        return "".join(answer), gates


def run_chat(session: ChatSession, lines: Iterable[str], write: Callable[[str], None]) -> None:
    """The chat loop: read a line, run a command or answer it; stops at /quit or the end of `lines`."""
    write(f"chat with {', '.join(session.names)} mixed by the router; /help for commands\n")
    lines = iter(lines)
    while True:
        write("you> ")
        line = next(lines, None)
        if line is None:
            write("\n")
            return
        line = line.strip()
        if not line:
            continue
        command, _, arg = line.partition(" ")
        arg = arg.strip()
        if command == "/quit":
            return
        if command == "/help":
            write(HELP + "\n")
        elif command == "/reset":
            session.reset()
            write("[conversation reset]\n")
        elif command == "/weights":
            if arg == "off":
                session.weights = None
                write(f"[routing: {session.routing()}]\n")
                continue
            try:
                session.weights = parse_weights(arg, session.names)
            except TrinityXError as e:
                write(f"[error: {e}]\n")
                continue
            write(f"[fixed weights: {json.dumps(dict(zip(session.names, session.weights)))}]\n")
        elif command == "/mode":
            if arg not in ("learned", "uniform", "top1"):
                write("[error: /mode takes learned, uniform or top1]\n")
                continue
            session.gate_mode, session.weights = arg, None
            write(f"[routing: {session.routing()}]\n")
        elif command.startswith("/"):
            write(f"[unknown command {command}; /help lists them]\n")
        else:
            try:
                session.reply(line, write)
            except KeyboardInterrupt:
                write("\n[interrupted; the answer is not kept]\n")


def stdin_lines() -> Iterable[str]:
    while True:
        try:
            yield input()
        except EOFError:
            return


def chat(cfg: ChatConfig) -> None:
    """`trinityx chat`: load the MoCaE folder and talk to it on stdin/stdout."""
    run = Path(cfg.run)
    if not (run / "mocae_config.json").is_file():
        raise TrinityXError(f"--run {run} is not a MoCaE folder (no mocae_config.json)")
    if cfg.max_tokens < 1 or cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        raise TrinityXError("--max-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    backbone = load_backbone(cfg.backbone or read_config(run).backbone)
    model = MoCaEModel.from_pretrained(run, backbone.model)
    if model.config.router != "sequence":
        raise TrinityXError(f"--run {run}: chat runs sequence-routed models only (router={model.config.router!r})")
    session = ChatSession(model, backbone.tokenizer, backbone.prompt_format, cfg.max_tokens, cfg.system,
                          cfg.temperature, cfg.top_p)
    if cfg.weights:
        session.weights = parse_weights(cfg.weights, session.names)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with torch.inference_mode():
        run_chat(session, stdin_lines(), write)
