import pytest
import torch
from lora_ops.ema import WeightEMA, closed_form_ema


def test_ema_updates_equal_the_closed_form_average_of_the_recorded_weights():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, generator=gen)
    ema = WeightEMA({"w": weight}, decay=0.9)
    start, recorded = weight.clone(), []
    for _ in range(25):
        weight = weight + torch.randn(3, 5, generator=gen)  # an optimizer step
        recorded.append(weight.clone())
        ema.update({"w": weight})
    expected = closed_form_ema(start, recorded, 0.9)
    torch.testing.assert_close(ema.shadow["w"].double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ema.shadow["w"], weight), "the average lags the raw weights"


def test_ema_continues_from_a_saved_shadow_and_refuses_bad_decay():
    a = torch.ones(2)
    ema = WeightEMA({"a": a}, decay=0.5, shadow={"a": torch.zeros(2)})
    ema.update({"a": a})
    torch.testing.assert_close(ema.shadow["a"], torch.full((2,), 0.5))
    for decay in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="ema_decay"):
            WeightEMA({"a": a}, decay=decay)
    with pytest.raises(ValueError, match="no weights for b"):
        WeightEMA({"a": a, "b": a}, decay=0.9, shadow={"a": a})
