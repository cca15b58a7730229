"""The training loop: label masking, learning, accumulation invariance, and exact resumption."""

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from trinityx import data
from trinityx.backbones import load_backbone
from trinityx.errors import TrinityXError
from trinityx.sft import IGNORE, collate, encode, global_batch_order
from trinityx.train.experts import ExpertConfig, LoraSettings, encode_examples, lm_loss_fn, partial_dir, train_expert
from trinityx.train.loop import TrainConfig, fit


def peft_model(backbone_dir, dropout=0.0, seed=0):
    backbone = load_backbone(str(backbone_dir))
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(backbone.lora_targets))
    model = get_peft_model(backbone.model, config)
    return backbone, model, {n: p for n, p in model.named_parameters() if p.requires_grad}


def encoded(backbone, data_dir, split, n=None):
    return encode_examples(backbone, data.load_sft("helpful", data_dir, split)[:n], 64)


def loss_that_dies_at(call: int):
    """lm_loss_fn that raises "killed" at its `call`-th training call: a process killed mid-run."""
    calls = {"n": 0}

    def dying_loss(model, batch):
        calls["n"] += model.training
        if calls["n"] == call:
            raise RuntimeError("killed")
        return lm_loss_fn(model, batch)

    return dying_loss


def test_prompt_and_padding_are_never_trained_on(tiny_backbone):
    backbone = load_backbone(str(tiny_backbone))
    tok = backbone.tokenizer
    short = encode(tok, "chat", "give tip", "eat well", 64)
    long = encode(tok, "chat", "give three tips for staying healthy", "eat well and sleep enough", 64)
    batch = collate([short, long], tok.pad_token_id)
    for row, e in enumerate([short, long]):
        labels, attention = batch["labels"][row], batch["attention_mask"][row]
        trained = (labels != IGNORE).nonzero().flatten().tolist()
        # Exactly the response tokens (answer + end-of-sequence) are targets: no prompt, no pad.
        assert trained == list(range(e.prompt_len, len(e.input_ids)))
        assert tok.decode(labels[labels != IGNORE]) == tok.decode(tok("eat well" if row == 0 else "eat well and sleep enough").input_ids) + tok.eos_token
        assert attention.sum() == len(e.input_ids)
        assert (labels[attention == 0] == IGNORE).all()
    left = collate([short, long], tok.pad_token_id, padding_side="left")
    assert left["attention_mask"][0, 0] == 0 and left["input_ids"][0, -1] == short.input_ids[-1]


def test_long_examples_keep_half_the_window_for_the_answer(tiny_backbone):
    tok = load_backbone(str(tiny_backbone)).tokenizer
    e = encode(tok, "chat", "fox " * 100, "dog " * 100, 40)
    assert len(e.input_ids) == 40 and e.prompt_len == 20
    assert sum(label != IGNORE for label in e.labels) == 20


def test_batch_order_is_a_function_of_seed_and_epoch():
    lengths = [i % 17 for i in range(100)]
    a = global_batch_order(lengths, 8, seed=1, epoch=0, group_by_length=True)
    assert a == global_batch_order(lengths, 8, seed=1, epoch=0, group_by_length=True)
    assert a != global_batch_order(lengths, 8, seed=1, epoch=1, group_by_length=True)
    assert sorted(i for b in a for i in b) == sorted(set(i for b in a for i in b)) and len(a) == 12
    # grouped batches pad less than random ones
    waste = lambda batches: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)  # noqa: E731
    assert waste(a) < waste(global_batch_order(lengths, 8, seed=1, epoch=0, group_by_length=False))


def test_training_lowers_dev_loss(tiny_backbone, data_dir, tmp_path):
    backbone, model, params = peft_model(tiny_backbone)
    cfg = TrainConfig(max_steps=20, batch_size=8, micro_batch_size=8, lr=3e-2, warmup_steps=2, eval_every=10,
                      checkpoint_every=0)
    log = fit(model, params, lm_loss_fn, encoded(backbone, data_dir, "train"), encoded(backbone, data_dir, "dev"),
              cfg, tmp_path, backbone.tokenizer.pad_token_id)
    assert log["dev_loss_after"] < log["dev_loss_before"] - 0.3
    assert [d["step"] for d in log["dev"]] == [0, 10, 20]
    assert len(log["steps"]) == 20 and log["tokens_per_s"] > 0


def test_gradient_accumulation_does_not_change_the_result(tiny_backbone, data_dir, tmp_path):
    results = []
    for micro in (8, 2):
        backbone, model, params = peft_model(tiny_backbone)
        cfg = TrainConfig(max_steps=4, batch_size=8, micro_batch_size=micro, lr=1e-2, warmup_steps=1,
                          checkpoint_every=0, eval_every=100)
        fit(model, params, lm_loss_fn, encoded(backbone, data_dir, "train"), encoded(backbone, data_dir, "dev", 8),
            cfg, tmp_path / str(micro), backbone.tokenizer.pad_token_id)
        results.append({n: p.detach().clone() for n, p in params.items()})
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], atol=2e-5, rtol=1e-4)


