"""uninext.py as a backbone others build on, as a specification: timm's model contract (the attributes and
methods that timm's tests check of every model and its tools call), safe use after inference mode, and one
clear error for each input that would otherwise fail later. Every mixer in both architectures, on N32 or on
T's layout with one block per stage, so that the whole file runs in seconds. timm itself is not a
requirement: where it is installed, its own feature wrapper and data config are tried too."""

import dataclasses
import io
import re

import pytest
import torch
import torch.nn as nn

import uninext

ALL_MIXERS = list(uninext.MIXERS)
ARCHS = ["uninext", "vanilla"]
EVERY_MODEL = [(m, a) for m in ALL_MIXERS for a in ARCHS]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def small(mixer, arch, **overrides):
    return uninext.create_model("N32", mixer, num_classes=10, arch=arch, **overrides)


def images(batch=2, size=32):
    return torch.randn(batch, 3, size, size)


# ----------------------------------------------------------------------------------------------------------
# Inference mode


@pytest.mark.parametrize("mixer, arch", EVERY_MODEL)
def test_a_forward_under_inference_mode_leaves_later_training_steps_working(mixer, arch):
    """At 48x40 the last stage's 3x3 grid is smaller than N32's window of 4, so the window shrinks: its
    relative index and masks are built and cached by the first forward, here one under inference mode (as
    Lightning validates). Another model's training step must still be able to save them for backward."""
    uninext.blocked_pairs.cache_clear()
    uninext.relative_index.cache_clear()
    x = torch.randn(2, 3, 48, 40)
    with torch.inference_mode():
        small(mixer, arch)(x)
    model = small(mixer, arch)
    model(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# timm's model contract


@pytest.mark.parametrize("mixer, arch", EVERY_MODEL)
def test_the_model_declares_what_timm_reads(mixer, arch):
    model = small(mixer, arch)
    assert model.num_classes == 10 and model.num_features == model.head_hidden_size == 256
    assert model.output_fmt == "NHWC" and model.get_classifier() is model.head
    assert model.feature_info == [dict(num_chs=c, reduction=r, module=f"stages.{i}")
                                  for i, (c, r) in enumerate(zip((32, 64, 128, 256), (2, 4, 8, 16)))]
    assert all(model.get_submodule(f["module"]) is model.stages[i] for i, f in enumerate(model.feature_info))


@pytest.mark.parametrize("mixer, arch", EVERY_MODEL)
def test_pretrained_cfg_names_the_real_first_conv_and_classifier_and_the_final_grid(mixer, arch):
    model = small(mixer, arch).eval()
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert set(cfg) == {"input_size", "pool_size", "crop_pct", "interpolation", "mean", "std", "first_conv",
                        "classifier", "num_classes", "fixed_input_size"}
    keys = model.state_dict().keys()
    assert cfg["first_conv"] + ".weight" in keys and cfg["classifier"] + ".weight" in keys
    assert model.get_submodule(cfg["first_conv"]).in_channels == cfg["input_size"][0] == 3
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)  # ImageNet, 0-1 scale
    features = model.forward_features(torch.randn(1, *cfg["input_size"]))
    assert features.shape[1:3] == cfg["pool_size"]  # NHWC: the spatial axes are 1 and 2


def test_a_grey_model_has_one_mean_and_std_per_channel():
    cfg = uninext.create_model("N32", "conv", in_chans=1).pretrained_cfg
    assert cfg["input_size"] == (1, 32, 32) and len(cfg["mean"]) == len(cfg["std"]) == 1


@pytest.mark.parametrize("mixer, arch", EVERY_MODEL)
def test_reset_classifier_sets_the_classes_and_the_pooling(mixer, arch):
    model = small(mixer, arch).eval()
    x = images()
    model.reset_classifier(0)
    assert model(x).shape == (2, 256) and model.num_classes == 0
    model.reset_classifier(0, "")  # no head, no pooling: the final map, as forward_features gives it
    torch.testing.assert_close(model(x), model.forward_features(x))
    model.reset_classifier(7, "avg")
    assert model(x).shape == (2, 7) and model.num_classes == 7 and model.cfg.global_pool == "avg"
    unpooled = small(mixer, arch, global_pool="").eval()
    assert unpooled(x).shape == (2, 2, 2, 10)  # the head at every position of the final grid


