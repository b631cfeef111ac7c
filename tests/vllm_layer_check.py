"""One BitsMoE layer through vLLM's own MoE layer, with no model and no server: the plugin registers the method, vLLM's
FusedMoEFactory builds the layer with BitsMoEConfig, the method creates the weights, vLLM's per-expert name mapping
and the method's loaders fill them, the weights are processed, and the method's apply is compared with the reference
forward on CPU tensors, for a silu layer (with an int8 basis per projection, and with one per layer) and for
gpt-oss's (clamped SwiGLU, expert biases). Prints a line for each,
`vllm VERSION: ...`, and exits non-zero on any difference.

Runs beside any vLLM build that imports on this machine (tests/test_vllm_interfaces.py runs it with the suite's vLLM;
`VENV/bin/python tests/vllm_layer_check.py` with another, bitsmoe-vllm installed in VENV)."""

import socket
import sys
from pathlib import Path

import torch

# tests.helpers from any working directory; bitsmoe_vllm stays the one installed beside this vLLM
sys.path.append(str(Path(__file__).resolve().parents[1]))

H, I, E, K, T = 64, 128, 8, 2, 5
MODULE = "model.layers.0.mlp.experts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    import vllm
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.quantization import get_quantization_config

    from bitsmoe_vllm import plugin
    from bitsmoe_vllm.backend import TOLERANCE
    from bitsmoe_vllm.reference import gather_layer, moe_forward
    from tests.helpers import random_checkpoint

    plugin.register()
    # the device named: a CUDA build of vLLM on a machine without a GPU cannot infer it
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{free_port()}", 0, "gloo")
        initialize_model_parallel(1, 1)
    failed = 0
    # silu with int8 bases per projection and one per layer; gpt-oss's clamped SwiGLU with expert biases
    for gpt_oss, sharing in ((False, "projection"), (False, "layer"), (True, "projection")):
        ranks = (48, 48, 48) if sharing == "layer" else (48, 64, 40)
        cfg, tensors = random_checkpoint(
            H, I, E, ranks, 32, basis_dtype="int8", basis_sharing=sharing, module=MODULE, gpt_oss=gpt_oss
        )
        quant_config = get_quantization_config("bitsmoe").from_config(cfg.to_dict())
        with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
            runner = FusedMoEFactory(
                num_experts=E,
                top_k=K,
                hidden_size=H,
                intermediate_size=I,
                params_dtype=torch.float32,
                quant_config=quant_config,
                prefix=MODULE,
                **(dict(has_bias=True, activation="swigluoai") if gpt_oss else {}),
            )
        layer = next(m for m in runner.modules() if isinstance(m, RoutedExperts))
        params = dict(layer.named_parameters())
        mapping = RoutedExperts.build_expert_params_mapping("gate_proj", "down_proj", "up_proj", num_experts=E)
        for name, tensor in tensors.items():
            # as a model's load_weights does: "experts.{e}.gate_proj." -> "experts.routed_experts.w13_", then the kind
            param_name, _, expert, shard = next(m for m in mapping if m[1] in name)
            param = params[param_name.rpartition(".")[2] + name.rpartition(".")[2]]
            param.weight_loader(param, tensor, name, shard_id=shard, expert_id=expert)
        layer.quant_method.process_weights_after_loading(layer)

        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, H, generator=g)
        topk_weights = torch.rand(T, K, generator=g)
        topk_ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        ours = layer.quant_method.apply(layer, x, topk_weights, topk_ids, None, None)
        expected = moe_forward(x, topk_weights, topk_ids, gather_layer(cfg, MODULE, tensors))
        error = ((ours - expected).norm() / expected.norm()).item()
        kernel = layer.quant_method.kernel  # what the backend oracle chose: None is the C++ float kernel
        kernel = "cpu-float" if kernel is None else type(kernel).__name__
        print(
            f"vllm {vllm.__version__}: BitsMoE layer ({cfg.activation}{', expert biases' if gpt_oss else ''}, "
            f"a basis per {sharing}) built, "
            f"loaded and run through vLLM's MoE layer ({kernel}); off the reference by {error:.1e}"
        )
        failed += not error < TOLERANCE[torch.float32]  # what the backend oracle allows a kernel
    return int(failed > 0)


if __name__ == "__main__":
    raise SystemExit(main())
