"""Judges: the models that score generated text on one HHH axis, each with its measured validity.

`judge` is the interface every judge shares (`Judge`, its kinds and axes, scoring helpers), `local` the offline
judges, `remote` the plug-in ones (OpenAI-compatible endpoints, Hugging Face classifiers), `features` the
feature-based heads, `train` their training and validity, `cli` the `train-judges` command.
"""

from trinityx.eval.judges.judge import (
    AXIS_OF_KIND,
    KINDS,
    Judge,
    Scores,
    alpaca_preference,
    flags,
    references_of,
    score_answers,
)
from trinityx.eval.judges.local import load_judge, minilm_path
from trinityx.eval.judges.remote import (
    BEAVER_DAM_CATEGORIES,
    allenai_judge,
    beaver_dam_judge,
    hf_classifier_judge,
    make_judge,
    openai_judge,
)
from trinityx.eval.judges.train import (
    auroc,
    length_rule_agreement,
    pairwise_agreement,
    train_judges,
    validate_judge,
)

__all__ = [
    "AXIS_OF_KIND", "BEAVER_DAM_CATEGORIES", "KINDS", "Judge", "Scores", "alpaca_preference", "allenai_judge",
    "auroc", "beaver_dam_judge", "flags", "hf_classifier_judge", "length_rule_agreement", "load_judge",
    "make_judge", "minilm_path", "openai_judge", "pairwise_agreement", "references_of", "score_answers", "train_judges",
    "validate_judge",
]
