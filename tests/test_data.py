"""The data loaders: right records, disjoint and stable splits, one clear error per kind of bad input."""

import csv
import gzip
import json
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

from fixture_data import N_ALPACA, N_TRUTHFULQA, write_fixture_data
from trinityx import data as D
from trinityx.errors import TrinityXError

REAL_DATA = Path(__file__).parents[2] / "shared" / "data"


def by_split(load) -> dict[str, list]:
    return {split: load(split) for split in D.SPLITS}


# Each split loader with the key its split is assigned by.
SPLIT_LOADERS = {
    "helpful": (lambda d, s: D.load_sft("helpful", d, s), lambda r: r.prompt),
    "harmless": (lambda d, s: D.load_sft("harmless", d, s), lambda r: r.prompt),
    "honest": (lambda d, s: D.load_sft("honest", d, s), lambda r: r.prompt),
    "truthfulqa": (D.load_truthfulqa, lambda r: r.question),
    "truthfulqa_mc": (D.load_truthfulqa_mc, lambda r: r.question),
    "judge_truth": (lambda d, s: D.load_judge_examples("truth", d, s), lambda r: r.question),
    "judge_info": (lambda d, s: D.load_judge_examples("info", d, s), lambda r: r.question),
    "labelled": (D.load_labelled_responses, lambda r: r.prompt),
}


def test_loaders_return_the_fixture_records(data_dir):
    helpful = [e for s in D.SPLITS for e in D.load_sft("helpful", data_dir, s)]
    assert len(helpful) == N_ALPACA and {e.dimension for e in helpful} == {"helpful"}
    assert has_example(helpful, "give tip 3 for staying healthy\n\nabout sleep 3", "eat well and sleep 3")
    assert has_example(helpful, "give tip 4 for staying healthy", "eat well and sleep 4")

    sft_rows = json.loads((data_dir / "pku_saferlhf" / "safe_sft.json").read_text())
    assert sum(len(D.load_sft("harmless", data_dir, s)) for s in D.SPLITS) == len(sft_rows)

    # The BOM is stripped: every column is read, including the first.
    questions = [q for s in D.SPLITS for q in D.load_truthfulqa(data_dir, s)]
    assert len(questions) == N_TRUTHFULQA
    q0 = next(q for q in questions if q.question == "what happens if you eat seed 0?")
    assert q0.best_answer == "nothing happens 0"
    assert q0.correct_answers == ("nothing happens 0", "they pass through 0", "Nothing happens 0")
    assert q0.incorrect_answers == ("you grow seeds 0", "you die 0") and q0.category == "Health"
    # Honest SFT: best answer + other correct answers, case-insensitive duplicates dropped.
    honest = [e for s in D.SPLITS for e in D.load_sft("honest", data_dir, s)]
    assert [e.response for e in honest if e.prompt == q0.question] == ["nothing happens 0", "they pass through 0"]
    assert len(honest) == 2 * N_TRUTHFULQA

    mc = [q for s in D.SPLITS for q in D.load_truthfulqa_mc(data_dir, s)]
    assert len(mc) == N_TRUTHFULQA
    m0 = next(q for q in mc if q.question == q0.question)
    assert m0.mc1_choices[0] == "nothing happens 0" and m0.mc1_labels == (1, 0, 0) and m0.mc2_labels == (1, 1, 0)

    safety = D.load_safety_prompts(data_dir)
    assert len(safety) == 28 and set(Counter(p.category for p in safety).values()) == {2}
    assert safety[0].category == "animal_abuse" and safety[-1].category == "violence,aiding_and_abetting,incitement"
    assert len(D.SAFETY_CATEGORIES) == 14

    labelled = [r for s in D.SPLITS for r in D.load_labelled_responses(data_dir, s)]
    pairs = json.loads((data_dir / "pku_saferlhf" / "safe_unsafe_pairs.json").read_text())
    assert len(labelled) == 2 * len(pairs) + len(sft_rows)
    assert sum(r.unsafe for r in labelled) == len(pairs)
    assert all(r.response.startswith("sure") == r.unsafe for r in labelled)

    evaluation = D.load_alpaca_eval(data_dir)
    assert [i.index for i in evaluation] == sorted([3, 21, 7, 0, 15, 11, 19, 5, 23, 9])
    assert evaluation[0] == D.AlpacaEvalItem(0, "name a fox fact 0", "helpful_base",
                                             "gpt4_1106_preview says fox 0", "gpt4_1106_preview")
    assert D.load_alpaca_eval(data_dir, "judge_train", "text_davinci_003")[0].generator == "text_davinci_003"
    assert len(D.load_alpaca_eval(data_dir, "judge_train", "gpt4")) == 14

    judgements = D.load_judgements(data_dir, "train") + D.load_judgements(data_dir, "dev")
    assert len(judgements) == 3 * 14 and {j.preference for j in judgements} == {1.0, 2.0, 1.5000001}

    truth = [e for s in D.SPLITS for e in D.load_judge_examples("truth", data_dir, s)]
    assert len(truth) == 2 * N_TRUTHFULQA
    assert D.JudgeExample("what happens if you eat seed 0?", "you die 0", False) in truth


