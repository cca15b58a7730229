"""The HHH datasets as typed records, with fixed splits that are disjoint by prompt.

Every loader reads the offline mirror laid out like `../shared/data` (see its README). Splits are assigned
by hashing the normalised prompt or question (`split_of`), so the same prompt lands in the same split
whatever file it appears in and whatever the row order. A user who is online can pass `source="hub"` to
read the same datasets from the Hugging Face Hub (needs the `hub` extra: `pip install trinityx[hub]`);
the same record types and the same `split_of` apply.
"""

import csv
import functools
import gzip
import hashlib
import io
import json
import os
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from trinityx.errors import TrinityXError

DIMENSIONS: tuple[str, ...] = ("helpful", "harmless", "honest")
SPLITS = ("train", "dev", "test")
ENV_VAR = "TRINITYX_DATA_DIR"
SOURCES = ("local", "hub")

SPLIT_SEED = 20261124
ALPACA_FRACTIONS = {"train": 0.8, "dev": 0.1, "test": 0.1}
PKU_FRACTIONS = {"train": 0.8, "dev": 0.1, "test": 0.1}
TRUTHFULQA_FRACTIONS = {"train": 0.5, "dev": 0.1, "test": 0.4}
# The judge_train annotations are split again, by instruction, to validate the helpfulness judge.
JUDGEMENT_FRACTIONS = {"train": 0.8, "dev": 0.2}

ALPACA_EVAL_SPLITS = ("judge_train", "eval")
ALPACA_EVAL_REFERENCES = ("gpt4_1106_preview", "text_davinci_003", "gpt4")
TRUTHFULQA_JUDGE_KINDS = ("truth", "info")

# BeaverTails' 14 harm categories, in the upstream order of BeaverTails-Evaluation (Ji et al. 2023).
SAFETY_CATEGORIES: tuple[str, ...] = (
    "animal_abuse",
    "child_abuse",
    "controversial_topics,politics",
    "discrimination,stereotype,injustice",
    "drug_abuse,weapons,banned_substance",
    "financial_crime,property_crime,theft",
    "hate_speech,offensive_language",
    "misinformation_regarding_ethics,laws_and_safety",
    "non_violent_unethical_behavior",
    "privacy_violation",
    "self_harm",
    "sexually_explicit,adult_content",
    "terrorism,organized_crime",
    "violence,aiding_and_abetting,incitement",
)

FIX_HINT = f"--data-dir (or ${ENV_VAR}) should point at a folder laid out like ../shared/data"


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str
    dimension: str


@dataclass(frozen=True)
class TruthfulQAQuestion:
    question: str
    best_answer: str
    correct_answers: tuple[str, ...]
    incorrect_answers: tuple[str, ...]
    category: str


@dataclass(frozen=True)
class MCQuestion:
    """One TruthfulQA multiple-choice question; choices keep mc_task.json's order (true answers first)."""

    question: str
    mc1_choices: tuple[str, ...]
    mc1_labels: tuple[int, ...]
    mc2_choices: tuple[str, ...]
    mc2_labels: tuple[int, ...]


@dataclass(frozen=True)
class SafetyPrompt:
    prompt: str
    category: str


@dataclass(frozen=True)
class LabelledResponse:
    prompt: str
    response: str
    unsafe: bool


@dataclass(frozen=True)
class AlpacaEvalItem:
    index: int
    instruction: str
    dataset: str
    reference: str
    generator: str


@dataclass(frozen=True)
class PairwiseJudgement:
    """A GPT-4 AlpacaEval judgement: preference 1 = output_1 preferred, 2 = output_2, soft in between."""

    instruction: str
    output_1: str
    output_2: str
    generator_1: str
    generator_2: str
    preference: float


@dataclass(frozen=True)
class JudgeExample:
    question: str
    answer: str
    label: bool


