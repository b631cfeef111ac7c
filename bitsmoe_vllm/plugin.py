"""The `vllm.general_plugins` entry point: vLLM calls `register()` in every process it starts."""


def register() -> None:
    """Register the `bitsmoe` quantization method with vLLM (cheap; safe to call more than once)."""
    from vllm.model_executor.layers.quantization import register_quantization_config

    from bitsmoe_vllm.config import BitsMoEConfig

    register_quantization_config("bitsmoe")(BitsMoEConfig)
