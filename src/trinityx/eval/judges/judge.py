"""Judges: the models that score generated text on one HHH axis, each with its measured validity.

One interface for every judge, local or remote (a judge is one `Judge` value, made by a function):

- `harm`: `judge.score(prompts, responses)` -> probability that each response is unsafe;
  flagged = p >= judge.threshold.
- `truth` / `info`: `judge.score(questions, answers)` -> probability that each answer is true / informative.
  A judge with `uses_references` also reads each question's (correct, incorrect) reference answers; call
  `score_answers(judge, questions, answers, references)`, which passes them to the judges that read them.
- `helpful` (pairwise): `judge.prefer(instructions, outputs_a, outputs_b)` -> probability that b is
  preferred over a; `alpaca_preference(p)` maps it to AlpacaEval's convention (1 = a, 2 = b).

A score is None when a remote judge failed on that item (endpoint down, unparseable answer); each failure
is appended to `judge.failures` so callers report the count instead of scoring it as 0.

Every judge carries `validity` (metric -> value on held-out data, with `n`, `split` and `threshold`);
docs/design.md: "a score from a judge whose validity is unknown is not a result".
"""

from collections.abc import Callable
from dataclasses import dataclass, field

KINDS = ("harm", "truth", "info", "helpful")
# The axis each judge kind serves (docs/design.md, evaluation table).
AXIS_OF_KIND = {"harm": "harmless", "truth": "honest", "info": "honest", "helpful": "helpful"}

Scores = list[float | None]


@dataclass
class Judge:
    """A judge: what it is (name, kind), how far to trust it (validity, threshold), and what it computes."""

    name: str
    kind: str  # one of KINDS
    threshold: float  # a probability >= threshold counts as unsafe / true / informative / b preferred
    validity: dict  # {"split", "n", "accuracy", ...} measured on held-out data; {} when unmeasured
    score: Callable[[list[str], list[str]], Scores] | None = None  # harm, truth, info
    prefer: Callable[[list[str], list[str], list[str]], Scores] | None = None  # helpful
    failures: list[str] = field(default_factory=list)  # one line per failed item, for reporting
    config: dict = field(default_factory=dict)  # how it was built or trained (JSON-able)
    uses_references: bool = False  # truth/info: score(questions, answers, references) (TruthfulQA's answers)


def references_of(question) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(correct, incorrect) reference answers of a TruthfulQA question (data.TruthfulQAQuestion); best first."""
    return tuple(dict.fromkeys((question.best_answer, *question.correct_answers))), tuple(question.incorrect_answers)


def score_answers(judge: Judge, questions: list[str], answers: list[str],
                  references: list[tuple[tuple[str, ...], tuple[str, ...]]]) -> Scores:
    """A truth/info judge's scores; references[i] = (correct, incorrect) answers of question i.

    Only a judge that reads references gets them, so plugged-in judges keep their two-argument score.
    """
    if judge.uses_references:
        return judge.score(questions, answers, references)
    return judge.score(questions, answers)


def flags(judge: Judge, probabilities: Scores) -> list[bool | None]:
    """p >= threshold (unsafe / true / informative / b preferred); None stays None (a failed item)."""
    return [None if p is None else p >= judge.threshold for p in probabilities]


def alpaca_preference(p_b: Scores) -> Scores:
    """P(b preferred) -> AlpacaEval preference in [1, 2] (1 = output_1 = a preferred, 2 = output_2 = b)."""
    return [None if p is None else 1.0 + p for p in p_b]
