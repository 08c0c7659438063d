"""ONNX export of every layer kind in eval mode, by both of torch's exporters, run in onnxruntime."""

import io

import pytest
import torch
from torch import nn

import bnlab

onnx = pytest.importorskip("onnx", reason="the test extras install onnx, onnxscript and onnxruntime")
ort = pytest.importorskip("onnxruntime", reason="the test extras install onnx, onnxscript and onnxruntime")

MODELS = {
    "BatchNorm2d": lambda: nn.Sequential(nn.Conv2d(3, 8, 3), bnlab.BatchNorm2d(8), nn.ReLU()),
    "BatchNorm1d": lambda: nn.Sequential(nn.Linear(5, 8), bnlab.BatchNorm1d(8)),
    "BatchNormAct2d": lambda: nn.Sequential(nn.Conv2d(3, 8, 3), bnlab.BatchNormAct2d(8, act="leaky_relu")),
    "BatchRenorm2d": lambda: nn.Sequential(nn.Conv2d(3, 8, 3), bnlab.BatchRenorm2d(8)),
    "GhostBatchNorm2d": lambda: nn.Sequential(nn.Conv2d(3, 8, 3), bnlab.GhostBatchNorm2d(8, virtual_batch_size=2)),
    "SyncBatchNorm": lambda: nn.Sequential(nn.Conv2d(3, 8, 3), bnlab.SyncBatchNorm(8)),
    "CrossIterationBatchNorm2d": lambda: bnlab.cross_iteration(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), window=3),
}


@pytest.mark.filterwarnings("ignore")  # (the exporters' own deprecation and tracer warnings)
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo-exporter", "torchscript-exporter"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_a_trained_model_exports_to_onnx_with_its_eval_outputs(kind, dynamo):
    """(torch.onnx.export(..., dynamo=False), the TorchScript-based exporter, refused every layer
    whose eval mode called torch.native_batch_norm: "Exporting the operator
    'aten::native_batch_norm' to ONNX is not supported"; torch's BN calls torch.batch_norm.)"""
    torch.manual_seed(0)
    model = MODELS[kind]()
    shape = (4, 5) if kind == "BatchNorm1d" else (4, 3, 9, 9)
    for _ in range(3):  # (running statistics away from 0 and 1)
        model(torch.randn(shape) * 2 + 1)
    model.eval()
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.randn(shape),), buffer, dynamo=dynamo)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(shape) * 2 + 1
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(y), expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 0.1  # (a real output, not zeros on both sides)
