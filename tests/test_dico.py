import pytest
import torch
import torch.nn.functional as F

from effigen.convert.dico_official import dico_config_from_state_dict, load_official_dico
from effigen.models.dico import DICO_PRESETS, DiCo, DiCoBlock, DiCoConfig
from effigen.nn.taps import Taps

from conftest import randomize


def tiny(**kw):
    return DiCoConfig(**{**dict(input_size=8, in_channels=3, hidden_size=8, depth=[1, 1, 1, 1, 1], num_classes=4), **kw})


@pytest.mark.parametrize("channels, size, learn_sigma", [(3, 8, False), (4, 8, True), (1, 12, True)])
def test_forward_shapes_pixels_and_latents(channels, size, learn_sigma):
    model = randomize(DiCo(tiny(in_channels=channels, input_size=size, learn_sigma=learn_sigma)))
    out = model(torch.randn(2, channels, size, size), torch.rand(2), torch.tensor([0, 4]))  # 4 = null class
    assert out.shape == (2, channels * (2 if learn_sigma else 1), size, size) and torch.isfinite(out).all()


def test_initial_output_is_zero_and_blocks_start_as_identity():
    model = DiCo(tiny())
    assert torch.count_nonzero(model(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1]))) == 0
    block, x = model.encoder_level_1[0], torch.randn(2, 8, 8, 8)
    assert torch.equal(block(x, torch.randn(2, 8)), x)


def test_conditioning_changes_output():
    model = randomize(DiCo(tiny()))
    x = torch.randn(1, 3, 8, 8)
    a = model(x, torch.tensor([0.3]), torch.tensor([0]))
    assert not torch.allclose(a, model(x, torch.tensor([0.3]), torch.tensor([1])))
    assert not torch.allclose(a, model(x, torch.tensor([0.7]), torch.tensor([0])))


def test_block_follows_its_equations():
    torch.manual_seed(0)
    block, n = randomize(DiCoBlock(6, 2.0), std=0.3), 6
    x, c = torch.randn(2, n, 5, 5), torch.randn(2, n)
    s1, sc1, g1, s2, sc2, g2 = (v[:, :, None, None] for v in block.adaLN_modulation(c).chunk(6, dim=1))

    def ln(z):
        mu, var = z.mean(1, keepdim=True), z.var(1, unbiased=False, keepdim=True)
        return (z - mu) / torch.sqrt(var + 1e-6)

    a = F.gelu(block.conv2(block.conv1(ln(x) * (1 + sc1) + s1)))
    assert block.conv2.groups == n and block.conv2.kernel_size == (3, 3)  # depthwise 3x3
    gap = a.mean(dim=(2, 3), keepdim=True)  # (B, n, 1, 1)
    weight = block.ca[1].weight.view(n, n)  # compact channel attention: a full n -> n map, no reduction
    attention = torch.sigmoid(torch.einsum("oi,bi->bo", weight, gap.flatten(1)) + block.ca[1].bias)
    assert attention.shape == (2, n)
    y = x + g1 * block.conv3(a * attention[:, :, None, None])
    y = y + g2 * block.conv5(F.gelu(block.conv4(ln(y) * (1 + sc2) + s2)))
    assert torch.allclose(block(x, c), y, atol=1e-5)


def test_unet_levels_shapes():
    model = DiCo(tiny(hidden_size=8))
    x = model.x_embedder.proj(torch.randn(1, 3, 8, 8))
    assert model.down1_2(x).shape == (1, 16, 4, 4)
    assert model.down2_3(model.down1_2(x)).shape == (1, 32, 2, 2)
    assert model.up3_2(torch.randn(1, 32, 2, 2)).shape == (1, 16, 4, 4)


def test_odd_sizes_are_a_clear_error():
    with pytest.raises(ValueError, match=r"multiple of 4; got 30 \(nearby allowed sizes: .*28, 32"):
        DiCoConfig(input_size=30)
    model = DiCo(tiny())
    with pytest.raises(ValueError, match=r"expects inputs of shape \(B, 3, H, W\) with H and W multiples of 4"):
        model(torch.randn(1, 3, 10, 10), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 8, 8), torch.rand(1), torch.tensor([0]))
    # fully convolutional: other multiples of 4 run (LowDiff's cascade feeds one DiCo 8, 16 and 32 px)
    assert model(torch.randn(2, 3, 16, 12), torch.rand(2), torch.tensor([0, 1])).shape == (2, 3, 16, 12)
    with pytest.raises(ValueError, match="5 block counts"):
        DiCoConfig(depth=[1, 1, 1])


def test_block_taps_in_forward_order():
    model = randomize(DiCo(tiny(depth=[1, 1, 2, 1, 1])))
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])
    out, features = model(x, t, y, taps=Taps(blocks=(0, 2, 5)))
    assert torch.equal(out, model(x, t, y))
    assert features.blocks[0].shape == (2, 64, 8) and features.blocks[2].shape == (2, 4, 32)
    assert features.blocks[5].shape == (2, 64, 16)  # decoder level 1 runs at twice the width
    with pytest.raises(ValueError, match="0..5"):
        model(x, t, y, taps=Taps(blocks=(6,)))
    with pytest.raises(ValueError, match="no self-attention"):
        model(x, t, y, taps=Taps(attention=(0,)))


def test_official_presets_parameter_counts():
    # DiCo-S: 33.1M parameters on 32x32x4 latents with 1000 classes and learned sigma (paper Table 1)
    model = DiCo(DiCoConfig(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, **DICO_PRESETS["DiCo-S"]))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 33.1


def test_config_is_read_off_an_official_state_dict(tmp_path):
    config = tiny(depth=[2, 1, 3, 1, 2], mlp_ratio=4.0, in_channels=4, learn_sigma=True, num_classes=7)
    model = randomize(DiCo(config))
    torch.save({"model": {}, "ema": model.state_dict(), "opt": {}, "args": {}}, tmp_path / "ckpt.pt")
    assert dico_config_from_state_dict(model.state_dict(), input_size=8) == config
    loaded = load_official_dico(tmp_path / "ckpt.pt", input_size=8)
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(loaded(x, torch.rand(1) * 0 + 0.5, torch.tensor([3])), model.eval()(x, torch.tensor([0.5]), torch.tensor([3])))


@pytest.mark.parametrize("preset, method", [("mnist-dico", "dico-ddpm"), ("mnist-dico-flow", "dico-flow")])
def test_trains_samples_saves_and_loads_with_the_shared_objectives(preset, method, tmp_path):
    from effigen.pipeline import Pipeline
    from effigen.training.experiment import build_experiment_dict
    from effigen.training.run import build_and_train

    config = build_experiment_dict(preset, overrides=[
        f"--trainer.output_dir={tmp_path}", "--network_preset=DiCo-Test", "--data.resolution=8",
        "--trainer.max_steps=2", "--trainer.batch_size=4", "--trainer.sample_every=0", "--trainer.checkpoint_every=0",
        "--trainer.progress=false", "--sampler.num_steps=2"])
    summary = build_and_train(config, quiet=True)
    pipeline = Pipeline.from_pretrained(summary["pipeline"])
    assert pipeline.method.name == method and isinstance(pipeline.generator, DiCo)
    assert pipeline.generator.config.learn_sigma == (method == "dico-ddpm")
    images = pipeline([0, 1], seed=0)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