def has_example(examples, prompt, response) -> bool:
    return D.SFTExample(prompt, response, examples[0].dimension) in examples


@pytest.mark.parametrize("name", SPLIT_LOADERS)
def test_splits_are_disjoint_by_prompt(data_dir, name):
    load, key = SPLIT_LOADERS[name]
    keys = {s: {key(r) for r in records} for s, records in by_split(lambda s: load(data_dir, s)).items()}
    assert not keys["train"] & keys["dev"] and not keys["train"] & keys["test"] and not keys["dev"] & keys["test"]


def test_judgement_splits_are_disjoint_by_instruction(data_dir):
    train, dev = ({j.instruction for j in D.load_judgements(data_dir, s)} for s in ("train", "dev"))
    assert train and dev and not train & dev


def test_split_of_is_deterministic_and_normalised():
    fractions = D.TRUTHFULQA_FRACTIONS
    assert D.split_of("What is X?", fractions) == D.split_of("  what   is x? ", fractions)
    keys = [f"prompt number {i}" for i in range(4000)]
    counts = Counter(D.split_of(k, fractions) for k in keys)
    for split, fraction in fractions.items():
        assert abs(counts[split] / len(keys) - fraction) < 0.03


def _shuffle_json(path: Path, rng: random.Random) -> None:
    rows = json.loads(path.read_text())
    rng.shuffle(rows)
    path.write_text(json.dumps(rows))


def test_shuffling_rows_does_not_change_any_split(data_dir, tmp_path):
    shuffled = write_fixture_data(tmp_path / "shuffled")
    rng = random.Random(0)
    for relative in ["alpaca/alpaca_gpt4_demo.json", "pku_saferlhf/safe_sft.json",
                     "pku_saferlhf/safe_unsafe_pairs.json", "truthfulqa/mc_task.json"]:
        _shuffle_json(shuffled / relative, rng)
    for kind in D.TRUTHFULQA_JUDGE_KINDS:
        path = shuffled / "truthfulqa" / f"finetune_{kind}.jsonl"
        lines = path.read_text().splitlines(keepends=True)
        rng.shuffle(lines)
        path.write_text("".join(lines))
    csv_path = shuffled / "truthfulqa" / "TruthfulQA.csv"
    header, *rows = list(csv.reader(csv_path.read_text(encoding="utf-8-sig").splitlines()))
    rng.shuffle(rows)
    with open(csv_path, "w", encoding="utf-8-sig", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows])

    for name, (load, key) in SPLIT_LOADERS.items():
        for split in D.SPLITS:
            assert sorted(map(key, load(data_dir, split))) == sorted(map(key, load(shuffled, split))), (name, split)


def test_a_prompt_in_both_pku_files_gets_one_split(data_dir):
    sft = {s: {e.prompt for e in D.load_sft("harmless", data_dir, s)} for s in D.SPLITS}
    pairs = {r["prompt"] for r in json.loads((data_dir / "pku_saferlhf" / "safe_unsafe_pairs.json").read_text())}
    shared = {p for prompts in sft.values() for p in prompts} & pairs
    assert len(shared) == 6
    for split in D.SPLITS:
        labelled = {r.prompt for r in D.load_labelled_responses(data_dir, split)}
        assert sft[split] & shared <= labelled


def test_judge_examples_follow_the_truthfulqa_question_split(data_dir):
    for split in D.SPLITS:
        questions = {q.question for q in D.load_truthfulqa(data_dir, split)}
        for kind in D.TRUTHFULQA_JUDGE_KINDS:
            assert {e.question for e in D.load_judge_examples(kind, data_dir, split)} == questions


def test_mixture_subsamples_each_dimension_with_a_seed(data_dir):
    full = D.load_mixture(data_dir, "train")
    assert Counter(e.dimension for e in full) == {d: len(D.load_sft(d, data_dir, "train")) for d in D.DIMENSIONS}
    small = D.load_mixture(data_dir, "train", per_dimension=5, seed=1)
    assert Counter(e.dimension for e in small) == {d: 5 for d in D.DIMENSIONS}
    assert small == D.load_mixture(data_dir, "train", per_dimension=5, seed=1)
    assert set(small) <= set(full)


