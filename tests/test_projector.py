"""Projector: SwooshR values, frame concatenation order, lengths, key layout, linear1/2 mapping."""
import math

import pytest
import torch

from llmasr.checkpoint import remap_linear12_keys
from llmasr.projector import Projector, swoosh_r


def _swoosh_r_ref(x: float) -> float:
    # log(1 + exp(x - 1)) - 0.08 x - 0.313261687 in double precision, overflow-safe by hand
    z = x - 1.0
    softplus = z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))
    return softplus - 0.08 * x - 0.313261687


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_swoosh_r_values(dtype, tol):
    xs = [-200.0, -30.0, -3.0, -1.0, -0.5, 0.0, 0.3, 1.0, 2.5, 10.0, 19.0, 21.0, 25.0, 90.0, 1000.0]
    got = swoosh_r(torch.tensor(xs, dtype=dtype))
    for x, g in zip(xs, got.tolist()):
        ref = _swoosh_r_ref(x)
        assert abs(g - ref) <= tol * max(1.0, abs(ref)), (x, g, ref)
    # SwooshR(0) = 0 up to the rounding of the constant
    assert abs(swoosh_r(torch.zeros(1, dtype=torch.float64)).item()) < 1e-9


def test_swoosh_r_finite_in_half_precision():
    x = torch.tensor([-60000.0, -5.0, 0.0, 5.0, 11.5, 15.0, 30.0, 60000.0], dtype=torch.float16)
    y = swoosh_r(x)
    assert torch.isfinite(y).all()
    for xi, yi in zip(x.tolist()[1:-1], y.tolist()[1:-1]):
        assert abs(yi - _swoosh_r_ref(xi)) < 2e-2, (xi, yi)
    # large x: x - 1 - 0.08 x - c = 0.92 x - 1.313..
    assert abs(y[-1].item() - (0.92 * 60000 - 1.313261687)) / (0.92 * 60000) < 2e-3


def test_projector_concatenates_frames_and_drops_tail():
    torch.manual_seed(0)
    c, h, k = 3, 5, 4
    proj = Projector(c, h, k, activation="swooshr").eval()
    x = torch.randn(2, 11, c)  # 11 frames: 2 groups, 3 trailing frames dropped
    lens = torch.tensor([11, 6])
    y, ylens = proj(x, lens)
    assert y.shape == (2, 2, h)
    assert ylens.tolist() == [2, 1]
    w1, b1 = proj.proj[1].weight, proj.proj[1].bias
    w2, b2 = proj.proj[3].weight, proj.proj[3].bias
    for n in range(2):
        for j in range(2):
            # frame-major concatenation: [x[4j] | x[4j+1] | x[4j+2] | x[4j+3]]
            v = torch.cat([x[n, k * j + i] for i in range(k)])
            z = w1 @ v + b1
            z = torch.log1p(torch.exp(z - 1)) - 0.08 * z - 0.313261687
            ref = w2 @ z + b2
            torch.testing.assert_close(y[n, j], ref, rtol=1e-5, atol=1e-6)


def test_projector_state_dict_layout_and_dropout():
    proj = Projector(48, 64, 4)
    shapes = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
    assert shapes == {
        "proj.1.weight": (64, 192),
        "proj.1.bias": (64,),
        "proj.3.weight": (64, 64),
        "proj.3.bias": (64,),
    }
    assert isinstance(proj.proj[0], torch.nn.Dropout) and proj.proj[0].p == 0.1
    # dropout is active in training mode only
    x = torch.ones(1, 40, 48)
    proj.train()
    a, _ = proj(x, torch.tensor([40]))
    b, _ = proj(x, torch.tensor([40]))
    assert not torch.equal(a, b)
    proj.eval()
    a, _ = proj(x, torch.tensor([40]))
    b, _ = proj(x, torch.tensor([40]))
    assert torch.equal(a, b)


def test_relu_projector_from_linear12_state_dict():
    torch.manual_seed(1)
    enc, llm, k = 6, 8, 2
    lin1 = torch.nn.Linear(enc * k, llm)
    lin2 = torch.nn.Linear(llm, llm)
    sd = {
        "encoder_projector.linear1.weight": lin1.weight.detach().clone(),
        "encoder_projector.linear1.bias": lin1.bias.detach().clone(),
        "encoder_projector.linear2.weight": lin2.weight.detach().clone(),
        "encoder_projector.linear2.bias": lin2.bias.detach().clone(),
        "llm.something": torch.zeros(1),
    }
    mapped = remap_linear12_keys(sd, prefix="encoder_projector.")
    assert set(mapped) == {
        "encoder_projector.proj.1.weight",
        "encoder_projector.proj.1.bias",
        "encoder_projector.proj.3.weight",
        "encoder_projector.proj.3.bias",
        "llm.something",
    }
    proj = Projector(enc, llm, k, activation="relu").eval()
    proj.load_state_dict({k_[len("encoder_projector."):]: v for k_, v in mapped.items() if k_.startswith("encoder_")})
    x = torch.randn(3, 7, enc)
    y, lens = proj(x, torch.tensor([7, 5, 2]))
    ref = lin2(torch.relu(lin1(x[:, :6].reshape(3, 3, enc * k))))
    torch.testing.assert_close(y, ref)
    assert lens.tolist() == [3, 2, 1]


def test_projector_rejects_bad_input():
    with pytest.raises(ValueError, match="activation"):
        Projector(4, 4, 2, activation="tanhh")
    with pytest.raises(ValueError, match="encoder_dim=4"):
        Projector(4, 4, 2)(torch.zeros(1, 8, 5), torch.tensor([8]))
