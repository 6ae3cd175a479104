"""The low-rank activation path's layout: the up-projection reaches ``addmm`` as a contiguous matrix.

With a transposed view there, autograd computes the factor's gradient in that layout, (gᵀ·h)ᵀ, which oneDNN
runs up to 9× slower for tall inputs (benchmarks/README.md, FLoRA section). Nothing numeric would notice.
"""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import visionpeft as vp


class _RecordAddmm(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.right_operands = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.addmm.default:
            self.right_operands.append(args[2])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["lora", "flora"])
def test_up_projection_is_a_contiguous_right_operand(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24))
    vp.attach(model, method, rank=4, targets=nn.Linear)
    x = torch.randn(64, 16)
    with _RecordAddmm() as record:
        model(x).sum().backward()
    rank_rows = [m for m in record.right_operands if m.shape == (4, 24)]
    assert rank_rows, "the adapter's up-projection did not go through addmm"
    assert all(m.is_contiguous() for m in rank_rows)
