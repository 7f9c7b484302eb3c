"""The model family: shapes, features, state dicts, inference fusion, every ablation knob."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import randomize_bn

import cspmirror
from cspmirror import ops
from cspmirror.layers import CSPMirrorStage
from cspmirror.models import MODEL_CONFIGS, configure

FAMILY = cspmirror.list_models()



def test_family_is_registered():
    assert set(FAMILY) == {"cspmirrornet_tiny", "cspmirrornet_s", "cspmirrornet53"}
    assert cspmirror.list_models("*tiny") == ["cspmirrornet_tiny"]
    with pytest.raises(ValueError, match="unknown model"):
        cspmirror.get_model("resnet50")


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("size", [(32, 32), (40, 24)])
def test_forward_backward(name, size):
    model = cspmirror.get_model(name, num_classes=7)
    x = torch.randn(2, 3, *size)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without finite gradients: {missing[:5]}"


def test_count_gmacs_counts_multiply_accumulates():
    """A conv's multiply-accumulates, not its FLOPs (twice as many: FlopCounterMode counts a MAC as 2)."""
    from cspmirror.profile import count_gmacs

    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_gmacs(conv, 16) == pytest.approx(8 * 3 * 9 * 16 * 16 / 1e9)


@pytest.mark.parametrize("name", FAMILY)
def test_features_match_feature_info(name):
    levels = len(MODEL_CONFIGS[name].stages) + 1
    model = cspmirror.get_model(name, features_only=True)
    feats = model(torch.randn(1, 3, 64, 48))
    assert len(feats) == levels == len(model.feature_info)
    for f, info in zip(feats, model.feature_info, strict=True):
        r = info["reduction"]
        assert f.shape == (1, info["num_chs"], -(-64 // r), -(-48 // r))
    sub = cspmirror.get_model(name, features_only=True, out_indices=(-2, -1))
    assert [i["reduction"] for i in sub.feature_info] == [2 ** (levels - 2), 2 ** (levels - 1)]
    with pytest.raises(ValueError, match="out_indices"):
        cspmirror.get_model(name, features_only=True, out_indices=(levels,))


def test_features_only_has_no_stage_after_the_last_level(tmp_path):
    """As timm's feature models: later stages would cost time, update their BatchNorm statistics from outputs
    nobody uses and leave parameters without gradients (plain DDP fails on those). A whole model's
    checkpoint still loads."""
    full = cspmirror.cspmirrornet_tiny(num_classes=3)
    torch.save(full.state_dict(), tmp_path / "full.pth")
    model = cspmirror.cspmirrornet_tiny(features_only=True, out_indices=(2, 1), weights=str(tmp_path / "full.pth"))
    assert len(model.stages) == 2 and model.num_features == model.feature_info[0]["num_chs"] == 64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = full.eval().forward_intermediates(x, [1, 2], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(model.eval()(x)[::-1], expected, strict=True))
    sum(level.sum() for level in model.train()(x)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_features_come_in_the_order_of_out_indices():
    """feature_info[i] describes output i, whatever the order and repeats of out_indices; an int n means the
    last n levels (timm's convention)."""
    x = torch.randn(1, 3, 32, 32)
    for out_indices, levels in [((4, 1), [4, 1]), ((2, 2), [2, 2]), (2, [3, 4])]:
        model = cspmirror.cspmirrornet_tiny(features_only=True, out_indices=out_indices).eval()
        feats = model(x)
        assert list(model.out_indices) == levels
        assert [(f.shape[1], 32 // f.shape[-1]) for f in feats] == \
            [(i["num_chs"], i["reduction"]) for i in model.feature_info]
        assert [i["reduction"] for i in model.feature_info] == [2 ** level for level in levels]
    with pytest.raises(ValueError, match="last 6 levels"):
        cspmirror.cspmirrornet_tiny(features_only=True, out_indices=6)


def test_p3_p5_of_cspmirrornet53():
    model = cspmirror.cspmirrornet53(features_only=True, out_indices=(3, 4, 5))
    feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(256, 8, 8), (512, 4, 4), (1024, 2, 2)]
    assert [i["reduction"] for i in model.feature_info] == [8, 16, 32]


def test_backbone_api():
    model = cspmirror.cspmirrornet_tiny(num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 2, 2)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(feats), model.fc(pooled))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    unpooled = cspmirror.cspmirrornet_tiny(num_classes=0, global_pool="")
    assert unpooled(x).shape == (2, model.num_features, 2, 2)
    with pytest.raises(ValueError, match="a classifier needs pooling"):
        unpooled.reset_classifier(3)  # a Linear over the feature map's width would be silently wrong
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        cspmirror.cspmirrornet_tiny(num_classes=-1)
    with pytest.raises(ValueError, match="features_only model has no head"):
        cspmirror.cspmirrornet_tiny(features_only=True).reset_classifier(3)
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] == "stem.conv" and cfg["classifier"] == "fc" and len(cfg["mean"]) == 3


@pytest.mark.parametrize("name", FAMILY)
def test_state_dict_round_trip(name, tmp_path):
    a = cspmirror.get_model(name, num_classes=4)
    randomize_bn(a)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": a.state_dict()}, path)
    b = cspmirror.get_model(name, num_classes=4, weights=str(path))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    a.eval()
    b.eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(a(x), b(x))


def test_weights_load_into_a_model_without_the_checkpoints_classifier(tmp_path):
    """A classifier checkpoint loads into a backbone (features_only, num_classes=0) and, with a warning and a
    fresh classifier, into a model with another number of classes; torch.compile's and DDP's key prefixes go."""
    trained = randomize_bn(cspmirror.cspmirrornet_tiny(num_classes=10))
    path = tmp_path / "ckpt.pth"
    torch.save({f"_orig_mod.module.{k}": v for k, v in trained.state_dict().items()}, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = trained.eval().forward_intermediates(x, (2, 4), intermediates_only=True)
        backbone = cspmirror.cspmirrornet_tiny(features_only=True, out_indices=(2, 4), weights=str(path)).eval()
        assert all(torch.equal(a, b) for a, b in zip(backbone(x), expected, strict=True))
        headless = cspmirror.cspmirrornet_tiny(num_classes=0, weights=str(path)).eval()
        assert torch.equal(headless(x), trained.forward_head(trained.forward_features(x), pre_logits=True))
    with pytest.warns(UserWarning, match="classifier 'fc' \\(10 classes\\) does not fit the model's \\(3 classes"):
        other = cspmirror.cspmirrornet_tiny(num_classes=3, weights=str(path))
    assert torch.equal(other.stem.conv.weight, trained.stem.conv.weight)


def test_fused_and_unfused_checkpoints_are_told_apart(tmp_path):
    """A checkpoint saved after fuse_for_inference, loaded into a model that is not fused (or the other way round),
    says so, strict or not (was a list of ~160 missing and unexpected keys; not strict, fresh BatchNorm)."""
    model = randomize_bn(cspmirror.cspmirrornet_tiny(num_classes=4))
    plain, fused = tmp_path / "plain.pth", tmp_path / "fused.pth"
    torch.save(model.state_dict(), plain)
    torch.save(cspmirror.fuse_for_inference(copy.deepcopy(model)).state_dict(), fused)
    for strict in (True, False):
        with pytest.raises(ValueError, match="holds a model fused by cspmirror.fuse_for_inference"):
            cspmirror.load_checkpoint(cspmirror.cspmirrornet_tiny(num_classes=4), fused, strict=strict)
        with pytest.raises(ValueError, match="the model is fused .* load it into the model before fusing"):
            cspmirror.load_checkpoint(cspmirror.fuse_for_inference(cspmirror.cspmirrornet_tiny(num_classes=4)),
                                      plain, strict=strict)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # each into its own kind loads as before
        fresh = cspmirror.fuse_for_inference(cspmirror.cspmirrornet_tiny(num_classes=4))
        assert torch.equal(cspmirror.load_checkpoint(fresh, fused)(x), cspmirror.fuse_for_inference(model)(x))
        assert cspmirror.load_checkpoint(cspmirror.cspmirrornet_tiny(num_classes=4), plain) is not None
    partial = tmp_path / "partial.pth"  # BatchNorm statistics without affine weights tell an unfused one too
    torch.save({k: v for k, v in torch.load(plain).items() if not k.endswith("bn.weight")}, partial)
    with pytest.raises(ValueError, match="the model is fused"):
        cspmirror.load_checkpoint(cspmirror.fuse_for_inference(cspmirror.cspmirrornet_tiny(num_classes=4)), partial,
                                  strict=False)


def test_weights_must_be_local(tmp_path):
    with pytest.raises(ValueError, match="local"):
        cspmirror.cspmirrornet_tiny(weights="https://example.com/w.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cspmirror.cspmirrornet_tiny(weights=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("name", FAMILY)
def test_fuse_for_inference_parity(name):
    model = cspmirror.get_model(name, num_classes=10).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        expected = model(x)
        fused = cspmirror.fuse_for_inference(copy.deepcopy(model).train())  # puts the model in eval mode
        got = fused(x)
    assert not any(m.training for m in fused.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    rel = (got - expected).norm() / expected.norm()
    assert rel <= 1e-5, rel
    with pytest.warns(UserWarning, match="training a model fused for inference"):
        fused.train()  # it would train without normalisation


def test_fold_bn_scales_the_convs_own_bias():
    """fold_bn of a conv with a bias (cspmirror's convs have none): bn(conv(x)) in eval mode, the bias scaled too."""
    conv, bn = torch.nn.Conv2d(3, 4, 3, padding=1), randomize_bn(torch.nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 5, 6)
    weight, bias = cspmirror.fold_bn(conv, bn)
    with torch.no_grad():
        expected = bn(conv(x))
    assert torch.allclose(torch.nn.functional.conv2d(x, weight, bias, padding=1), expected, rtol=1e-5, atol=1e-5)


def test_fusing_a_channels_last_model_keeps_its_layout():
    """Folded weights keep a channels_last model's layout (the Triton conv then reads them without a copy)."""
    model = randomize_bn(cspmirror.cspmirrornet_tiny(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = cspmirror.fuse_for_inference(copy.deepcopy(model))(x)
        fused = cspmirror.fuse_for_inference(model.to(memory_format=torch.channels_last))
        got = fused(x.contiguous(memory_format=torch.channels_last))
    weights = [m.weight for m in fused.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert (got - expected).norm() / expected.norm() <= 1e-5


KNOBS = [
    dict(overlap=0.0),
    dict(overlap=1.0),
    dict(mirror=False),
    dict(siamese=False),
    dict(reduce="mean"),
    dict(fusion="concat_first"),
    dict(axis=-2),
    dict(split_stages=(0, 2)),
    dict(split_stages=(False, False, False, False)),
    dict(siamese=False, fusion="concat_first", reduce="mean", mirror=False),
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_ablation_knobs_build_and_run(knobs):
    model = cspmirror.cspmirrornet_tiny(num_classes=3, **knobs)
    out = model(torch.randn(2, 3, 32, 24))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.sum().backward()
    model.eval()
    randomize_bn(model)
    x = torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        rel = (cspmirror.fuse_for_inference(copy.deepcopy(model))(x) - model(x)).norm() / model(x).norm()
    assert rel <= 1e-5


def test_siamese_false_has_two_weight_sets():
    shared = cspmirror.cspmirrornet_tiny()
    separate = cspmirror.cspmirrornet_tiny(siamese=False)
    assert len(separate.stages[0].branches) == 2 and len(shared.stages[0].branches) == 1
    n_shared = sum(p.numel() for p in shared.parameters())
    n_separate = sum(p.numel() for p in separate.parameters())
    assert n_separate > n_shared


def test_split_knob_changes_the_function():
    torch.manual_seed(1)
    a = cspmirror.cspmirrornet_tiny(overlap=0.25).eval()
    b = cspmirror.cspmirrornet_tiny(overlap=0.5).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert not torch.allclose(a(x), b(x))


@pytest.mark.parametrize("split_stages", [None, []], ids=["splitting", "no_stage_splits"])
def test_bad_knobs_raise(split_stages):
    """Also where no stage splits: the knobs are stored in the model's config all the same."""
    for knob, value in (("overlap", 1.5), ("reduce", "max"), ("fusion", "late"), ("axis", 1)):
        with pytest.raises(ValueError, match=knob):
            cspmirror.cspmirrornet_tiny(split_stages=split_stages, **{knob: value})
    with pytest.raises(ValueError, match="split_stages"):
        cspmirror.cspmirrornet_tiny(split_stages=(True,))
    with pytest.raises(TypeError, match="unknown model argument"):
        cspmirror.cspmirrornet_tiny(overlapp=0.3)
    with pytest.raises(TypeError, match="mirror must be True or False"):
        cspmirror.cspmirrornet_tiny(mirror="no")
    with pytest.raises(TypeError, match="siamese must be True or False"):
        cspmirror.cspmirrornet_tiny(siamese=0)


def test_drop_path_rates_rise_linearly_and_leave_eval_unchanged():
    model = cspmirror.cspmirrornet_tiny(num_classes=3, drop_path_rate=0.3)
    rates = [block.drop_path for stage in model.stages for block in stage.branches[0].blocks]
    assert rates[0] == 0.0 and rates[-1] == 0.3 and rates == sorted(rates) and len(set(rates)) == len(rates)
    plain = cspmirror.cspmirrornet_tiny(num_classes=3)
    plain.load_state_dict(model.state_dict())  # stochastic depth adds no parameter or buffer
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))


def test_drop_path_drops_whole_samples_of_the_residual_branch():
    """In training each sample's ``cat([x1, x1 + x2])`` is dropped or scaled by 1 / (1 - rate)."""
    from cspmirror.layers import MishedDenseBlock

    block = MishedDenseBlock(4, drop_path=0.5).train()
    plain = MishedDenseBlock(4).train()
    plain.load_state_dict(block.state_dict())
    x = torch.randn(64, 4, 3, 3)
    branch = plain(x) - x
    dropped = block(x) - x
    zero = dropped.flatten(1).abs().amax(1) == 0
    assert 0 < int(zero.sum()) < 64
    torch.testing.assert_close(dropped[~zero], branch[~zero] * 2, rtol=1e-5, atol=1e-5)


def test_bad_drop_path_rate_raises():
    with pytest.raises(ValueError, match="drop_path_rate must be in"):
        cspmirror.cspmirrornet_tiny(drop_path_rate=1.0)
    with pytest.raises(ValueError, match="drop_path must be in"):
        from cspmirror.layers import MishedDenseBlock

        MishedDenseBlock(4, drop_path=-0.1)


def test_forward_intermediates_follows_timm():
    """timm's signature and semantics: (final features, levels) or the levels alone; ``indices`` as a count
    of last levels, a list (negative from the end) or None (all); ``stop_early`` gives the same levels."""
    model = cspmirror.cspmirrornet_tiny(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, levels = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x)) and len(levels) == len(model.stages) + 1
        assert [t.shape[1] for t in levels] == [16, 32, 64, 128, 256]
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(last_two, levels[-2:], strict=True))
        early = model.forward_intermediates(x, indices=[1, -3], stop_early=True, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(early, [levels[1], levels[2]], strict=True))
    for bad in (0, 6, [5], [-6], []):
        with pytest.raises(ValueError, match="indices must be"):
            model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW'"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_prune_intermediate_layers():
    model = cspmirror.cspmirrornet_tiny(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, levels = model.forward_intermediates(x)
        assert model.prune_intermediate_layers([1, 2]) == [1, 2]
        assert len(model.stages) == 2 and model.num_features == 64 and isinstance(model.fc, torch.nn.Identity)
        final, kept = model.forward_intermediates(x, indices=[1, 2])
    assert torch.equal(final, levels[2]) and all(torch.equal(a, b) for a, b in zip(kept, levels[1:3], strict=True))
    assert model(x).shape == (2, 64, 8, 8)  # the head went with the stages (timm: reset_classifier(0, ""))
    kept_head = cspmirror.cspmirrornet_tiny(num_classes=4).eval()
    kept_head.prune_intermediate_layers([1, 2], prune_head=False)  # stages dropped: the head goes all the same
    assert isinstance(kept_head.fc, torch.nn.Identity) and kept_head(x).shape == (2, 64, 8, 8)


def test_split_stages_by_negative_index():
    """split_stages as stage indices counts negative ones from the end, as Python does."""
    stages = configure(MODEL_CONFIGS["cspmirrornet_tiny"], split_stages=[-1, 0]).stages
    assert [s.split for s in stages] == [True, False, False, True]


@pytest.mark.parametrize("global_pool", ["avg", "max", "avgmax", "catavgmax"])
def test_global_pool_values(global_pool):
    """The pooled features as timm's SelectAdaptivePool2d gives them (avgmax: the mean of the two)."""
    model = cspmirror.cspmirrornet_tiny(num_classes=0, global_pool=global_pool).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 32, 32))
        pooled = model.forward_head(features)
    avg, top = features.mean((2, 3)), features.amax((2, 3))
    expected = {"avg": avg, "max": top, "avgmax": 0.5 * (avg + top), "catavgmax": torch.cat([avg, top], 1)}
    assert torch.allclose(pooled, expected[global_pool], rtol=1e-5, atol=1e-6)


def test_two_branch_stage_keeps_each_section_in_place(device):
    """siamese=False: branch 0 processes the first section (p[:N]), branch 1 the second (p[N:]), and each
    branch's outputs go back to their own half of the batch before the fusion."""
    stage = randomize_bn(CSPMirrorStage(4, 8, depth=1, siamese=False)).to(device).eval()
    x = torch.randn(2, 4, 8, 10, device=device)
    with torch.no_grad():
        h = stage.down(x)
        p = ops.mirror_split(h, 0.25, -1, True)
        first, second = stage.branches[0](p[:2]), stage.branches[1](p[2:])
        parts = [torch.cat([a, b], dim=0) for a, b in zip(first, second, strict=True)]
        expected = stage.final(ops.mirror_fuse(parts, h.shape[-1], 0.25, -1, True))
        torch.testing.assert_close(stage(x), expected, rtol=0, atol=0)
