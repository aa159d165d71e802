"""BN folding is checked numerically; pruning reports parameters, MACs and latency before/after."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from edgeport.errors import ConfigError  # noqa: E402
from edgeport.optimize import fold_bn, optimize  # noqa: E402
from edgeport.zoo.net import RoadSegNet  # noqa: E402


def _trained_bn(model):
    # Non-trivial running statistics, so folding has something to get wrong.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 120, 160) * 2 + 0.5)
    return model.eval()


def test_bn_folding_is_exact_enough():
    model = _trained_bn(RoadSegNet())
    x = torch.randn(1, 3, 120, 160)
    ref = model(x)
    fused, n, err = fold_bn(model, x)
    assert n == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 10
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert err < 1e-5
    assert torch.allclose(fused(x), ref, atol=1e-4)


class _Unstable(torch.nn.Module):
    """Conv + BN, then a cancellation that turns float rounding into 1e-3 of the output: as ill-conditioned as
    an untrained efficientnet_v2_s whose activations reach 1e6."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return (self.bn(self.conv(x)) * 1e4 + 3e8) - 3e8


def test_an_unstable_model_is_named_as_such_not_blamed_on_folding():
    from edgeport.errors import ModelError
    from edgeport.optimize import float32_error

    torch.manual_seed(0)
    model = _trained_bn(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)))
    unstable = _Unstable()
    unstable.conv, unstable.bn = model[0], model[1]
    x = torch.randn(1, 3, 120, 160)
    assert float32_error(unstable, x) > 1e-4 and float32_error(model, x) < 1e-6
    with pytest.raises(ModelError, match="numerically unstable in float32.*float64"):
        fold_bn(unstable, x)


def test_pruning_shrinks_the_model_and_keeps_the_head():
    pytest.importorskip("torch_pruning")
    model = _trained_bn(RoadSegNet())
    x = torch.randn(1, 3, 120, 160)
    pruned, report = optimize(model, x, prune_ratio=0.3)
    assert report.after.params < 0.8 * report.before.params
    assert report.after.macs < report.before.macs
    assert report.before.latency_ms > 0 and report.after.latency_ms > 0
    assert pruned(x).shape == (1, 7, 120, 160)


def test_pruning_keeps_the_first_conv_and_ignored_layers_whole_and_takes_ratios_per_type():
    pytest.importorskip("torch_pruning")
    from edgeport.optimize import prune

    x = torch.randn(1, 3, 64, 80)
    base = _trained_bn(RoadSegNet())
    convs = {n: m.out_channels for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d)}
    first = next(iter(convs))
    pruned = prune(_trained_bn(RoadSegNet()), x, 0.5, ignore=[r"^enc3\."])
    after = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert after[first] == convs[first]  # the first convolution keeps its channels
    enc3 = [n for n in convs if n.startswith("enc3.")]
    assert enc3 and all(after[n] == convs[n] for n in enc3)
    assert sum(after.values()) < sum(convs.values())  # the rest was pruned

    def channels(model: torch.nn.Module) -> int:
        return sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))

    plain = channels(prune(_trained_bn(RoadSegNet()), x, 0.5))
    light = channels(prune(_trained_bn(RoadSegNet()), x, 0.5, type_ratios={"Conv2d": 0.1}))
    assert plain < light < sum(convs.values())  # every Conv2d at 0.1, not 0.5
    with pytest.raises(ConfigError, match="prune_ignore 'nothing' matches no layer"):
        prune(_trained_bn(RoadSegNet()), x, 0.3, ignore=["nothing"])
    with pytest.raises(ConfigError, match="no layer of type 'LSTM'"):
        prune(_trained_bn(RoadSegNet()), x, 0.3, type_ratios={"LSTM": 0.2})


def test_finetune_hook_is_called(tmp_path, monkeypatch):
    (tmp_path / "tune_hook.py").write_text("CALLS = []\ndef tune(model, spec):\n    CALLS.append(spec)\n"
                                           "    model.head.bias.data += 1.0\n    return model\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import tune_hook

    model = RoadSegNet().eval()
    x = torch.randn(1, 3, 120, 160)
    before = model(x)
    out, report = optimize(model, x, finetune_hook="tune_hook:tune", spec="S")
    assert tune_hook.CALLS == ["S"] and report.finetuned == "tune_hook:tune"
    assert torch.allclose(out(x), before + 1.0, atol=1e-4)
