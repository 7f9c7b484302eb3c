"""timm integration (cspmirror.integrations.timm) and FX feature extraction (cspmirror.integrations.fx)."""

from __future__ import annotations

import copy

import pytest
import torch

import cspmirror
from cspmirror.integrations import fx

timm = pytest.importorskip("timm")
ct = pytest.importorskip("cspmirror.integrations.timm")


def _x(size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def _native_state(state: dict) -> dict:
    """Keys of a timm feature wrapper (flattened ``stages_i``, FX ``graph_module.`` prefix) as in the
    cspmirror model."""
    return {k.removeprefix("graph_module.").replace("stages_", "stages.", 1): v for k, v in state.items()}


@pytest.fixture(scope="module")
def net53():
    """timm's cspmirrornet53 with 10 classes (built once: 27M parameters)."""
    return timm.create_model("cspmirrornet53", num_classes=10).eval()


def test_register_is_idempotent_and_lists_the_family():
    assert ct.register() == ct.register() == cspmirror.list_models()
    assert set(cspmirror.list_models()) <= set(timm.list_models("cspmirror*"))
    assert all(timm.is_model(name) for name in cspmirror.list_models())


def test_create_model_classifier_and_head_api(net53):
    model = copy.deepcopy(net53)
    assert isinstance(model, cspmirror.CSPMirrorNet)
    x = _x(64, batch=1)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        assert feats.shape == (1, model.num_features, 2, 2)
        assert logits.shape == (1, 10) and torch.equal(model.forward_head(feats), logits)
        assert model.forward_head(feats, pre_logits=True).shape == (1, model.num_features)
        model.reset_classifier(5)
        assert model.get_classifier().out_features == 5
        assert model.forward_head(feats).shape == (1, 5)
        model.reset_classifier(0)
        assert model.forward_head(feats).shape == (1, model.num_features)
        model.reset_classifier(0, "")  # timm: no classifier and no pooling gives the feature map
        assert model.forward_head(feats).shape == (1, model.num_features, 2, 2)


@pytest.mark.parametrize("name", ["cspmirrornet_tiny", "cspmirrornet53"])
def test_pretrained_cfg_follows_timm_conventions(name, net53):
    model = net53 if name == "cspmirrornet53" else timm.create_model(name, num_classes=10).eval()
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name
    assert cfg["input_size"][0] == 3
    reduction = model.feature_info[-1]["reduction"]
    assert tuple(cfg["pool_size"]) == (cfg["input_size"][1] // reduction, cfg["input_size"][2] // reduction)
    if name == "cspmirrornet_tiny":  # the forward at input_size gives pool_size (a 256x256 forward of 53 is slow)
        with torch.no_grad():
            pooled = model.forward_features(torch.randn(1, *cfg["input_size"]))
        assert tuple(pooled.shape[-2:]) == tuple(cfg["pool_size"])
    first = model.get_submodule(cfg["first_conv"])
    assert isinstance(first, torch.nn.Conv2d) and first.in_channels == 3
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == cfg["input_size"] and data_cfg["mean"] == cfg["mean"]


def test_in_chans_and_knobs_pass_through():
    model = timm.create_model("cspmirrornet_tiny", num_classes=3, in_chans=1, overlap=0.5, siamese=False,
                              reduce="mean", split_stages=(0, 2), drop_rate=0.1, drop_path_rate=0.2)
    assert model.stem.conv.in_channels == 1 and model.drop_rate == 0.1
    assert model.stages[-1].branches[0].blocks[-1].drop_path == 0.2
    assert (model.cfg.overlap, model.cfg.siamese, model.cfg.reduce) == (0.5, False, "mean")
    assert [s.split for s in model.cfg.stages] == [True, False, True, False]
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)


def test_features_only_out_indices_cspmirrornet53():
    model = timm.create_model("cspmirrornet53", features_only=True, out_indices=(3, 4, 5), pretrained=False)
    assert model.feature_info.channels() == [256, 512, 1024]
    assert model.feature_info.reduction() == [8, 16, 32]
    with torch.no_grad():
        outs = model.eval()(_x(64, batch=1))
    assert [tuple(o.shape) for o in outs] == [(1, 256, 8, 8), (1, 512, 4, 4), (1, 1024, 2, 2)]


@pytest.mark.parametrize("feature_cls", ["list", "hook", "fx"])
def test_features_only_matches_native_features(feature_cls):
    """timm's feature wrappers give the levels of cspmirror's own features_only model, same weights."""
    wrapped = timm.create_model("cspmirrornet_tiny", features_only=True, out_indices=(1, 2, 4),
                                feature_cls=feature_cls).eval()
    native = cspmirror.cspmirrornet_tiny(features_only=True, out_indices=(1, 2, 4)).eval()
    native.load_state_dict(_native_state(wrapped.state_dict()))
    x = _x()
    with torch.no_grad():
        got, expected = wrapped(x), native(x)
    got = list(got.values()) if isinstance(got, dict) else got
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


def test_features_only_getter_prunes_and_matches_native_levels():
    """``feature_cls="getter"``: timm's wrapper over ``forward_intermediates`` and
    ``prune_intermediate_layers`` (stages past the last level asked for are dropped)."""
    torch.manual_seed(0)
    native = cspmirror.cspmirrornet_tiny().eval()
    getter = timm.create_model("cspmirrornet_tiny", features_only=True, feature_cls="getter", out_indices=(1, 2))
    getter.model.load_state_dict(native.state_dict(), strict=False)
    assert len(getter.model.stages) == 2 and getter.feature_info.channels() == [32, 64]
    x = _x()
    with torch.no_grad():
        levels = native.forward_intermediates(x, intermediates_only=True)
        got = getter.eval()(x)
    assert all(torch.equal(a, b) for a, b in zip(got, levels[1:3], strict=True))


def test_local_pretrained_weights_and_checkpoint_path(tmp_path):
    source = timm.create_model("cspmirrornet_tiny").eval()
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    x = _x()
    with torch.no_grad():
        expected = source(x)
        by_file = timm.create_model("cspmirrornet_tiny", pretrained=True,
                                    pretrained_cfg_overlay=dict(file=str(path))).eval()
        assert torch.equal(by_file(x), expected)
        by_ckpt = timm.create_model("cspmirrornet_tiny", checkpoint_path=str(path)).eval()
        assert torch.equal(by_ckpt(x), expected)
        # A different class count keeps the backbone and drops the classifier, as for timm's models.
        head10 = timm.create_model("cspmirrornet_tiny", pretrained=True, num_classes=10,
                                   pretrained_cfg_overlay=dict(file=str(path))).eval()
        assert torch.equal(head10.forward_features(x), source.forward_features(x))


def test_pretrained_without_weights_raises_and_downloads_nothing():
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("cspmirrornet_tiny", pretrained=True)


# -------------------------------------------------------------------------------- FX feature extraction


def test_fx_leaves_listed():
    kwargs = fx.tracer_kwargs()
    assert {cspmirror.BatchNormMish2d, cspmirror.MirrorSplit, cspmirror.MirrorFuse} <= set(kwargs["leaf_modules"])
    ops_fns = {cspmirror.ops.mirror_split, cspmirror.ops.mirror_fuse, cspmirror.ops.bn_mish,
               cspmirror.ops.conv_bn_mish}
    assert ops_fns <= set(kwargs["autowrap_functions"])
    assert cspmirror.ops in kwargs["autowrap_modules"]


def test_fx_node_names_show_the_stage_structure():
    model = cspmirror.cspmirrornet_tiny()
    train_nodes, eval_nodes = fx.get_graph_node_names(model)
    for nodes in (train_nodes, eval_nodes):
        for name in ("stem.conv", "stem.bn", "stages.0.down.bn", "stages.0.split", "stages.0.fuse",
                     "stages.3.final.bn", "fc"):
            assert name in nodes, name


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_torchvision_feature_extractor_matches_native(fused):
    model = cspmirror.cspmirrornet_tiny(num_classes=10).eval()
    if fused:
        cspmirror.fuse_for_inference(model)
    extractor = fx.create_feature_extractor(
        model, {"stages.1": "p2", "stages.2": "p3", "stages.3": "p4", "fc": "logits"})
    x = _x()
    with torch.no_grad():
        got = extractor(x)
        levels = model.forward_intermediates(x, intermediates_only=True)
        expected = {"p2": levels[2], "p3": levels[3], "p4": levels[4], "logits": model(x)}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    call_targets = {n.target for n in extractor.graph.nodes if n.op == "call_function"}
    if fused:
        assert cspmirror.ops.conv_bn_mish in call_targets


def test_fx_trained_extractor_keeps_bn_statistics_updates():
    model = cspmirror.cspmirrornet_tiny().train()
    extractor = fx.create_feature_extractor(model, ["stages.3"])
    before = model.stem.bn.num_batches_tracked.clone()
    extractor(_x())["stages.3"].sum().backward()
    assert extractor.stem.bn.num_batches_tracked == before + 1
    assert extractor.stem.conv.weight.grad is not None


def test_fx_traces_a_model_that_wraps_the_backbone():
    """The leaves apply inside any wrapper, not only when a CSPMirrorNet is the traced root."""
    backbone = cspmirror.cspmirrornet_tiny(num_classes=10).eval()
    wrapper = torch.nn.Sequential(backbone).eval()
    extractor = fx.create_feature_extractor(wrapper, {"0.stages.2": "p3", "0.fc": "logits"})
    x = _x()
    with torch.no_grad():
        got = extractor(x)
        assert torch.equal(got["p3"], backbone.forward_intermediates(x, intermediates_only=True)[3])
        assert torch.equal(got["logits"], backbone(x))


def test_group_matcher_and_layer_decay():
    """timm's parameter groups from ``group_matcher``: the stem first, each dense block its own group (both
    branches of a stage's block together) with the stage's transitions and final conv joining its last block,
    the classifier last; coarse: one group per stage. ``layer_decay`` optimizers build from them."""
    from timm.models import group_parameters
    from timm.optim import create_optimizer_v2

    model = timm.create_model("cspmirrornet_tiny", num_classes=10, siamese=False)
    names = [name for name, _ in model.named_parameters()]
    groups = [sorted(g) for g in group_parameters(model, model.group_matcher()).values()]
    assert sorted(n for g in groups for n in g) == sorted(names)  # each parameter in exactly one group
    assert all(n.startswith("stem.") for n in groups[0]) and groups[-1] == ["fc.bias", "fc.weight"]
    stages = len(model.stages)
    depths = [len(stage.branches[0].blocks) for stage in model.stages]
    assert len(groups) == 2 + sum(max(d, 1) for d in depths)
    block = next(g for g in groups if any(".branches.0.blocks.0." in n for n in g))
    assert any(".branches.1.blocks.0." in n for n in block)  # siamese=False: two branches, one group
    last_of_stage = next(g for g in groups if "stages.0.final.conv.weight" in g)
    assert any(f".blocks.{depths[0] - 1}." in n for n in last_of_stage)
    assert any(".transition." in n for n in last_of_stage)
    assert len(group_parameters(model, model.group_matcher(coarse=True))) == stages + 2
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1, layer_decay=0.75)
    scales = sorted({g["lr_scale"] for g in optimizer.param_groups})
    assert len(scales) == len(groups) and scales[-1] == 1.0
    model(_x()).sum().backward()
    optimizer.step()


