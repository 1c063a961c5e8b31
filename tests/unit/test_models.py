"""Networks, model cards and the model-folder loader."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from models.folder import (
    CardError,
    ModelCard,
    ModelIntegrityError,
    ModelMismatch,
    ModelNotFound,
    Normalization,
    find_model,
    list_models,
    load_model,
    load_model_folder,
    save_model_folder,
)
from models.networks import (
    ARCHITECTURES,
    UnknownArchitecture,
    architecture_names,
    build_network,
    count_flops,
    count_parameters,
)

torch.set_num_threads(1)

TINY: dict[str, dict[str, Any]] = {
    "red-cnn": {"channels": 4, "kernel_size": 3},
    "unet-res": {"channels": [4, 8], "blocks": 1},
    "unet-res-small": {"channels": [4, 8], "blocks": 1},
    "gan-generator": {"channels": [4, 8], "blocks": 1},
    "patch-critic": {"channels": 4, "layers": 2},
}


def tiny_card(name: str = "tiny", architecture: str = "unet-res-small", **kw) -> ModelCard:
    return ModelCard(
        name=name, version="0.0.1", architecture=architecture, arguments=TINY[architecture], modalities=["CT"],
        normalization=Normalization(input_unit="HU", offset=0.0, scale=1000.0, clip=[-1024.0, 3071.0]), **kw,
    )


def test_registry_has_the_promised_architectures() -> None:
    assert {"red-cnn", "unet-res", "unet-res-small", "gan-generator", "patch-critic"} <= set(ARCHITECTURES)
    assert "patch-critic" not in architecture_names(denoisers_only=True)


def test_unknown_architecture_names_the_known_ones() -> None:
    with pytest.raises(UnknownArchitecture, match="unet-res-small"):
        build_network("no-such-net")


@pytest.mark.parametrize("name", ["red-cnn", "unet-res", "unet-res-small", "gan-generator"])
def test_fresh_denoiser_is_exact_identity_on_odd_sizes(name: str) -> None:
    net = build_network(name, **TINY[name]).eval()
    x = torch.randn(2, 1, 37, 45)
    with torch.inference_mode():
        y = net(x)
    assert y.shape == x.shape
    assert torch.equal(y, x)


def test_denoiser_output_changes_when_residual_layer_is_set() -> None:
    net = build_network("unet-res-small", **TINY["unet-res-small"]).eval()
    tail = net.tail
    assert isinstance(tail, torch.nn.Conv2d)
    with torch.no_grad():
        tail.weight.normal_()
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        assert not torch.equal(net(x), x)


def test_critic_scores_patches() -> None:
    critic = build_network("patch-critic", **TINY["patch-critic"])
    out = critic(torch.randn(2, 1, 64, 64))
    assert out.shape[0] == 2 and out.shape[1] == 1 and out.shape[2] > 1


def test_default_sizes_match_docstring() -> None:
    small = build_network("unet-res-small")
    assert count_parameters(small) == 564420
    assert abs(count_flops(small) / 1e9 - 13.46) < 0.05
    assert count_flops(small) < 50e9  # the CPU budget of the issue


def test_card_round_trip_and_hash(tmp_path: Path) -> None:
    net = build_network("unet-res-small", **TINY["unet-res-small"])
    card = tiny_card(noise={"model": "poisson", "dose_fraction": 0.25}, metrics={"psnr_db": 41.5})
    saved = save_model_folder(net, card, tmp_path / "m")
    assert len(saved.sha256) == 64 and card.sha256 == ""
    loaded = load_model_folder(tmp_path / "m")
    assert loaded.card == saved
    assert not loaded.network.training
    for a, b in zip(net.state_dict().values(), loaded.network.state_dict().values()):
        assert torch.equal(a, b)


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    net = build_network("unet-res-small", **TINY["unet-res-small"])
    save_model_folder(net, tiny_card(), tmp_path / "m")
    weights = tmp_path / "m" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        load_model_folder(tmp_path / "m")


def test_weights_that_do_not_fit_the_card_are_refused(tmp_path: Path) -> None:
    net = build_network("unet-res-small", channels=[8, 16], blocks=1)
    with pytest.raises(ModelIntegrityError, match="do not fit"):
        save_model_folder(net, tiny_card(), tmp_path / "m")


def test_invalid_card_lists_problems() -> None:
    bad = dataclasses.replace(tiny_card(), modalities=["MR"], architecture="patch-critic")
    with pytest.raises(CardError) as info:
        bad.validate()
    text = str(info.value)
    assert "HU only fits CT" in text and "not a registered denoiser" in text


def test_unknown_card_key_is_reported() -> None:
    text = "bogus = 1\n" + tiny_card().to_toml()
    with pytest.raises(CardError, match="bogus"):
        ModelCard.from_toml(text)


def test_check_fits() -> None:
    card = tiny_card()
    card.check_fits("CT", "HU")
    card.check_fits("CT", None)
    with pytest.raises(ModelMismatch, match="for CT series, not MR"):
        card.check_fits("MR")
    with pytest.raises(ModelMismatch, match="rescale type is US"):
        card.check_fits("CT", "US")


def test_find_and_list(tmp_path: Path) -> None:
    net = build_network("unet-res-small", **TINY["unet-res-small"])
    save_model_folder(net, tiny_card(name="ct-tiny"), tmp_path / "folder-a")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "card.toml").write_text("name = 3\n")
    entries = list_models([tmp_path])
    names = {e.card.name for e in entries if e.card}
    assert "ct-tiny" in names
    assert any(e.error for e in entries)
    assert find_model("ct-tiny", [tmp_path]) == tmp_path / "folder-a"
    assert load_model("folder-a", [tmp_path]).card.name == "ct-tiny"
    with pytest.raises(ModelNotFound, match="ct-tiny"):
        find_model("nope", [tmp_path])


def test_no_random_weights_are_bundled() -> None:
    from models.folder import bundled_models_dir

    bundled = bundled_models_dir()
    for entry in list_models([]):
        assert entry.path.parent == bundled
        assert entry.card is not None and entry.card.training, f"{entry.path} has no training record"


def test_card_accepts_numpy_scalars_and_paths_in_free_tables(tmp_path: Path) -> None:
    import numpy as np

    net = build_network("unet-res-small", **TINY["unet-res-small"])
    card = tiny_card(metrics={"psnr_db": np.float32(40.5), "n": np.int64(3), "curve": np.array([1.0, 2.0])},
                     training={"data": tmp_path})
    saved = save_model_folder(net, card, tmp_path / "m")
    loaded = load_model_folder(tmp_path / "m").card
    assert loaded.metrics == {"psnr_db": 40.5, "n": 3, "curve": [1.0, 2.0]} and loaded == saved
    assert loaded.training["data"] == str(tmp_path)


@pytest.mark.parametrize("name,params,gflop", [
    ("red-cnn", 1.85e6, 917), ("unet-res", 4.26e6, 142), ("unet-res-small", 0.56e6, 13.5),
    ("gan-generator", 4.26e6, 142), ("patch-critic", 2.76e6, 25.4),
])
def test_docstring_sizes_are_true(name: str, params: float, gflop: float) -> None:
    import models.networks as networks

    net = build_network(name)
    assert abs(count_parameters(net) - params) / params < 0.01
    assert abs(count_flops(net) / 1e9 - gflop) / gflop < 0.01
    assert f"{gflop:g}" in networks.__doc__  # the module's table states the same figure


def test_context_network_subtracts_its_residual_from_the_centre_frame() -> None:
    net = build_network("unet-res-small", channels=[4, 8], blocks=1, in_channels=3, out_channels=1).eval()
    x = torch.randn(2, 3, 17, 23)
    tail = net.tail
    assert isinstance(tail, torch.nn.Conv2d) and tail.bias is not None
    with torch.no_grad():
        assert torch.equal(net(x), x[:, 1:2])  # the zero-initialised tail predicts no noise yet
        tail.bias.fill_(0.5)
        assert torch.allclose(net(x), x[:, 1:2] - 0.5)


def test_colour_network_keeps_three_channels() -> None:
    net = build_network("unet-res", channels=[4, 8], blocks=1, in_channels=3, out_channels=3).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)


def test_channels_must_be_an_odd_multiple() -> None:
    with pytest.raises(ValueError, match="odd multiple"):
        build_network("unet-res-small", channels=[4, 8], in_channels=2, out_channels=1)


def test_card_and_network_channels_must_agree(tmp_path: Path) -> None:
    args = {**TINY["unet-res-small"], "in_channels": 3, "out_channels": 1}
    card = dataclasses.replace(tiny_card(), arguments=args)  # context 0 claims one slice in
    with pytest.raises(CardError, match="context 0"):
        save_model_folder(build_network("unet-res-small", **args), card, tmp_path / "m")
    good = dataclasses.replace(card, context=1)
    save_model_folder(build_network("unet-res-small", **args), good, tmp_path / "m")
    assert load_model_folder(tmp_path / "m").card.context == 1
    with pytest.raises(CardError, match="samples_per_pixel"):
        ModelCard.from_dict({**good.to_dict(), "samples_per_pixel": 2})


def test_update_card_rewrites_only_the_card_and_refuses_another_models_card(tmp_path: Path) -> None:
    from models.folder import update_card

    net = build_network("unet-res-small", **TINY["unet-res-small"])
    saved = save_model_folder(net, tiny_card(), tmp_path / "m")
    weights = (tmp_path / "m" / "weights.safetensors").read_bytes()
    saved.metrics = {"psnr_db": 41.5}
    assert update_card(saved, tmp_path / "m").metrics == {"psnr_db": 41.5}
    assert (tmp_path / "m" / "weights.safetensors").read_bytes() == weights  # the model's identity is unchanged
    assert load_model_folder(tmp_path / "m").card.metrics == {"psnr_db": 41.5}
    saved.sha256 = "0" * 64
    with pytest.raises(ModelIntegrityError, match="the card is for weights 000000000000"):
        update_card(saved, tmp_path / "m")