# --------------------------------------------------------------------------------------------------
# Data directory, splits and checks


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The data folder: the explicit argument, else $TRINITYX_DATA_DIR; it must exist."""
    if data_dir is None:
        data_dir = os.environ.get(ENV_VAR)
    if data_dir is None or str(data_dir) == "":
        raise TrinityXError(
            f"no data directory given: pass --data-dir or set {ENV_VAR} to a folder laid out like "
            "../shared/data (this repository's CI uses ../shared/data)"
        )
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise TrinityXError(f"data directory {path} does not exist or is not a folder; {FIX_HINT}")
    return path


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def split_of(key: str, fractions: dict[str, float], seed: int = SPLIT_SEED) -> str:
    """The split of a prompt: a sha256 hash of seed + normalised key, mapped to cumulative fractions.

    Deterministic and independent of file order, so a prompt shared by two files gets one split.
    """
    digest = hashlib.sha256(f"{seed}\n{_normalise(key)}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    cumulative = 0.0
    for name, fraction in fractions.items():
        cumulative += fraction
        if u < cumulative:
            return name
    return name  # float rounding when the fractions sum to 1 - eps


def _check_choice(what: str, value: str, allowed) -> None:
    if value not in allowed:
        raise TrinityXError(f"unknown {what} {value!r}; expected one of {', '.join(map(repr, allowed))}")


def _file(data_dir, relative: str) -> Path:
    root = resolve_data_dir(data_dir)
    path = root / relative
    if not path.is_file():
        raise TrinityXError(f"missing file: expected {relative} in {root} (looked for {path}); {FIX_HINT}")
    return path


@functools.lru_cache(maxsize=None)
def _read_json(path: Path):
    """Parse a JSON file once per process (callers must not mutate the result)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TrinityXError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}; fix or replace the file"
        ) from None
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def _not_utf8(path: Path, e: UnicodeDecodeError, where: str = "") -> TrinityXError:
    return TrinityXError(f"{path}: {where}not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                         "re-save the file as UTF-8 or replace it")


@functools.lru_cache(maxsize=None)
def _read_jsonl(path: Path) -> tuple[tuple[int, object], ...]:
    """Parse a JSON-lines file (optionally .gz) once per process: (1-based line, row) pairs."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rb") as f:
        try:
            lines = f.read().splitlines()
        except (EOFError, OSError, zlib.error) as e:  # a truncated or damaged .gz file
            raise TrinityXError(f"{path}: the compressed file is truncated or damaged ({e}); download or copy it "
                                "again") from None
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_number, json.loads(line.decode("utf-8"))))
        except json.JSONDecodeError as e:
            raise TrinityXError(
                f"{path}: line {line_number}: malformed JSON line ({e.msg}); fix or remove that line"
            ) from None
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e, f"line {line_number}: ") from None
    return tuple(rows)


def _json_rows(path: Path) -> list[tuple[str, object]]:
    """A JSON array file as (where, row) pairs, `where` naming the 0-based array index."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise TrinityXError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    return [(f"index {i}", row) for i, row in enumerate(data)]


def _require(row, keys: dict[str, type], path: Path, where: str) -> None:
    """Check that `row` is an object with each key of the given type; one clear error otherwise."""
    if not isinstance(row, dict):
        raise TrinityXError(f"{path}: {where}: expected an object with keys {', '.join(keys)}, "
                            f"got {type(row).__name__}; fix that row")
    for key, kind in keys.items():
        if key not in row:
            raise TrinityXError(f"{path}: {where}: missing key {key!r} (expected keys: {', '.join(keys)}); "
                                "fix that row or use the upstream file")
        value = row[key]
        # bool is an int in Python; a preference of `true` is still a wrong type.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise TrinityXError(f"{path}: {where}: key {key!r} should be {expected}, "
                                f"got {type(value).__name__}; fix that row")


def _nonempty(records: list, path: Path, split: str) -> list:
    if not records:
        raise TrinityXError(f"{path}: split {split!r} is empty; the file has no rows in that split "
                            f"(is it the full file? {FIX_HINT})")
    return records


def _hub(name: str, config: str | None = None, split: str = "train"):
    """A Hugging Face dataset split; `datasets` is the optional `hub` extra."""
    try:
        import datasets
    except ImportError:
        raise TrinityXError(
            f"source='hub' needs the `datasets` package: pip install 'trinityx[hub]'; or use "
            f"source='local' with {FIX_HINT}"
        ) from None
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown config, no access: all the same fix for the user
        raise TrinityXError(
            f"could not load {name} ({config}) from the Hugging Face Hub: {e}; if this machine is offline "
            f"use source='local' with {FIX_HINT}"
        ) from e


# --------------------------------------------------------------------------------------------------
# Supervised fine-tuning data, one dimension at a time