@pytest.mark.parametrize("mixer, arch", EVERY_MODEL)
def test_forward_intermediates_follows_timms_contract(mixer, arch):
    model = small(mixer, arch).eval()
    x = images()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [tuple(m.shape) for m in maps] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
        for info, m in zip(model.feature_info, maps):
            assert m.shape[1] == info["num_chs"] and m.shape[2] == 32 // info["reduction"]
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        for got, want in [(last_two, maps[2:]), (picked, [maps[0], maps[3]])]:
            assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)  # final norm, last map
        assert all(torch.equal(n, m) for n, m in zip(normed[:3], maps[:3]))
        torch.testing.assert_close(normed[3], final.permute(0, 3, 1, 2))
        nhwc = model.forward_intermediates(x, indices=[1], output_fmt="NHWC", intermediates_only=True)
        assert torch.equal(nhwc[0], maps[1].permute(0, 2, 3, 1))


def test_forward_intermediates_stops_early_and_refuses_bad_indices():
    model = small("window", "uninext").eval()
    calls = []
    model.stages[3].register_forward_hook(lambda *args: calls.append("stage 4"))
    maps = model.forward_intermediates(images(), indices=[1], stop_early=True, intermediates_only=True)
    assert [m.shape[1] for m in maps] == [64] and calls == []
    final, maps = model.forward_intermediates(images(), indices=[1], stop_early=True)
    assert final.shape == (2, 8, 8, 64) and calls == []  # the last map computed, without the final norm
    for bad in [0, 5, [4], [-5], "all", []]:
        with pytest.raises(ValueError, match="indices must be None, a count from 1 to 4"):
            model.forward_intermediates(images(), indices=bad)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NHWC'"):
        model.forward_intermediates(images(), output_fmt="NLC")


@pytest.mark.parametrize("mixer, arch", EVERY_MODEL)
def test_prune_intermediate_layers_keeps_what_the_taken_stages_need(mixer, arch):
    model = small(mixer, arch).eval()
    x = images()
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert model.prune_intermediate_layers([0, 1], prune_norm=True) == [0, 1]
        assert len(model.stages) == 2 and isinstance(model.norm, nn.Identity) and model.num_classes == 0
        got = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert [f["module"] for f in model.feature_info] == ["stages.0", "stages.1"]


def test_pruning_stages_without_prune_norm_leaves_a_model_that_still_runs():
    model = small("conv", "uninext").eval()
    model.prune_intermediate_layers([1])
    assert model(images()).shape == (2, 8, 8, 64)  # no head, no pooling, no norm made for stage 4's width


