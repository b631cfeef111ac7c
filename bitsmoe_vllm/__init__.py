"""BitsMoE for vLLM: spectral-energy-guided mixed-precision quantization of MoE experts.

The core (format, packing, reference) imports neither vLLM nor the quantizer (offline/, installed as
bitsmoe_vllm.offline); only plugin.py, config.py and moe_method.py import vLLM.
"""

__version__ = "0.1.0"