ALPACA_FILE = "alpaca/alpaca_gpt4_demo.json"
PKU_SFT_FILE = "pku_saferlhf/safe_sft.json"
PKU_PAIRS_FILE = "pku_saferlhf/safe_unsafe_pairs.json"
TRUTHFULQA_FILE = "truthfulqa/TruthfulQA.csv"
TRUTHFULQA_MC_FILE = "truthfulqa/mc_task.json"
BEAVERTAILS_EVAL_FILE = "beavertails/beavertails_evaluation_140.json"
ALPACA_EVAL_SPLIT_FILE = "alpaca_eval/split.json"
JUDGEMENTS_FILE = "alpaca_eval/judge_train_annotations.jsonl.gz"


def _alpaca_prompt(instruction: str, input_: str) -> str:
    return f"{instruction}\n\n{input_}" if input_ else instruction


def _helpful_rows(data_dir, source: str) -> tuple[Path | str, list[tuple[str, str]]]:
    if source == "hub":
        rows = _hub("vicgalle/alpaca-gpt4")
        return "vicgalle/alpaca-gpt4", [(_alpaca_prompt(r["instruction"], r["input"]), r["output"]) for r in rows]
    path = _file(data_dir, ALPACA_FILE)
    pairs = []
    for where, row in _json_rows(path):
        _require(row, {"instruction": str, "input": str, "output": str}, path, where)
        pairs.append((_alpaca_prompt(row["instruction"], row["input"]), row["output"]))
    return path, pairs


def _beavertails_train_file(data_dir) -> Path | None:
    """A user-supplied BeaverTails training file, `beavertails/beavertails_train*.json[l]`, if any."""
    found = sorted(p for p in (resolve_data_dir(data_dir) / "beavertails").glob("beavertails_train*")
                   if p.name.endswith((".json", ".jsonl")))
    if len(found) > 1:
        raise TrinityXError(f"several BeaverTails training files: {', '.join(map(str, found))}; keep one")
    return found[0] if found else None


def _harmless_rows(data_dir, source: str) -> tuple[Path | str, list[tuple[str, str]]]:
    if source == "hub":
        pairs = []
        for r in _hub("PKU-Alignment/PKU-SafeRLHF"):
            pairs += [(r["prompt"], r[f"response_{i}"]) for i in (0, 1) if r[f"is_response_{i}_safe"]]
        return "PKU-Alignment/PKU-SafeRLHF", pairs
    path = _beavertails_train_file(data_dir)
    if path is not None:
        rows = _json_rows(path) if path.suffix == ".json" else [(f"line {n}", r) for n, r in _read_jsonl(path)]
        for where, row in rows:
            _require(row, {"prompt": str, "response": str, "is_safe": bool}, path, where)
        return path, [(row["prompt"], row["response"]) for _, row in rows if row["is_safe"]]
    path = _file(data_dir, PKU_SFT_FILE)
    pairs = []
    for where, row in _json_rows(path):
        _require(row, {"prompt": str, "response": str}, path, where)
        pairs.append((row["prompt"], row["response"]))
    return path, pairs


def _honest_pairs(questions: list[TruthfulQAQuestion]) -> list[tuple[str, str]]:
    """One (question, answer) per best answer and per other correct answer, deduplicated per question."""
    pairs = []
    for q in questions:
        seen = set()
        for answer in (q.best_answer, *q.correct_answers):
            if _normalise(answer) not in seen:
                seen.add(_normalise(answer))
                pairs.append((q.question, answer))
    return pairs


def load_sft(dimension: str, data_dir, split: str, source: str = "local") -> list[SFTExample]:
    """One dimension's supervised fine-tuning examples of `split`.

    - helpful: Alpaca-GPT4; the prompt is the instruction, plus "\\n\\n" and the input when there is one.
    - harmless: PKU-SafeRLHF responses labelled safe (`pku_saferlhf/safe_sft.json`). If the data folder
      holds a real BeaverTails training file, `beavertails/beavertails_train*.json` or `.jsonl` with rows
      `{prompt, response, is_safe}`, its `is_safe` rows are used instead.
    - honest: TruthfulQA questions of `split`, one example per best answer and per other correct answer.
    """
    _check_choice("dimension", dimension, DIMENSIONS)
    _check_choice("split", split, SPLITS)
    _check_choice("source", source, SOURCES)
    if dimension == "honest":
        questions = load_truthfulqa(data_dir, split, source)
        origin, pairs, fractions = TRUTHFULQA_FILE, _honest_pairs(questions), TRUTHFULQA_FRACTIONS
    elif dimension == "helpful":
        origin, pairs = _helpful_rows(data_dir, source)
        fractions = ALPACA_FRACTIONS
    else:
        origin, pairs = _harmless_rows(data_dir, source)
        fractions = PKU_FRACTIONS
    examples = [SFTExample(p, r, dimension) for p, r in pairs if split_of(p, fractions) == split]
    return _nonempty(examples, origin, split)


