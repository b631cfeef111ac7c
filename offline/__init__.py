"""The BitsMoE offline quantizer: Hugging Face MoE checkpoint in, FORMAT.md checkpoint out. Never imports vLLM."""
