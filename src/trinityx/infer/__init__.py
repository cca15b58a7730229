"""Inference: a system loaded from its spec (`systems`), batched and cached generation and log-likelihoods
(`generation`), and the vLLM backend (`vllm_backend`)."""