# --------------------------------------------------------------------------------------------------
# TruthfulQA


@functools.lru_cache(maxsize=None)
def _truthfulqa_rows(path: Path) -> list[TruthfulQAQuestion]:
    columns = ("Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers")
    # utf-8-sig strips the BOM that upstream puts before the first header ("Type").
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise TrinityXError(f"{path}: line 1 (header): missing column(s) {', '.join(map(repr, missing))}; "
                                f"expected the upstream TruthfulQA.csv header")
        questions = []
        for row in reader:
            for column in ("Question", "Best Answer"):
                if not (row[column] or "").strip():
                    raise TrinityXError(f"{path}: line {reader.line_num}: column {column!r} is empty; fix that row")
            questions.append(TruthfulQAQuestion(
                question=row["Question"].strip(),
                best_answer=row["Best Answer"].strip(),
                correct_answers=tuple(a.strip() for a in (row["Correct Answers"] or "").split(";") if a.strip()),
                incorrect_answers=tuple(a.strip() for a in (row["Incorrect Answers"] or "").split(";") if a.strip()),
                category=row["Category"],
            ))
    return questions


def load_truthfulqa(data_dir, split: str, source: str = "local") -> list[TruthfulQAQuestion]:
    """TruthfulQA generation questions of `split` (by question, TRUTHFULQA_FRACTIONS)."""
    _check_choice("split", split, SPLITS)
    _check_choice("source", source, SOURCES)
    if source == "hub":
        origin = "truthfulqa/truthful_qa (generation)"
        questions = [
            TruthfulQAQuestion(r["question"], r["best_answer"], tuple(r["correct_answers"]),
                               tuple(r["incorrect_answers"]), r["category"])
            for r in _hub("truthfulqa/truthful_qa", "generation", "validation")
        ]
    else:
        origin = _file(data_dir, TRUTHFULQA_FILE)
        questions = _truthfulqa_rows(origin)
    chosen = [q for q in questions if split_of(q.question, TRUTHFULQA_FRACTIONS) == split]
    return _nonempty(chosen, origin, split)


def _mc_targets(row, key: str, path: Path, where: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    targets = row[key]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v in (0, 1) for v in targets.values()):
        raise TrinityXError(f"{path}: {where}: key {key!r} should map each answer to 0 or 1; fix that row")
    return tuple(targets), tuple(targets.values())


def load_truthfulqa_mc(data_dir, split: str, source: str = "local") -> list[MCQuestion]:
    """TruthfulQA multiple choice (MC1, MC2) of `split`, split by question like TruthfulQA.csv.

    Locally, every question must also be in TruthfulQA.csv (by normalised text), so that the two files
    cannot drift apart and leak training questions into the test split.
    """
    _check_choice("split", split, SPLITS)
    _check_choice("source", source, SOURCES)
    if source == "hub":
        origin = "truthfulqa/truthful_qa (multiple_choice)"
        questions = [
            MCQuestion(r["question"], tuple(r["mc1_targets"]["choices"]), tuple(r["mc1_targets"]["labels"]),
                       tuple(r["mc2_targets"]["choices"]), tuple(r["mc2_targets"]["labels"]))
            for r in _hub("truthfulqa/truthful_qa", "multiple_choice", "validation")
        ]
    else:
        origin = _file(data_dir, TRUTHFULQA_MC_FILE)
        known = {_normalise(q.question) for q in _truthfulqa_rows(_file(data_dir, TRUTHFULQA_FILE))}
        questions = []
        for where, row in _json_rows(origin):
            _require(row, {"question": str, "mc1_targets": dict, "mc2_targets": dict}, origin, where)
            if _normalise(row["question"]) not in known:
                raise TrinityXError(f"{origin}: {where}: key 'question' {row['question']!r} is not in "
                                    f"{TRUTHFULQA_FILE}; use the matching upstream files")
            questions.append(MCQuestion(row["question"].strip(), *_mc_targets(row, "mc1_targets", origin, where),
                                        *_mc_targets(row, "mc2_targets", origin, where)))
    chosen = [q for q in questions if split_of(q.question, TRUTHFULQA_FRACTIONS) == split]
    return _nonempty(chosen, origin, split)