# ------------------------------------------------------------------ parity with timm's generic model tests


def test_fx_feature_model_built_under_no_grad():
    """timm's test_model_forward_fx traces under torch.inference_mode: the trace must not take the no-autograd
    path of the dense blocks (dtype branch, writes into buffer slices), which a symbolic trace cannot follow."""
    x = _x()
    with torch.inference_mode():
        wrapped = timm.create_model("cspmirrornet_tiny", features_only=True, feature_cls="fx",
                                    out_indices=(2, 4)).eval()
        native = cspmirror.cspmirrornet_tiny(features_only=True, out_indices=(2, 4)).eval()
        native.load_state_dict(_native_state(wrapped.state_dict()))
        assert all(torch.equal(a, b) for a, b in zip(wrapped(x), native(x), strict=True))
        model = cspmirror.cspmirrornet_tiny().eval()
        extractor = fx.create_feature_extractor(model, {"fc": "logits"})
        assert torch.equal(extractor(x)["logits"], model(x))
    assert wrapped.feature_info.channels() == [64, 256]


def test_feature_cfg_keyword_is_merged():
    model = timm.create_model("cspmirrornet_tiny", features_only=True,
                              feature_cfg=dict(feature_cls="hook", out_indices=(1, 3)))
    assert isinstance(model, timm.models.FeatureHookNet)
    assert model.feature_info.channels() == [32, 128]


