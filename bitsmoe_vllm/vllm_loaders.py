"""BitsMoE tensors through the hand-written loaders of vLLM 0.32 models that do not deliver them as the other families'
loaders do. `help_vllm_loaders()` wraps them once per process (a no-op for a model vLLM does not have); with a BitsMoE
quantization config the wrappers act, and every other model goes through vLLM's code unchanged. The MoE method checks
after loading that each of its tensors arrived (BitsMoEMoEMethod.process_weights_after_loading), so a wrapper that
missed one is named there, not served wrong.

- gpt-oss (`GptOssModel._load_weights_other`, its loader for checkpoints neither MXFP4 nor Quark) has rules for the
  fused names its own methods use and silently skips every other expert tensor.
- Granite 4.0 (`GraniteMoeHybridModel.load_weights`) maps per-expert quantized tensors to parameter names that exist
  for vLLM's own methods only (`maybe_remap_moe_expert_param_name` knows a fixed list of kinds), and leaves those it
  loads out of the set of loaded parameters it returns, which vLLM checks.
The wrappers take the per-expert tensors of a BitsMoE checkpoint (FORMAT.md section 3) out of the stream, hand them
to the MoE method's loaders with their expert and projection, as vLLM's per-expert name mapping does for the other
families, and add the parameters they filled to the loaded set.
"""

import importlib
import re

from bitsmoe_vllm.moe_method import PARAM_OF, SHARD_PROJECTION

# a BitsMoE per-expert tensor, as the models' loaders receive it; gpt-oss's hf_to_vllm_mapper has renamed a
# per-expert ".down_proj.bias" to ".w2_bias"
_TENSOR = re.compile(
    r"(?P<experts>.*\.experts)\.(?P<expert>\d+)\."
    r"(?:(?P<projection>gate|up|down)_proj\.(?P<kind>codes|scales|bits|basis_scale|basis|bias)|w2_(?P<w2>bias))"
)
SHARD = {projection: shard for shard, projection in SHARD_PROJECTION.items()}


def help_vllm_loaders() -> None:
    _route_gpt_oss_tensors()
    _route_granite_4_tensors()


def _bitsmoe(model) -> bool:
    from bitsmoe_vllm.config import BitsMoEConfig

    return isinstance(getattr(model, "quant_config", None), BitsMoEConfig)


def _wrap(module_name: str, cls: str, method: str, make) -> None:
    """Replace `cls.method` of vllm.model_executor.models.`module_name` by make(original), once."""
    try:
        module = importlib.import_module(f"vllm.model_executor.models.{module_name}")
    except ImportError:
        return
    original = getattr(getattr(module, cls, None), method, None)
    if original is None or getattr(original, "bitsmoe", False):
        return
    wrapper = make(original)
    wrapper.bitsmoe = True
    setattr(getattr(module, cls), method, wrapper)


def _routed(model, weights, loaded: set[str]):
    """`weights` without BitsMoE's per-expert tensors, which go to their parameters' loaders (their names into
    `loaded`) as the stream is read; those of layers this rank does not hold (pipeline parallelism) are dropped."""
    params = dict(model.named_parameters())
    for name, tensor in weights:
        match = _TENSOR.fullmatch(name)
        if match is None:
            yield name, tensor
            continue
        projection, kind = match["projection"] or "down", match["kind"] or match["w2"]
        leaf = f"{PARAM_OF[projection]}_{kind}"
        # (with LoRA, vLLM's MoE layer sits under base_layer.)
        candidates = [f"{match['experts']}.{inner}routed_experts.{leaf}" for inner in ("", "base_layer.")]
        param_name = next((n for n in candidates if n in params), None)
        if param_name is None:  # a layer held by another pipeline-parallel rank
            continue
        param = params[param_name]
        param.weight_loader(param, tensor, name, SHARD[projection], int(match["expert"]))
        loaded.add(param_name)


def _route_gpt_oss_tensors() -> None:
    def make(original):
        def load(self, *args):
            if not _bitsmoe(self):
                return original(self, *args)
            *rest, weights, stacked_params_mapping = args
            loaded = set()
            return original(self, *rest, _routed(self, weights, loaded), stacked_params_mapping) | loaded

        return load

    _wrap("gpt_oss", "GptOssModel", "_load_weights_other", make)


def _route_granite_4_tensors() -> None:
    def make(original):
        def load_weights(self, weights):
            if not _bitsmoe(self):
                return original(self, weights)
            loaded = set()
            return original(self, _routed(self, weights, loaded)) | loaded

        return load_weights

    _wrap("granitemoehybrid", "GraniteMoeHybridModel", "load_weights", make)
