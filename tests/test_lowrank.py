"""The low-rank activation path's layout: the up-projection reaches ``addmm`` as a contiguous matrix.

With a transposed view there, autograd computes the factor's gradient in that layout, (gᵀ·h)ᵀ, which oneDNN
runs up to 9× slower for tall inputs (benchmarks/README.md, FLoRA section). Nothing numeric would notice.
"""
import pytest
import torch
from torch import nn

import visionpeft as vp
from conftest import RecordCalls


@pytest.mark.parametrize("method", ["lora", "flora"])
def test_up_projection_is_a_contiguous_right_operand(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24))
    vp.attach(model, method, rank=4, targets=nn.Linear)
    x = torch.randn(64, 16)
    with RecordCalls(torch.ops.aten.addmm.default) as record:
        model(x).sum().backward()
    rank_rows = [args[2] for args in record.calls if args[2].shape == (4, 24)]
    assert rank_rows, "the adapter's up-projection did not go through addmm"
    assert all(m.is_contiguous() for m in rank_rows)