def test_data_knobs_reach_pretrained_cfg():
    """mean / std / default_size change the data config, as for cspmirror's own builder."""
    kwargs = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), default_size=64)
    model = timm.create_model("cspmirrornet_tiny", **kwargs)
    expected = timm.data.resolve_data_config({}, model=cspmirror.get_model("cspmirrornet_tiny", **kwargs))
    assert timm.data.resolve_data_config({}, model=model) == expected
    assert model.pretrained_cfg["pool_size"] == (4, 4)
    overlaid = timm.create_model("cspmirrornet_tiny", mean=(0.5, 0.5, 0.5),
                                 pretrained_cfg_overlay=dict(mean=(0.1, 0.2, 0.3)))
    assert overlaid.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)


@pytest.mark.parametrize("global_pool", ["avg", "max", "avgmax", "catavgmax"])
def test_global_pool_types_as_timm(global_pool):
    model = timm.create_model("cspmirrornet_tiny", global_pool=global_pool, num_classes=0).eval()
    mult = 2 if global_pool == "catavgmax" else 1
    with torch.no_grad():
        assert model(_x()).shape == (2, mult * model.num_features)
        assert model.head_hidden_size == mult * model.num_features
        model.reset_classifier(5)
        assert model(_x()).shape == (2, 5)
    with pytest.raises(ValueError, match="global_pool must be one of"):
        model.reset_classifier(5, "fancy")


def test_output_stride_native_only():
    assert timm.create_model("cspmirrornet_tiny", output_stride=16).feature_info[-1]["reduction"] == 16
    with pytest.raises(ValueError, match="output_stride=8 is not supported"):
        timm.create_model("cspmirrornet_tiny", output_stride=8)
