"""Inference: a system loaded from its spec (`systems`), batched and cached generation and log-likelihoods
(`generation`), the vLLM backend (`vllm_backend`), and the decode engine of serve and chat (`engine`)."""
