"""BitsMoE for vLLM: spectral-energy-guided mixed-precision quantization of MoE experts.

The core (format, packing, reference) imports neither vLLM nor offline/; only plugin.py and
config.py import vLLM.
"""

__version__ = "0.1.0"
