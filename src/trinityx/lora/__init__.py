"""LoRA adapters: the PEFT adapter folder format (`adapters`)."""
