"""LoRA adapters: the PEFT adapter folder format (`adapters`), task-vector algebra and static merges (`taskvectors`)."""