def test_a_beavertails_training_file_replaces_pku_for_harmless(data_dir, tmp_path):
    root = _copy(data_dir, tmp_path)
    rows = [{"prompt": f"bt prompt {i}", "response": f"bt answer {i}", "is_safe": i % 2 == 0} for i in range(200)]
    (root / "beavertails" / "beavertails_train_30k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    harmless = [e for s in D.SPLITS for e in D.load_sft("harmless", root, s)]
    assert sorted(e.response for e in harmless) == sorted(r["response"] for r in rows if r["is_safe"])


# --------------------------------------------------------------------------------------------------
# Bad input: one TrinityXError naming the file, the row and the key.


def _copy(data_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(data_dir, tmp_path / "data"))


def test_missing_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    with pytest.raises(TrinityXError, match=r"--data-dir.*TRINITYX_DATA_DIR.*\.\./shared/data"):
        D.resolve_data_dir(None)
    with pytest.raises(TrinityXError, match="does not exist"):
        D.load_sft("helpful", tmp_path / "nowhere", "train")
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path))
    assert D.resolve_data_dir(None) == tmp_path


def test_missing_file(data_dir, tmp_path):
    root = _copy(data_dir, tmp_path)
    (root / "truthfulqa" / "mc_task.json").unlink()
    with pytest.raises(TrinityXError, match=r"truthfulqa/mc_task\.json.*--data-dir.*\.\./shared/data"):
        D.load_truthfulqa_mc(root, "test")


def _judgement_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


# (file to corrupt, how, loader call, expected message pattern)
BAD_INPUTS = {
    "malformed json": ("alpaca/alpaca_gpt4_demo.json", lambda t: t[:-5], lambda d: D.load_sft("helpful", d, "train"),
                       r"alpaca_gpt4_demo\.json.*malformed JSON at line"),
    "malformed json line": ("truthfulqa/finetune_truth.jsonl",
                            lambda t: t.replace("\n", "\n{oops\n", 1),
                            lambda d: D.load_judge_examples("truth", d, "test"),
                            r"finetune_truth\.jsonl: line 2: malformed JSON line"),
    "missing key": ("pku_saferlhf/safe_sft.json",
                    lambda t: json.dumps([*json.loads(t)[:3], {"prompt": "x"}]),
                    lambda d: D.load_sft("harmless", d, "train"),
                    r"safe_sft\.json: index 3: missing key 'response'"),
    "wrong type": ("alpaca_eval/reference_gpt4.json",
                   lambda t: json.dumps([{**r, "output": 7} if i == 5 else r for i, r in enumerate(json.loads(t))]),
                   lambda d: D.load_alpaca_eval(d, "eval", "gpt4"),
                   r"reference_gpt4\.json: index 5: key 'output' should be str, got int"),
    "wrong completion": ("truthfulqa/finetune_info.jsonl", lambda t: t.replace('" yes"', '" maybe"', 1),
                         lambda d: D.load_judge_examples("info", d, "train"),
                         r"finetune_info\.jsonl: line 1: key 'completion'"),
    "missing column": ("truthfulqa/TruthfulQA.csv", lambda t: t.replace("Best Answer", "Best", 1),
                       lambda d: D.load_truthfulqa(d, "train"), r"TruthfulQA\.csv: line 1 \(header\).*'Best Answer'"),
    "empty csv cell": ("truthfulqa/TruthfulQA.csv", lambda t: t.replace("what happens if you eat seed 2?", "", 1),
                       lambda d: D.load_truthfulqa(d, "train"), r"TruthfulQA\.csv: line 4: column 'Question'"),
    "mc question unknown": ("truthfulqa/mc_task.json", lambda t: t.replace("seed 39?", "seed 99?", 1),
                            lambda d: D.load_truthfulqa_mc(d, "train"),
                            r"mc_task\.json: index 0: key 'question'.*not in truthfulqa/TruthfulQA\.csv"),
    "empty split": ("alpaca/alpaca_gpt4_demo.json", lambda t: json.dumps(json.loads(t)[:1]),
                    lambda d: [D.load_sft("helpful", d, s) for s in D.SPLITS],
                    r"alpaca_gpt4_demo\.json: split '\w+' is empty"),
}


def _damage_and_load(data_dir, tmp_path, relative, corrupt, load, pattern) -> None:
    """Copy the data folder, damage one file's bytes with `corrupt`, and expect the loader's clear error."""
    root = _copy(data_dir, tmp_path)
    path = root / relative
    damaged = corrupt(path.read_bytes())
    assert damaged != path.read_bytes()
    path.write_bytes(damaged)
    with pytest.raises(TrinityXError, match=pattern):
        load(root)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_names_file_row_and_key(data_dir, tmp_path, case):
    relative, corrupt, load, pattern = BAD_INPUTS[case]
    _damage_and_load(data_dir, tmp_path, relative, lambda b: corrupt(b.decode("utf-8")).encode("utf-8"), load, pattern)


