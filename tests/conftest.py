import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from tiny import build_tiny_backbone


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    """Folder of a random 2-layer Llama with an offline BPE tokenizer and a chat template."""
    return build_tiny_backbone(tmp_path_factory.mktemp("tiny") / "backbone")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small data folder in the exact formats of ../shared/data (see tests/fixture_data.py)."""
    from fixture_data import write_fixture_data

    return write_fixture_data(tmp_path_factory.mktemp("data") / "data")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """A random 2-layer BERT with MiniLM's tokenizer: the judges' code path at a fraction of the cost."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from trinityx.eval.judges import minilm_path

    folder = tmp_path_factory.mktemp("tiny_encoder")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


JUDGES_MAX_EVAL = 16


@pytest.fixture(scope="session")
def tiny_judges(data_dir, tiny_encoder, tmp_path_factory):
    """(folder, results): all four local judges, trained for one step each on the fixture data."""
    from trinityx.eval.judges import train_judges

    out = tmp_path_factory.mktemp("judges")
    results = train_judges(data_dir, out, max_train=8, max_eval=JUDGES_MAX_EVAL, batch_size=8, max_length=24, seed=0,
                           encoder=tiny_encoder)
    return out, results