_JUDGE_PROMPT = re.compile(r"Q: (?P<question>.*?)\nA: (?P<answer>.*)\n(?P<tag>True|Helpful):", re.DOTALL)
_JUDGE_TAGS = {"truth": "True", "info": "Helpful"}
_JUDGE_LABELS = {" yes": True, " no": False}


def load_judge_examples(kind: str, data_dir, split: str) -> list[JudgeExample]:
    """TruthfulQA's GPT-judge ("truth") or GPT-info ("info") training data of `split`.

    Each row is `{"prompt": "Q: ...\\nA: ...\\nTrue:" (or "Helpful:"), "completion": " yes" | " no"}`. The
    split is the TruthfulQA split of the row's question, so a judge never trains on a test question.
    Local only: upstream ships these files on GitHub, not on the Hub.
    """
    _check_choice("kind", kind, TRUTHFULQA_JUDGE_KINDS)
    _check_choice("split", split, SPLITS)
    path = _file(data_dir, f"truthfulqa/finetune_{kind}.jsonl")
    examples = []
    for line_number, row in _read_jsonl(path):
        where = f"line {line_number}"
        _require(row, {"prompt": str, "completion": str}, path, where)
        match = _JUDGE_PROMPT.fullmatch(row["prompt"])
        if match is None or match["tag"] != _JUDGE_TAGS[kind]:
            raise TrinityXError(f"{path}: {where}: key 'prompt' should read "
                                f"'Q: ...\\nA: ...\\n{_JUDGE_TAGS[kind]}:'; fix that row")
        if row["completion"] not in _JUDGE_LABELS:
            raise TrinityXError(f"{path}: {where}: key 'completion' should be ' yes' or ' no', "
                                f"got {row['completion']!r}; fix that row")
        if split_of(match["question"], TRUTHFULQA_FRACTIONS) == split:
            examples.append(JudgeExample(match["question"], match["answer"], _JUDGE_LABELS[row["completion"]]))
    return _nonempty(examples, path, split)


# --------------------------------------------------------------------------------------------------
# Harmlessness


