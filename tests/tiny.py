"""Tiny Llama and Gemma 3 backbones and a tokenizer built offline, so tests never touch the hub."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from trinityx.mocae import MoCaEConfig, MoCaEModel

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Give three tips for staying healthy. Eat well, sleep enough and exercise.",
    "I cannot help with that request because it could hurt someone.",
    "What happens if you eat watermelon seeds? Nothing happens; they pass through.",
    "user assistant system question answer true false yes no helpful harmless honest",
    "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z",
] * 20


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_backbone(out: Path, seed: int = 0, layers: int = 2) -> Path:
    """Save a random 2-layer Llama and its tokenizer to `out`; returns `out`."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_gemma3(out: Path, sliding_window: int = 6) -> Path:
    """Save a random 2-layer Gemma 3 (one sliding-window layer of `sliding_window` positions, one full) and the
    tokenizer to `out`: the cache kind of the embedded Gemma-3-270M, with a window short prompts overflow."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    Gemma3ForCausalLM(config).to(torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMES = ["helpful", "harmless", "honest"]


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_mocae_folder(backbone, root):
    """Three seeded random PEFT LoRA experts and a random router, saved as a MoCaE folder."""
    dirs = []
    for k, name in enumerate(NAMES):
        torch.manual_seed(k)
        model = get_peft_model(load(backbone), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
        g = torch.Generator().manual_seed(k + 1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data = torch.randn(p.shape, generator=g) * 0.3
        model.save_pretrained(root / "adapters" / name)
        dirs.append(root / "adapters" / name)
    mocae = MoCaEModel(load(backbone), dirs, MoCaEConfig(expert_names=NAMES, backbone=str(backbone)))
    g = torch.Generator().manual_seed(0)
    for p in mocae.router.parameters():
        p.data = torch.randn(p.shape, generator=g) * 2.0
    return mocae.save_pretrained(root / "mocae")
