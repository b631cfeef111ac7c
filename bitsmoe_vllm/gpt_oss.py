"""BitsMoE tensors through vLLM's gpt-oss loader.

vLLM 0.32's `GptOssModel._load_weights_other` (the loader of every gpt-oss checkpoint that is neither MXFP4 nor Quark)
has rules for the fused names its own methods use and silently skips every other expert tensor, so the per-expert
tensors of a BitsMoE checkpoint (FORMAT.md section 3) would never reach the MoE method. `route_bitsmoe_tensors`
wraps that loader: with a BitsMoE quantization config, those tensors go to the MoE method's loaders with their
expert and projection, as vLLM's per-expert name mapping delivers them for the other families; everything else, and
every model without BitsMoE, goes through vLLM's code unchanged.
"""

import re

from bitsmoe_vllm.moe_method import PARAM_OF

# after GptOssForCausalLM.hf_to_vllm_mapper, which renames a per-expert ".down_proj.bias" to ".w2_bias"
_TENSOR = re.compile(
    r"(?P<experts>.*\.mlp\.experts)\.(?P<expert>\d+)\."
    r"(?:(?P<projection>gate|up|down)_proj\.(?P<kind>codes|scales|bits|basis_scale|basis|bias)|w2_(?P<w2>bias))"
)
SHARD = {"gate": "w1", "up": "w3", "down": "w2"}


def route_bitsmoe_tensors() -> None:
    """Wrap vLLM's gpt-oss loader (once per process; a no-op where vLLM has no gpt-oss model)."""
    try:
        from vllm.model_executor.models import gpt_oss
    except ImportError:
        return
    # (a vLLM without this method loads gpt-oss otherwise: the MoE method's check then names any tensor not delivered)
    original = getattr(gpt_oss.GptOssModel, "_load_weights_other", None)
    if original is None or getattr(original, "bitsmoe", False):
        return

    def load(self, *args):
        *rest, weights, stacked_params_mapping = args
        from bitsmoe_vllm.config import BitsMoEConfig

        if not isinstance(self.quant_config, BitsMoEConfig):
            return original(self, *args)
        params, loaded = dict(self.named_parameters()), set()

        def others():
            for name, tensor in weights:
                match = _TENSOR.fullmatch(name)
                if match is None:
                    yield name, tensor
                    continue
                projection, kind = match["projection"] or "down", match["kind"] or match["w2"]
                param_name = f"{match['experts']}.routed_experts.{PARAM_OF[projection]}_{kind}"
                param = params[param_name]
                param.weight_loader(param, tensor, name, SHARD[projection], int(match["expert"]))
                loaded.add(param_name)

        return original(self, *rest, others(), stacked_params_mapping) | loaded

    load.bitsmoe = True
    gpt_oss.GptOssModel._load_weights_other = load
