"""The backend oracle (bitsmoe_vllm/backend.py): its choice on this machine, its check at load, and its fallback to the
reference when a kernel's result is wrong."""

import dataclasses
import logging

import pytest
import torch

from bitsmoe_vllm import backend, ops
from bitsmoe_vllm.backend import Backend
from bitsmoe_vllm.reference import moe_forward
from tests.helpers import LAYERS, layer_of, routing

MODULE = "model.layers.3.mlp.experts"


@pytest.fixture
def bitsmoe_log(caplog, monkeypatch):
    """Records of the vllm.bitsmoe logger, wherever vLLM (imported by other tests) routes its tree."""
    log = logging.getLogger("vllm.bitsmoe")
    monkeypatch.setattr(log, "propagate", False)  # each record once, through the handler added here
    log.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="vllm.bitsmoe")
    backend._logged.clear()
    yield caplog
    log.removeHandler(caplog.handler)


def expected_cpu_backend() -> Backend:
    if not ops.CPU_KERNEL:
        return Backend.REFERENCE
    return Backend.CPU_INT if torch.ops.bitsmoe.cpu_isa() in backend.INT_PATH_ISAS else Backend.CPU_FLOAT


@pytest.mark.parametrize("basis_dtype", ["float16", "int8", "identity"])
def test_chooses_this_cpus_kernel_checks_it_and_logs_the_choice_once(bitsmoe_log, basis_dtype):
    layer = layer_of(LAYERS[1], basis_dtype=basis_dtype)
    for _ in range(2):
        kernel, choice = backend.prepare(layer, MODULE)
        assert choice.backend is expected_cpu_backend()
    choices = [r.getMessage() for r in bitsmoe_log.records if "MoE layers run" in r.getMessage()]
    assert len(choices) == 1 and f"run {choice.backend.value}: {choice.reason}" in choices[0]
    assert not [r for r in bitsmoe_log.records if r.levelno >= logging.ERROR]
    x, (w, ids) = torch.randn(5, LAYERS[1][0]), routing(5, LAYERS[1][2], LAYERS[1][3], seed=1)
    y = ops.moe_layer(x, w, ids, layer, kernel)
    torch.testing.assert_close(y, moe_forward(x, w, ids, layer), rtol=1e-3, atol=1e-4)


def test_a_wrong_kernel_result_falls_back_to_the_reference_with_one_error_line(bitsmoe_log, monkeypatch):
    if expected_cpu_backend() is Backend.REFERENCE:
        pytest.skip("no CPU kernel in this install: nothing to check")
    layer = layer_of(LAYERS[0])
    right = ops.moe_layer

    def off_by_a_tenth(x, topk_weights, topk_ids, layer, kernel=None):
        y = right(x, topk_weights, topk_ids, layer, kernel)
        return y if kernel is ops.REFERENCE else y * 1.1  # the injected fault: every compiled path 10% off

    monkeypatch.setattr(ops, "moe_layer", off_by_a_tenth)
    kernel, choice = backend.prepare(layer, MODULE)
    assert kernel is ops.REFERENCE and choice.backend is Backend.REFERENCE
    (error,) = [r for r in bitsmoe_log.records if r.levelno >= logging.ERROR]
    message = error.getMessage()
    assert MODULE in message and f"the {expected_cpu_backend().value} kernel is off the reference by 0.1 " in message
    monkeypatch.setattr(ops, "moe_layer", right)
    x, (w, ids) = torch.randn(3, LAYERS[0][0]), routing(3, LAYERS[0][2], LAYERS[0][3], seed=2)
    torch.testing.assert_close(ops.moe_layer(x, w, ids, layer, kernel), moe_forward(x, w, ids, layer))  # the fallback


def test_a_device_without_kernels_gets_the_reference_with_the_reason():
    choice = backend.select_backend(torch.device("meta"))
    assert choice.backend is Backend.REFERENCE and "no BitsMoE kernel for meta devices" in choice.reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("basis_dtype", ["float16", "identity"])
def test_on_cuda_chooses_the_cuda_kernels_and_checks_both_paths(bitsmoe_log, basis_dtype):
    from bitsmoe_vllm import cuda

    assert cuda.load_kernels(build=True)  # the install's library, else compiled now
    layer = layer_of(LAYERS[1], basis_dtype=basis_dtype).to(torch.device("cuda"))
    kernel, choice = backend.prepare(layer, MODULE)
    assert choice.backend is Backend.CUDA and isinstance(kernel, cuda.KernelLayer)
    assert not [r for r in bitsmoe_log.records if r.levelno >= logging.ERROR]
    assert [dtype for dtype, _ in backend._checks(Backend.CUDA, layer)] == [torch.float32, torch.bfloat16]
    H, _, E, K, _, _ = LAYERS[1]
    for tokens in (3, 200):  # the decode path, then the prefill path (ops.moe_layer chooses by slots per expert)
        w, ids = (t.cuda() for t in routing(tokens, E, K, seed=tokens))
        x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
        ref = moe_forward(x.float(), w, ids, layer)
        y = ops.moe_layer(x, w, ids, layer, kernel).float()
        assert float((y - ref).norm() / ref.norm()) < backend.TOLERANCE[torch.bfloat16]


def test_gpt_oss_layers_run_this_cpus_kernel_and_the_reference_through_its_op(bitsmoe_log):
    """gpt-oss's layers (expert biases, the swigluoai activation) on the CPU kernel the oracle checked, and on the
    reference's op, which carries them too."""
    layer = layer_of(LAYERS[1], gpt_oss=True)
    kernel, choice = backend.prepare(layer, MODULE)
    assert choice.backend is expected_cpu_backend() and "off the reference" not in bitsmoe_log.text
    x, (w, ids) = torch.randn(5, LAYERS[1][0]), routing(5, LAYERS[1][2], LAYERS[1][3], seed=1)
    expected = moe_forward(x, w, ids, layer)
    torch.testing.assert_close(ops.moe_layer(x, w, ids, layer, kernel), expected, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(ops.moe_layer(x, w, ids, layer, ops.REFERENCE), expected)  # bitsmoe::moe_reference
    without = moe_forward(x, w, ids, dataclasses.replace(layer, biases=None))
    assert (expected - without).abs().max() > 0.1  # the comparisons' teeth: the biases are in the output