@pytest.mark.parametrize("mixer, arch", EVERY_MODEL)
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(mixer, arch):
    """In training mode with drop path, so that the recomputation must replay the same random draws."""
    model = small(mixer, arch, drop_path=0.2).train()
    x = images()

    def step():
        torch.manual_seed(1)
        model.zero_grad()
        out = model(x)
        out.logsumexp(-1).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    plain = step()
    model.set_grad_checkpointing()
    assert all(stage.grad_checkpointing for stage in model.stages)
    checkpointed = step()
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    for a, b in zip(checkpointed[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torchvisions_feature_extractor_traces_the_model_with_stages_as_leaves():
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    model = small("swin", "uninext").eval()
    extractor = feature_extraction.create_feature_extractor(
        model, {"stages.1": "c3", "stages.3": "c5"}, tracer_kwargs={"leaf_modules": [uninext.Stage]})
    x = images()
    with torch.no_grad():
        out = extractor(x)
        maps = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
    assert torch.equal(out["c3"], maps[1]) and torch.equal(out["c5"], maps[3])  # (B, H, W, C), as the stages give
    with pytest.raises(ValueError, match="expected images of shape"):  # the input checks survive tracing
        extractor(torch.randn(2, 1, 32, 32))


def test_timms_feature_getter_and_data_config_take_the_model():
    """Only where timm is installed (it is not a requirement)."""
    timm_features = pytest.importorskip("timm.models._features")
    timm_data = pytest.importorskip("timm.data")
    model = small("cswin", "uninext").eval()
    x = images()
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=(1, 2, 3), intermediates_only=True)
        net = timm_features.FeatureGetterNet(model, out_indices=(1, 2, 3))
        got = net(x)
    assert net.feature_info.channels() == [64, 128, 256] and net.feature_info.reduction() == [4, 8, 16]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    config = timm_data.resolve_data_config(model=small("conv", "uninext"))
    assert config["input_size"] == (3, 32, 32) and config["mean"] == (0.485, 0.456, 0.406)


# ----------------------------------------------------------------------------------------------------------
# Adding a mixer


class Shift(uninext.Mixer):
    """A toy mixer, as a researcher would add one: every token takes its left neighbour's features."""

    def __init__(self, dim, num_heads, extent, *, index, pos):
        super().__init__()

    def mix(self, x):
        return torch.roll(x, 1, dims=2), x


def test_a_registered_mixer_needs_only_its_class_and_mixer_size(monkeypatch):
    monkeypatch.setitem(uninext.MIXERS, "shift", Shift)
    model = uninext.create_model("N32", "shift", num_classes=10, mixer_size=(0, 0, 0, 0))
    assert model(images()).shape == (2, 10)
    assert all(isinstance(b.mixer.ec, nn.Conv2d) for s in model.stages for b in s.blocks)  # EC came with it
    vanilla = uninext.create_model("N32", "shift", arch="vanilla", mixer_size=(0, 0, 0, 0))
    assert all(b.mixer.ec is None for s in vanilla.stages for b in s.blocks)
    with pytest.raises(ValueError, match="no extents for mixer 'shift': pass mixer_size"):
        uninext.create_model("N32", "shift")


class Forgetful(Shift):
    def mix(self, x):
        return torch.roll(x, 1, dims=2)  # forgot what EC convolves


def test_a_mixer_whose_mix_returns_one_tensor_is_told_what_mix_returns(monkeypatch):
    monkeypatch.setitem(uninext.MIXERS, "forgetful", Forgetful)
    for arch in ARCHS:
        model = uninext.create_model("N32", "forgetful", arch=arch, mixer_size=(0, 0, 0, 0))
        with pytest.raises(TypeError, match=r"Forgetful.mix must return \(output, the map EC convolves\)"):
            model(images())


def test_a_mixer_that_is_not_a_mixer_subclass_is_refused(monkeypatch):
    monkeypatch.setitem(uninext.MIXERS, "plain", nn.Identity)
    with pytest.raises(ValueError, match=r"MIXERS\['plain'\] must be a subclass of uninext.Mixer"):
        uninext.create_model("N32", "plain", mixer_size=(0, 0, 0, 0))


# ----------------------------------------------------------------------------------------------------------
# One clear error for each input that would fail later


@pytest.mark.parametrize("overrides, message", [
    (dict(stem_stride=1), "stem_stride must be 2 (small images) or 4 (ImageNet), got 1"),
    (dict(stem_stride=3), "stem_stride must be 2 (small images) or 4 (ImageNet), got 3"),
    (dict(in_chans=0), "in_chans must be a whole number >= 1, got 0"),
    (dict(img_size=0), "img_size must be a whole number >= 16 (one token in the last stage at stem_stride 2)"),
    (dict(mlp_ratio=0), "mlp_ratio must be a whole number >= 1, got 0"),
    (dict(mlp_ratio=1.5), "mlp_ratio must be a whole number >= 1, got 1.5"),
    (dict(conv_stem="False"), "conv_stem must be True or False, got 'False'"),
    (dict(ec=1), "ec must be True or False, got 1"),
    (dict(global_pool="max"), "global_pool must be 'avg' or '' (no pooling), got 'max'"),
    (dict(head_dim=True), "head_dim must be a whole number >= 1, got True"),
])
def test_bad_config_values_are_refused_at_construction(overrides, message):
    with pytest.raises(ValueError, match=rf"^{re.escape(message)}"):
        uninext.config("N32", "window", **overrides)


@pytest.mark.parametrize("mixer, extents, message", [
    ("conv", (6, 7, 7, 7), "the conv mixer's extents (mixer_size) must be >= 1 and odd, got (6, 7, 7, 7)"),
    ("conv", (0, 7, 7, 7), "the conv mixer's extents (mixer_size) must be >= 1 and odd"),
    ("pool", (3, 2, 3, 3), "the pool mixer's extents (mixer_size) must be >= 1 and odd"),
    ("pvt", (4, 2, 0, 1), "the pvt mixer's extents (mixer_size) must be >= 1, got (4, 2, 0, 1)"),
])
def test_extents_a_mixer_cannot_use_are_refused(mixer, extents, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        uninext.create_model("N32", mixer, mixer_size=extents)


def test_extent_zero_is_the_whole_grid_for_window_mixers():
    for mixer in ["window", "swin", "cswin", "global", "identity"]:
        assert uninext.create_model("N32", mixer, mixer_size=(0, 0, 0, 0))(images()).shape == (2, 1000)


def test_per_stage_lists_become_tuples_so_that_a_config_hashes():
    cfg = uninext.config("N32", "window", dims=[32, 64, 128, 256], depths=[1, 1, 1, 1])
    assert cfg.dims == (32, 64, 128, 256) and cfg.depths == (1, 1, 1, 1) and hash(cfg)


def test_an_unknown_mixer_in_config_is_refused():
    with pytest.raises(ValueError, match="mixer must be one of pool, conv, window, .* got 'foo'"):
        uninext.Config(mixer="foo")


def checkpoint_bytes(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


def real_checkpoint():
    model = small("conv", "uninext")
    return {"model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg),
            "normalisation": {"mean": torch.tensor([72.9] * 3), "std": torch.tensor([90.0] * 3)}}


class Code:
    """Pickled as a reference to code, which weights_only loading refuses."""


def bad_checkpoints():
    good = real_checkpoint()
    buffer = io.BytesIO()
    torch.save(good, buffer)
    whole = buffer.getvalue()
    missing = dict(good, model={k: v for k, v in good["model"].items() if not k.startswith("head")})
    extra = dict(good, model=dict(good["model"], **{"stages.0.extra": torch.zeros(1)}))
    return {
        "truncated": (whole[:len(whole) // 2], "torch cannot read it"),
        "random bytes": (bytes(range(256)) * 40, "not a torch file"),
        "pickled code": ({"model": Code()}, "objects other than tensors and plain values"),
        "another model's weights": (nn.Linear(3, 2).state_dict(), "lacks model_config or model or normalisation"),
        "missing keys": (missing, "Missing key"),
        "extra keys": (extra, "Unexpected key"),
        "unknown config field": (dict(good, model_config=dict(good["model_config"], width=3)), "width"),
        "no std": (dict(good, normalisation={"mean": torch.zeros(3)}), "'std'"),
        "std of 0": (dict(good, normalisation={"mean": torch.zeros(3), "std": torch.zeros(3)}), "positive std"),
    }


@pytest.mark.parametrize("case", list(bad_checkpoints()))
def test_load_of_anything_but_our_checkpoint_raises_one_value_error_naming_the_file(case, tmp_path):
    content, reason = bad_checkpoints()[case]
    path = checkpoint_bytes(tmp_path, "bad.pt", content)
    with pytest.raises(ValueError) as error:
        uninext.load(path)
    message = str(error.value)
    assert str(path) in message and reason in message
    assert "weights_only=False" not in message and "weights_only" not in message.split(":")[0]


def test_load_gives_the_training_normalisation_on_timms_scale(tmp_path):
    path = checkpoint_bytes(tmp_path, "good.pt", real_checkpoint())
    cfg = uninext.load(path).pretrained_cfg
    assert cfg["mean"] == pytest.approx((72.9 / 255,) * 3) and cfg["std"] == pytest.approx((90 / 255,) * 3)
    assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == 1.0


def test_record_attention_of_something_that_is_not_a_model_says_so():
    with pytest.raises(TypeError, match="record_attention takes a model .* got NoneType"):
        with uninext.record_attention(None):
            pass