def test_killed_run_resumes_to_the_same_adapter(tiny_backbone, data_dir, tmp_path):
    cfg = TrainConfig(max_steps=8, batch_size=4, micro_batch_size=2, lr=5e-3, warmup_steps=2, checkpoint_every=3,
                      eval_every=100)

    def run(work, kill_at_call=None):
        backbone, model, params = peft_model(tiny_backbone, dropout=0.1)  # dropout: the RNG must resume too
        calls = {"n": 0}

        def loss_fn(m, batch):
            if m.training:
                calls["n"] += 1
                if calls["n"] == kill_at_call:
                    raise KeyboardInterrupt("killed")
            return lm_loss_fn(m, batch)

        log = fit(model, params, loss_fn, encoded(backbone, data_dir, "train"), encoded(backbone, data_dir, "dev", 8),
                  cfg, work, backbone.tokenizer.pad_token_id)
        return log, {n: p.detach().clone() for n, p in params.items()}

    _, uninterrupted = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", kill_at_call=2 * 7 + 1)  # dies inside step 8, after the checkpoint at step 6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log, resumed = run(tmp_path / "b")
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]  # the fast-forward is not a misordered step
    assert log["resumed_from_step"] == 6
    assert [s["step"] for s in log["steps"]] == list(range(1, 9))
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=1e-5)


def test_train_expert_writes_a_peft_folder_and_leaves_nothing_half_written(tiny_backbone, data_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "honest"
    cfg = ExpertConfig(out=out, dimension="honest", backbone=str(tiny_backbone), data_dir=str(data_dir),
                       train=TrainConfig(max_steps=3, batch_size=4, micro_batch_size=4, checkpoint_every=2, eval_every=3))
    log = train_expert(cfg)
    assert (out / "adapter_model.safetensors").is_file() and (out / "train_log.json").is_file()
    assert (out / "trinityx_config.json").is_file() and not partial_dir(out).exists()
    assert log["dev_loss_after"] != log["dev_loss_before"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_backbone), out)
    assert model.peft_config["default"].r == 8
    with pytest.raises(TrinityXError, match="--overwrite"):
        train_expert(cfg)

    # A run that dies mid-way leaves its checkpoint beside `out`, never a partial `out`.
    broken = tmp_path / "broken"
    dying_loss = loss_that_dies_at(3)

    monkeypatch.setattr("trinityx.train.experts.lm_loss_fn", dying_loss)
    cfg = ExpertConfig(out=broken, dimension="helpful", backbone=str(tiny_backbone), data_dir=str(data_dir),
                       train=TrainConfig(max_steps=4, batch_size=4, micro_batch_size=4, checkpoint_every=1))
    with pytest.raises(RuntimeError, match="killed"):
        train_expert(cfg)
    assert not broken.exists()
    assert (partial_dir(broken) / "checkpoint" / "state.json").is_file()


def test_bad_training_settings_name_the_flag():
    with pytest.raises(TrinityXError, match="--batch-size"):
        TrainConfig(batch_size=6, micro_batch_size=4).validate()
    with pytest.raises(TrinityXError, match="--max-steps"):
        TrainConfig(max_steps=0).validate()
    with pytest.raises(TrinityXError, match="--lr"):
        TrainConfig(lr=float("nan")).validate()


def test_a_checkpoint_resumes_only_under_its_own_configuration(tiny_backbone, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "honest"
    settings = dict(max_steps=6, batch_size=4, micro_batch_size=4, checkpoint_every=2, eval_every=100)
    dying_loss = loss_that_dies_at(5)  # inside step 5, after the checkpoint of step 4

    def config(**train):
        return ExpertConfig(out=out, dimension="honest", backbone=str(tiny_backbone), data_dir=str(data_dir),
                            train=TrainConfig(**{**settings, **train}))

    with monkeypatch.context() as m:
        m.setattr("trinityx.train.experts.lm_loss_fn", dying_loss)
        with pytest.raises(RuntimeError, match="killed"):
            train_expert(config())
    checkpoint = partial_dir(out) / "checkpoint"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 4

    # Another configuration is refused, naming what changed and the folder to delete; nothing is written.
    with pytest.raises(TrinityXError, match=r"another configuration.*lr 0\.0002 -> 0\.01.*seed 0 -> 7") as error:
        train_expert(config(max_steps=3, lr=0.01, seed=7))
    assert str(partial_dir(out)) in str(error.value) and not out.exists()
    with pytest.raises(TrinityXError, match="another configuration.*lora_rank 8 -> 4"):
        train_expert(replace(config(), lora=LoraSettings(lora_rank=4)))
    with pytest.raises(TrinityXError, match="another configuration.*dimension 'honest' -> 'helpful'"):
        train_expert(replace(config(), dimension="helpful"))

    # The same configuration resumes; how often checkpoints are written does not matter.
    log = train_expert(config(checkpoint_every=3))
    assert log["resumed_from_step"] == 4 and len(log["steps"]) == 6
    assert json.loads((out / "trinityx_config.json").read_text())["train"]["lr"] == 2e-4


def test_a_truncated_checkpoint_names_the_folder_to_delete(tiny_backbone, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "helpful"
    cfg = ExpertConfig(out=out, dimension="helpful", backbone=str(tiny_backbone), data_dir=str(data_dir),
                       train=TrainConfig(max_steps=3, batch_size=4, micro_batch_size=4, checkpoint_every=1))
    dying_loss = loss_that_dies_at(2)

    with monkeypatch.context() as m:
        m.setattr("trinityx.train.experts.lm_loss_fn", dying_loss)
        with pytest.raises(RuntimeError, match="killed"):
            train_expert(cfg)
    state = partial_dir(out) / "checkpoint" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(TrinityXError, match=f"cannot be read.*delete {partial_dir(out)}"):
        train_expert(cfg)