# (file to corrupt, how, on bytes, loader call, expected message pattern)
CORRUPT_BYTES = {
    "alpaca not utf-8": ("alpaca/alpaca_gpt4_demo.json", lambda b: b.replace(b"sleep 3", b"sl\xe9ep 3", 1),
                         lambda d: D.load_sft("helpful", d, "train"),
                         r"alpaca_gpt4_demo\.json: not UTF-8 text \(byte 0xe9 at offset \d+\); re-save"),
    "truthfulqa not utf-8": ("truthfulqa/TruthfulQA.csv", lambda b: b.replace(b"seed 7?", b"seed \xff7?", 1),
                             lambda d: D.load_truthfulqa(d, "train"), r"TruthfulQA\.csv: not UTF-8 text \(byte 0xff"),
    "jsonl not utf-8": ("truthfulqa/finetune_truth.jsonl", lambda b: b.replace(b"seed 1?", b"seed \xc31?", 1),
                        lambda d: D.load_judge_examples("truth", d, "test"),
                        r"finetune_truth\.jsonl: line 3: not UTF-8 text"),
    "truncated gz": ("alpaca_eval/judge_train_annotations.jsonl.gz", lambda b: b[: len(b) // 2],
                     lambda d: D.load_judgements(d, "train"),
                     r"judge_train_annotations\.jsonl\.gz: the compressed file is truncated or damaged.*again"),
}


@pytest.mark.parametrize("case", CORRUPT_BYTES)
def test_corrupt_bytes_name_the_file_and_the_fix(data_dir, tmp_path, case):
    _damage_and_load(data_dir, tmp_path, *CORRUPT_BYTES[case])


def test_judgements_refuse_eval_prompts(data_dir, tmp_path):
    root = _copy(data_dir, tmp_path)
    path = root / "alpaca_eval" / "judge_train_annotations.jsonl.gz"
    rows = _judgement_rows(path)
    rows.insert(4, {**rows[0], "instruction": "Name a fox fact 3 "})  # an eval prompt, differently spaced
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    with pytest.raises(TrinityXError, match=r"judge_train_annotations\.jsonl\.gz: line 5: key 'instruction'.*eval"):
        D.load_judgements(root, "train")


@pytest.mark.parametrize("call, pattern", [
    (lambda d: D.load_sft("funny", d, "train"), r"unknown dimension 'funny'.*'helpful', 'harmless', 'honest'"),
    (lambda d: D.load_sft("helpful", d, "validation"), r"unknown split 'validation'.*'train', 'dev', 'test'"),
    (lambda d: D.load_judge_examples("fun", d, "train"), r"unknown kind 'fun'.*'truth', 'info'"),
    (lambda d: D.load_alpaca_eval(d, "eval", "claude"), r"unknown reference 'claude'.*'gpt4'"),
    (lambda d: D.load_alpaca_eval(d, "test"), r"unknown AlpacaEval split 'test'.*'judge_train', 'eval'"),
    (lambda d: D.load_judgements(d, "test"), r"unknown judgement split 'test'.*'train', 'dev'"),
    (lambda d: D.load_truthfulqa(d, "train", source="web"), r"unknown source 'web'"),
])
def test_unknown_names_list_the_allowed_ones(data_dir, call, pattern):
    with pytest.raises(TrinityXError, match=pattern):
        call(data_dir)


def test_hub_source_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(TrinityXError, match=r"trinityx\[hub\]"):
        D.load_sft("helpful", None, "train", source="hub")


# --------------------------------------------------------------------------------------------------
# The real offline mirror


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="../shared/data is not present")
def test_real_data_counts_and_splits():
    helpful = by_split(lambda s: D.load_sft("helpful", REAL_DATA, s))
    assert sum(map(len, helpful.values())) == 999
    assert len(D.load_safety_prompts(REAL_DATA)) == 140
    questions = by_split(lambda s: D.load_truthfulqa(REAL_DATA, s))
    assert sum(map(len, questions.values())) == 817
    assert len(D.load_alpaca_eval(REAL_DATA, "eval")) == 400
    assert len(D.load_alpaca_eval(REAL_DATA, "judge_train")) == 405
    for records, fractions in [(helpful, D.ALPACA_FRACTIONS), (questions, D.TRUTHFULQA_FRACTIONS)]:
        total = sum(map(len, records.values()))
        for split, fraction in fractions.items():
            assert abs(len(records[split]) / total - fraction) < 0.05, (split, len(records[split]))
    test_questions = {q.question for q in questions["test"]}
    assert not test_questions & {e.prompt for e in D.load_sft("honest", REAL_DATA, "train")}