def load_safety_prompts(data_dir, source: str = "local") -> list[SafetyPrompt]:
    """BeaverTails-Evaluation prompts, for evaluation only (no split).

    The local file has no category column: it holds the same number of prompts per category, in the
    order of SAFETY_CATEGORIES (10 each in the 140-prompt file).
    """
    _check_choice("source", source, SOURCES)
    if source == "hub":
        rows = _hub("PKU-Alignment/BeaverTails-Evaluation", None, "test")
        return [SafetyPrompt(r["prompt"], r["category"]) for r in rows]
    path = _file(data_dir, BEAVERTAILS_EVAL_FILE)
    rows = _json_rows(path)
    for where, row in rows:
        _require(row, {"prompt": str}, path, where)
    if not rows or len(rows) % len(SAFETY_CATEGORIES):
        raise TrinityXError(f"{path}: {len(rows)} prompts cannot be {len(SAFETY_CATEGORIES)} equal categories; "
                            "use the upstream file (10 prompts per category)")
    per_category = len(rows) // len(SAFETY_CATEGORIES)
    return [SafetyPrompt(row["prompt"], SAFETY_CATEGORIES[i // per_category]) for i, (_, row) in enumerate(rows)]


def load_labelled_responses(data_dir, split: str, source: str = "local") -> list[LabelledResponse]:
    """Safe and unsafe responses for the harm classifier, split by prompt with PKU_FRACTIONS.

    Locally: each pair of safe_unsafe_pairs.json gives `response[0]` (safe) and `response[1]` (unsafe),
    then each row of safe_sft.json gives one safe response. split_of is shared with load_sft("harmless"),
    so a prompt in both files has one split.
    """
    _check_choice("split", split, SPLITS)
    _check_choice("source", source, SOURCES)
    if source == "hub":
        origin = "PKU-Alignment/PKU-SafeRLHF"
        records = [LabelledResponse(r["prompt"], r[f"response_{i}"], not r[f"is_response_{i}_safe"])
                   for r in _hub(origin) for i in (0, 1)]
    else:
        origin = _file(data_dir, PKU_PAIRS_FILE)
        records = []
        for where, row in _json_rows(origin):
            _require(row, {"prompt": str, "response": list}, origin, where)
            if len(row["response"]) != 2 or not all(isinstance(r, str) for r in row["response"]):
                raise TrinityXError(f"{origin}: {where}: key 'response' should be [safe, unsafe] strings; "
                                    "fix that row")
            safe, unsafe = row["response"]
            records += [LabelledResponse(row["prompt"], safe, False), LabelledResponse(row["prompt"], unsafe, True)]
        sft_path = _file(data_dir, PKU_SFT_FILE)
        for where, row in _json_rows(sft_path):
            _require(row, {"prompt": str, "response": str}, sft_path, where)
            records.append(LabelledResponse(row["prompt"], row["response"], False))
    chosen = [r for r in records if split_of(r.prompt, PKU_FRACTIONS) == split]
    return _nonempty(chosen, origin, split)


# --------------------------------------------------------------------------------------------------
# AlpacaEval

# Hub config (and generator filter) that holds each reference's outputs, in alpaca_eval's 805-prompt order.
_ALPACA_EVAL_HUB = {
    "text_davinci_003": ("alpaca_eval", None),
    "gpt4_1106_preview": ("alpaca_eval_gpt4_baseline", None),
    "gpt4": ("alpaca_eval_all_outputs", "gpt4"),
}


@functools.lru_cache(maxsize=None)
def _alpaca_eval_split(path: Path) -> dict[str, tuple[int, ...]]:
    data = _read_json(path)
    _require(data, {name: list for name in ALPACA_EVAL_SPLITS}, path, "top level")
    split = {}
    for name in ALPACA_EVAL_SPLITS:
        bad = [i for i in data[name] if not isinstance(i, int) or isinstance(i, bool) or i < 0]
        if bad:
            raise TrinityXError(f"{path}: key {name!r}: {bad[0]!r} is not a prompt index; fix the file")
        split[name] = tuple(data[name])
    shared = set(split["judge_train"]) & set(split["eval"])
    if shared:
        raise TrinityXError(f"{path}: index {min(shared)} is in both 'judge_train' and 'eval'; the split must "
                            "be disjoint, use the upstream file")
    return split


def load_alpaca_eval(data_dir, split: str = "eval", reference: str = "gpt4_1106_preview",
                     source: str = "local") -> list[AlpacaEvalItem]:
    """AlpacaEval prompts of `split` ("judge_train" or "eval", by index from split.json) with a reference.

    split.json is this project's and is not on the Hub, so source="hub" still reads it from the data folder.
    """
    _check_choice("AlpacaEval split", split, ALPACA_EVAL_SPLITS)
    _check_choice("reference", reference, ALPACA_EVAL_REFERENCES)
    _check_choice("source", source, SOURCES)
    split_path = _file(data_dir, ALPACA_EVAL_SPLIT_FILE)
    indices = _alpaca_eval_split(split_path)[split]
    if source == "hub":
        config, generator = _ALPACA_EVAL_HUB[reference]
        origin = f"tatsu-lab/alpaca_eval ({config})"
        rows = [(f"index {i}", r) for i, r in enumerate(
            r for r in _hub("tatsu-lab/alpaca_eval", config, "eval") if generator in (None, r["generator"]))]
    else:
        origin = _file(data_dir, f"alpaca_eval/reference_{reference}.json")
        rows = _json_rows(origin)
    items = []
    for index in sorted(indices):
        if index >= len(rows):
            raise TrinityXError(f"{split_path}: index {index} is past the end of {origin} ({len(rows)} prompts); "
                                "use the matching upstream files")
        where, row = rows[index]
        _require(row, {"instruction": str, "dataset": str, "output": str, "generator": str}, origin, where)
        items.append(AlpacaEvalItem(index, row["instruction"], row["dataset"], row["output"], row["generator"]))
    return _nonempty(items, split_path, split)


def load_judgements(data_dir, split: str) -> list[PairwiseJudgement]:
    """GPT-4 AlpacaEval judgements on judge_train prompts, split "train"/"dev" by instruction.

    Raises if any row's instruction is an `eval` prompt of split.json: a judge trained on it would have
    seen the prompts it scores. Local only: the file is this project's extract of alpaca_eval's results.
    """
    _check_choice("judgement split", split, tuple(JUDGEMENT_FRACTIONS))
    path = _file(data_dir, JUDGEMENTS_FILE)
    eval_prompts = {_normalise(item.instruction) for item in load_alpaca_eval(data_dir, "eval")}
    keys = {"instruction": str, "output_1": str, "output_2": str, "generator_1": str, "generator_2": str,
            "preference": (int, float)}
    judgements = []
    for line_number, row in _read_jsonl(path):
        where = f"line {line_number}"
        _require(row, keys, path, where)
        if _normalise(row["instruction"]) in eval_prompts:
            raise TrinityXError(f"{path}: {where}: key 'instruction' is an 'eval' prompt of {ALPACA_EVAL_SPLIT_FILE}; "
                                "judge training data must only cover 'judge_train' prompts, remove those rows")
        if not 1 <= row["preference"] <= 2:
            raise TrinityXError(f"{path}: {where}: key 'preference' should be in [1, 2], got {row['preference']}; "
                                "fix that row")
        if split_of(row["instruction"], JUDGEMENT_FRACTIONS) == split:
            judgements.append(PairwiseJudgement(row["instruction"], row["output_1"], row["output_2"],
                                                row["generator_1"], row["generator_2"], float(row["preference"])))
    return _nonempty(judgements, path, split)


# --------------------------------------------------------------------------------------------------
# The mixture


def load_mixture(data_dir, split: str, per_dimension: int | None = None, seed: int = 0,
                 source: str = "local") -> list[SFTExample]:
    """The mixed HHH data of `split`: each dimension's load_sft, in DIMENSIONS order.

    With `per_dimension`, each dimension is subsampled (seeded, without replacement) to at most that many.
    The example's `dimension` is the router's gating label.
    """
    if per_dimension is not None and per_dimension < 1:
        raise TrinityXError(f"per_dimension must be a positive number of examples, got {per_dimension}")
    rng = random.Random(seed)
    mixture = []
    for dimension in DIMENSIONS:
        examples = load_sft(dimension, data_dir, split, source)
        if per_dimension is not None and len(examples) > per_dimension:
            examples = rng.sample(examples, per_dimension)
        mixture += examples
    return mixture


# --------------------------------------------------------------------------------------------------
# Routing data: prompts labelled by dimension (docs/design.md, "routing data")

ROUTING_SPLIT_SEED = 20261201
ROUTING_FRACTIONS = {"train": 0.8, "dev": 0.1, "test": 0.1}
# Built-in routing sources: name -> the dimension its prompts ask for. None of them holds an evaluation item.
ROUTING_SOURCES: dict[str, str] = {
    "alpaca": "helpful",                   # the helpful expert's Alpaca instructions (every split)
    "alpaca_eval_judge_train": "helpful",  # AlpacaEval's judge_train instructions (the eval split is never used)
    "pku_saferlhf": "harmless",            # PKU-SafeRLHF prompts of both files
    "truthfulqa": "honest",                # TruthfulQA train and dev questions (test questions are evaluation items)
}


@dataclass(frozen=True)
class RoutingPrompt:
    prompt: str
    dimension: str
    source: str


# Each evaluation set and the dimension it asks for.
EVALUATION_SETS = {"alpaca_eval": "helpful", "beavertails": "harmless", "truthfulqa": "honest"}


def evaluation_requests(data_dir) -> dict[str, list[str]]:
    """Every evaluation item's request as a user writes it, per set: AlpacaEval eval instructions,
    BeaverTails-Evaluation prompts, TruthfulQA test questions (without the QA primer the MC and generation
    prompts put before them)."""
    return {"alpaca_eval": [it.instruction for it in load_alpaca_eval(data_dir, "eval")],
            "beavertails": [p.prompt for p in load_safety_prompts(data_dir)],
            "truthfulqa": [q.question for q in load_truthfulqa(data_dir, "test")]}


def evaluation_prompts(data_dir) -> set[str]:
    """The normalised text of every evaluation item (AlpacaEval eval, BeaverTails-Evaluation, TruthfulQA test)."""
    return {_normalise(t) for texts in evaluation_requests(data_dir).values() for t in texts}


def _routing_source(name: str, data_dir) -> list[str]:
    if name == "alpaca":
        return [e.prompt for split in SPLITS for e in load_sft("helpful", data_dir, split)]
    if name == "alpaca_eval_judge_train":
        return [it.instruction for it in load_alpaca_eval(data_dir, "judge_train")]
    if name == "pku_saferlhf":
        return ([e.prompt for split in SPLITS for e in load_sft("harmless", data_dir, split)]
                + [r.prompt for split in SPLITS for r in load_labelled_responses(data_dir, split)])
    return [q.question for split in ("train", "dev") for q in load_truthfulqa(data_dir, split)]


def _routing_file(path: Path, dimensions, evaluation: set[str]) -> list[RoutingPrompt]:
    """A user's `{prompt, dimension}` rows (a JSON array or JSON lines), checked row by row."""
    if not path.is_file():
        raise TrinityXError(f"routing file {path} does not exist; give a JSON or JSON-lines file of "
                            "{\"prompt\": ..., \"dimension\": ...} rows")
    rows = list(_read_jsonl(path)) if path.suffix in (".jsonl", ".gz") else _json_rows(path)
    if not rows:
        raise TrinityXError(f"routing file {path} has no rows; add {{prompt, dimension}} rows or drop the file")
    prompts = []
    for where, row in rows:
        where = f"line {where}" if isinstance(where, int) else where
        _require(row, {"prompt": str, "dimension": str}, path, where)
        if row["dimension"] not in dimensions:
            raise TrinityXError(f"{path}: {where}: dimension {row['dimension']!r} is not one of the router's "
                                f"dimensions {', '.join(dimensions)}; fix that row")
        if not row["prompt"].strip():
            raise TrinityXError(f"{path}: {where}: the prompt is empty; fix or remove that row")
        if _normalise(row["prompt"]) in evaluation:
            raise TrinityXError(f"{path}: {where}: the prompt is an evaluation item (AlpacaEval eval, "
                                "BeaverTails-Evaluation or TruthfulQA test); a router must never learn from the "
                                "items it is evaluated on: remove that row")
        prompts.append(RoutingPrompt(row["prompt"], row["dimension"], str(path)))
    return prompts


def load_routing_prompts(data_dir, split: str, sources: tuple[str, ...] = tuple(ROUTING_SOURCES),
                         files: tuple[str | Path, ...] = (), dimensions: tuple[str, ...] = DIMENSIONS,
                         ) -> tuple[list[RoutingPrompt], dict]:
    """Distinct labelled prompts of routing split `split` from the built-in `sources` and the user's `files`.

    A prompt's routing split is a hash of its text (ROUTING_FRACTIONS, ROUTING_SPLIT_SEED), whatever source it
    comes from. A prompt labelled with two dimensions is dropped (it teaches nothing); a built-in prompt that is
    also an evaluation item is dropped too, and a user's file holding one is an error. Returns the prompts and
    a record {source: count, "dropped_evaluation_items": n, "dropped_ambiguous": n}.
    """
    _check_choice("routing split", split, SPLITS)
    unknown = [s for s in sources if s not in ROUTING_SOURCES]
    if unknown:
        raise TrinityXError(f"unknown routing source(s) {unknown}; choose from {', '.join(ROUTING_SOURCES)}")
    evaluation = evaluation_prompts(data_dir)
    found: list[RoutingPrompt] = []
    dropped_eval = 0
    for name in sources:
        if ROUTING_SOURCES[name] not in dimensions:
            continue
        for text in _routing_source(name, data_dir):
            if _normalise(text) in evaluation:
                dropped_eval += 1
                continue
            found.append(RoutingPrompt(text, ROUTING_SOURCES[name], name))
    for file in files:
        found += _routing_file(Path(file).expanduser(), dimensions, evaluation)
    labels: dict[str, set[str]] = {}
    for p in found:
        labels.setdefault(_normalise(p.prompt), set()).add(p.dimension)
    chosen, seen = [], set()
    for p in found:
        key = _normalise(p.prompt)
        if key in seen or len(labels[key]) > 1 or split_of(p.prompt, ROUTING_FRACTIONS, ROUTING_SPLIT_SEED) != split:
            continue
        seen.add(key)
        chosen.append(p)
    if not chosen:
        raise TrinityXError(f"no routing prompts in split {split!r} from sources {list(sources)} and files "
                            f"{[str(f) for f in files]}; add sources or files")
    record = {source: sum(p.source == source for p in chosen) for source in dict.fromkeys(p.source for p in chosen)}
    record.update({"dropped_evaluation_items": dropped_eval,
                   "dropped_ambiguous": sum(len(v) > 1 for v in labels.values())})
    return chosen, record
