"""vLLM's view of a BitsMoE checkpoint: the `QuantizationConfig` registered as `bitsmoe`."""

from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.fp8 import Fp8Config
from vllm.platforms import current_platform

from bitsmoe_vllm.checkpoint import check_files
from bitsmoe_vllm.format import QUANT_METHOD, QuantConfig
from bitsmoe_vllm.moe_method import BitsMoEMoEMethod
from bitsmoe_vllm.vllm_loaders import help_vllm_loaders


class BitsMoEConfig(QuantizationConfig):
    def __init__(self, spec: QuantConfig | None = None):
        if spec is None:  # vLLM builds the class with no arguments for a checkpoint without quantization_config
            raise ValueError(
                "--quantization bitsmoe needs a BitsMoE checkpoint, but config.json has no quantization_config "
                "with quant_method 'bitsmoe'; create one with bitsmoe-quantize"
            )
        super().__init__()
        self.spec = spec
        # fp8 linear weights kept as the source stored them (format version 3): vLLM's own fp8 method runs them
        self.linear = Fp8Config.from_config(dict(spec.linear_quantization)) if spec.linear_quantization else None
        if self.linear is not None and current_platform.is_cpu():
            refuse_fp8_without_a_cpu_kernel()

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        if self.linear is not None:  # vLLM's fp8 linear kernels take 16-bit activations
            return self.linear.get_supported_act_dtypes()
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "BitsMoEConfig":
        return cls(QuantConfig.from_dict(config))

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """Before any weight is loaded (vLLM calls this in the API server, where a ValueError is one line of output):
        a local checkpoint's files are checked against quantization_config (`check_files`), so that a damaged one
        is refused with the file or tensor named, not deep inside a worker."""
        if Path(model_name).is_dir():
            try:
                check_files(model_name, self.spec)
            except FileNotFoundError as err:
                raise ValueError(str(err)) from None

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.linear is not None:  # the fp8 config's ignored layers, if any, by vLLM's names
            self.linear.apply_vllm_mapper(hf_to_vllm_mapper)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):  # attention, router and shared experts stay as stored
            if self.linear is None:
                return UnquantizedLinearMethod()
            self.linear.packed_modules_mapping = self.packed_modules_mapping  # set on this config by vLLM's loader
            return self.linear.get_quant_method(layer, prefix)
        if isinstance(layer, RoutedExperts):
            help_vllm_loaders()  # the loaders of gpt-oss and Granite 4.0 (bitsmoe_vllm/vllm_loaders.py)
            modules = [layout.module for layout in self.spec.layers]
            if prefix not in modules:
                raise ValueError(
                    f"vLLM's MoE layer '{prefix}' is not in the checkpoint's quantization_config.layers "
                    f"({len(modules)} layers, e.g. '{modules[0]}'); the checkpoint does not match this model"
                )
            return BitsMoEMoEMethod(layer.moe_config, self.spec, self.spec.layer(prefix))
        return None


def refuse_fp8_without_a_cpu_kernel() -> None:
    """vLLM's CPU build runs fp8 block-quantized linear layers on AMX tiles only: refused at load, with the fix."""
    from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUFp8BlockScaledMMKernel

    supported, reason = CPUFp8BlockScaledMMKernel.is_supported()
    if not supported:
        raise ValueError(
            "this BitsMoE checkpoint keeps its source's fp8 linear weights (quantization_config.linear_quantization, "
            f"format version 3), which vLLM's CPU build cannot run here: {reason} Quantize again with "
            "`bitsmoe-quantize --format-version 2` to store them dequantized, in the source's dtype"
        )
