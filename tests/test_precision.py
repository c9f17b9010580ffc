"""AXX_PRECISION: `auto` picks bf16 only where the hardware has it; bf16 backbones feed fp32 heads and statistics."""

import pytest
import torch

from axx_backend.core.settings import Settings
from axx_backend.engine.annotator import Annotator
from axx_backend.engine.ensemble import Ensemble, resolve_precision


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"), [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")]
)
def test_auto_precision_follows_the_cpu(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    # an explicit choice is kept whatever the CPU
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        Settings(precision="fp16").validate()


def test_bf16_backbones_give_fp32_outputs_close_to_fp32():
    torch.manual_seed(0)
    ensemble = Ensemble.build(["mobilenetv2_100"], ["a", "b"], weights="random")
    images = torch.rand(2, 3, 96, 96)
    outputs = {}
    for precision in ("fp32", "bf16"):
        generator = torch.Generator().manual_seed(0)
        outputs[precision] = ensemble.forward_mc(images, 8, generator, precision)[0]
    full, half = outputs["fp32"], outputs["bf16"]
    # the heads, the MC statistics and the CAMs read fp32 tensors in both cases
    assert half.features.dtype == half.logits.dtype == half.mc_probs.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa (rounding 2^-9 per operation, grown through ~50 layers): the features are
    # near the fp32 reference in relative L2 norm, but not equal
    error = (half.features - full.features).norm() / full.features.norm()
    assert 0 < error < 0.1
    assert torch.allclose(half.mc_probs, full.mc_probs, atol=0.02)


def test_annotator_resolves_auto_once(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    ensemble = Ensemble.build(["mobilenetv2_100"], ["a", "b"], weights="random")
    assert Annotator(ensemble, Settings(device="cpu")).precision == "fp32"
    assert Annotator(ensemble, Settings(device="cpu", precision="bf16")).precision == "bf16"
