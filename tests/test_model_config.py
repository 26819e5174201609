"""ReenactorConfig: presets, JSON round trip, validation; the op selection of reenact.model.ops."""
import json

import pytest
import torch

from model_fixtures import single_thread  # noqa: F401 (autouse fixture)
from reenact.model import LossConfig, ModelConfig, ReenactorConfig, get_ops


@pytest.mark.parametrize("config", [ReenactorConfig.small(64), ReenactorConfig.small(128),
                                    ReenactorConfig.paper()], ids=["small64", "small128", "paper"])
def test_json_round_trip(config, tmp_path):
    path = tmp_path / "config.json"
    config.to_json(path)
    assert ReenactorConfig.from_json(path) == config
    assert ReenactorConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_presets():
    small, paper = ReenactorConfig.small(128), ReenactorConfig.paper()
    assert small.model.resolution == 128 and paper.model.resolution == 256
    # Offline runs have no VGG-19 file; the paper config keeps the perceptual loss on.
    assert small.loss.perceptual == 0 and paper.loss.perceptual > 0
    assert paper.model.temperature == small.model.temperature == 0.01
    assert paper.model.correspondence_channels == 256


def test_missing_keys_take_defaults():
    config = ReenactorConfig.from_dict({"model": {"resolution": 128}})
    assert config.model.resolution == 128
    assert config.loss == LossConfig()


@pytest.mark.parametrize("data, name", [
    ({"modle": {}}, "modle"),
    ({"model": {"resolutoin": 64}}, "resolutoin"),
    ({"loss": {"l1": 1.0}}, "l1"),
])
def test_unknown_keys_are_rejected(data, name):
    with pytest.raises(ValueError, match=name):
        ReenactorConfig.from_dict(data)


@pytest.mark.parametrize("kwargs, error, name", [
    ({"resolution": 60}, ValueError, "resolution"),
    ({"resolution": 16}, ValueError, "resolution"),
    ({"geometry_channels": (8, 16)}, ValueError, "geometry_channels"),
    ({"decoder_channels": (8, 0, 8)}, ValueError, "decoder_channels"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"ops": "cuda"}, ValueError, "ops"),
    ({"correspondence_level": 0}, ValueError, "correspondence_level"),
    ({"geometry_coordinates": 1}, TypeError, "geometry_coordinates"),
    ({"discriminator_scales": 0}, ValueError, "discriminator_scales"),
])
def test_bad_model_config(kwargs, error, name):
    with pytest.raises(error, match=name):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("kwargs, error, name", [
    ({"warp": -1.0}, ValueError, "warp"),
    ({"perceptual": float("nan")}, ValueError, "perceptual"),
    ({"adversarial": "1"}, TypeError, "adversarial"),
    ({"perceptual_layer_weights": (1.0, 1.0)}, ValueError, "perceptual_layer_weights"),
    ({"perceptual_weights_path": 3}, TypeError, "perceptual_weights_path"),
])
def test_bad_loss_config(kwargs, error, name):
    with pytest.raises(error, match=name):
        LossConfig(**kwargs)


def test_from_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.json"):
        ReenactorConfig.from_json(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{model: ")
    with pytest.raises(ValueError, match="broken.json"):
        ReenactorConfig.from_json(broken)


def test_get_ops_selects_the_implementation(monkeypatch):
    import pncc_cuda
    import pncc_cuda.reference

    with pytest.raises(ValueError, match="ops"):
        get_ops("cuda")
    calls = []
    monkeypatch.setattr(pncc_cuda, "corr_warp", lambda *args: calls.append("fused"))
    monkeypatch.setattr(pncc_cuda.reference, "corr_warp_reference",
                        lambda *args: calls.append("reference"))
    x = torch.zeros(1, 1, 1)
    get_ops("reference").corr_warp(x, x, x, 0.01)
    get_ops("fused").corr_warp(x, x, x, 0.01)
    assert calls == ["reference", "fused"]
