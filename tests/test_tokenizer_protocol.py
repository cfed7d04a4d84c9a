"""Tokenizers declare what they produce (tokenizers.base); the experiment, the trainer and the pipeline ask that
declaration, never the tokenizer's class, so a new tokenizer plugs in by registering its class alone."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from effigen.config import ConfigError
from effigen.objectives.kl_vae import KLVAE_PRESETS
from effigen.objectives.vq_tokenizer import MSVQ_PRESETS
from effigen.pipeline import Pipeline
from effigen.registry import COMPONENTS, get_method, register_component
from effigen.tokenizers.base import LatentSpace, TokenizerOutput, TokenSpace, accepts
from effigen.tokenizers.kl_vae import KLVAE, KLVAEConfig
from effigen.tokenizers.msvq import MultiScaleVQ, MultiScaleVQConfig
from effigen.training.experiment import build_experiment_config
from effigen.training.run import build_and_train, is_latent_space


def test_declared_outputs_match_what_the_tokenizers_return():
    vae = KLVAE(KLVAEConfig(**{**KLVAE_PRESETS["KL-Test"], "resolution": 16}))
    images = torch.zeros(2, 3, 16, 16)
    assert vae.output == LatentSpace(4, (8, 8), 16, 3, 2) and vae.encode(images).shape[1:] == vae.output.shape
    assert is_latent_space(vae) and vae.output.network_inputs() == {"in_channels": 4, "input_size": 8}
    vq = MultiScaleVQ(MultiScaleVQConfig(**{**MSVQ_PRESETS["MSVQ-Test"], "resolution": 8}))
    out = vq.output
    assert isinstance(out, TokenSpace) and out.layout == "multiscale" and out.scales == (1, 2, 4)
    assert out.num_tokens == vq.config.num_tokens == sum(i.shape[1] for i in vq.indices_from_images(torch.zeros(1, 3, 8, 8)))
    assert out.network_inputs() == {"vocab_size": 32, "latent_channels": 4, "scales": [1, 2, 4]}
    assert not is_latent_space(vq)


def test_what_each_method_accepts():
    vae_out = LatentSpace(4, (8, 8), 16)
    multiscale = TokenSpace(32, "multiscale", 16, scales=(1, 2, 4))
    grid = TokenSpace(32, "multiscale", 16, scales=(4,))
    sequence = TokenSpace(32, "sequence", 16, length=64)
    assert get_method("dit-flow").accepts_tokenizer(vae_out) and not get_method("dit-flow").accepts_tokenizer(grid)
    assert get_method("var").accepts_tokenizer(multiscale) and not get_method("var").accepts_tokenizer(vae_out)
    assert get_method("raster-ar").accepts_tokenizer(grid) and not get_method("raster-ar").accepts_tokenizer(multiscale)
    assert accepts(("tokens",), sequence) and not accepts(("multiscale", "grid"), sequence)


@dataclass
class ToyConfig:
    """A parameter-light continuous tokenizer: 2x2 pixel-unshuffle to 12 channels, times a learned gain."""

    resolution: int = 16
    gain: float = 1.0


class ToyUnshuffle(TokenizerOutput, torch.nn.Module):
    config_class = ToyConfig

    @classmethod
    def output_of(cls, config: ToyConfig) -> LatentSpace:
        return LatentSpace(12, (config.resolution // 2, config.resolution // 2), config.resolution, downsample_factor=2)

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.gain = torch.nn.Parameter(torch.tensor(config.gain))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, 2) * self.gain

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents / self.gain, 2)


@pytest.fixture
def toy_tokenizer(tmp_path):
    register_component(ToyUnshuffle)
    folder = tmp_path / "toy"
    method = get_method("klvae")  # any tokenizer-kind folder layout: tokenizer/ + model_index.json
    Pipeline(method, None, method.objective_class.config_class(), method.objective_class.sampler_config_class(),
             {"class_names": [str(i) for i in range(10)]}, tokenizer=ToyUnshuffle(ToyConfig(gain=2.0))).save_pretrained(folder)
    yield folder
    COMPONENTS.pop("ToyUnshuffle", None)


def test_a_new_continuous_tokenizer_plugs_in_without_edits_elsewhere(toy_tokenizer, tmp_path):
    overrides = [f"--tokenizer={toy_tokenizer}", "--data.resolution=16", "--network_preset=DiT-Test",
                 "--network.hidden_size=32", "--network.num_heads=2", "--network.depth=1", "--network.patch_size=2",
                 "--trainer.max_steps=2",
                 "--trainer.batch_size=8", "--trainer.precision=fp32", "--trainer.progress=false",
                 "--trainer.checkpoint_every=0", "--trainer.sample_every=0", f"--trainer.output_dir={tmp_path / 'run'}",
                 "--sampler.num_steps=2", "--data.holdout_fraction=0.9"]
    config = build_experiment_config("mnist-dit", overrides=overrides)
    assert config.tokenizer_output == LatentSpace(12, (8, 8), 16, downsample_factor=2)
    assert (config.network.in_channels, config.network.input_size) == (12, 8)  # derived from the declaration
    from effigen.training.experiment import build_experiment_dict

    summary = build_and_train(build_experiment_dict("mnist-dit", None, overrides), quiet=True)
    pipeline = Pipeline.from_pretrained(summary["pipeline"])
    assert isinstance(pipeline.tokenizer, ToyUnshuffle) and pipeline.tokenizer.gain.item() == 2.0
    assert pipeline.latent_shape == (12, 8, 8) and pipeline.sample_shape == (3, 16, 16)
    assert pipeline([0, 1], seed=0).shape == (2, 3, 16, 16)
    # a token generator refuses it by its declaration
    with pytest.raises(ConfigError, match=r"\(a ToyUnshuffle\) produces continuous latents 12x8x8; method var works on"):
        build_experiment_config("mnist-var", overrides=[f"--tokenizer={toy_tokenizer}", "--data.resolution=16"])
    with pytest.raises(ConfigError, match="works at 16 px but data.resolution is 32"):
        build_experiment_config("mnist-dit", overrides=[f"--tokenizer={toy_tokenizer}", "--data.resolution=32"])


def test_token_cache_rows_round_trip_every_token_layout():
    # TokenSpace.flatten_indices -> int16 rows (what a token cache stores) -> unflatten_indices: the ids the
    # objectives would have tokenized, for the multi-scale, residual and 1D layouts
    from effigen.objectives.vq_tokenizer import MSVQ_PRESETS
    from effigen.tokenizers.detailflow import DETAILFLOW_PRESETS, DetailFlowConfig, DetailFlowTokenizer
    from effigen.tokenizers.msvq import MultiScaleVQ, MultiScaleVQConfig
    from effigen.tokenizers.rvq import RVQ_PRESETS, ResidualVQ, ResidualVQConfig

    torch.manual_seed(0)
    tokenizers = [MultiScaleVQ(MultiScaleVQConfig(**MSVQ_PRESETS["MSVQ-Test"], resolution=8)),
                  ResidualVQ(ResidualVQConfig(**{**RVQ_PRESETS["RVQ-Test"], "depth": 3}, resolution=8)),
                  DetailFlowTokenizer(DetailFlowConfig(**DETAILFLOW_PRESETS["DetailFlow-Test"]))]
    for tokenizer in tokenizers:
        tokenizer.eval()
        side = tokenizer.config.resolution
        with torch.no_grad():
            indices = tokenizer.indices_from_images(torch.rand(3, 3, side, side) * 2 - 1)
        rows = tokenizer.output.flatten_indices(indices)
        assert rows.dtype == tokenizer.output.id_dtype == torch.int16 and rows.shape == (3, tokenizer.output.num_tokens)
        back = tokenizer.output.unflatten_indices(rows)
        if isinstance(indices, list):
            assert all(torch.equal(a, b) and b.dtype == torch.int64 for a, b in zip(indices, back))
        else:
            assert torch.equal(indices, back) and back.dtype == torch.int64
        with pytest.raises(ValueError, match="integer token ids"):
            tokenizer.output.unflatten_indices(rows[:, 1:])
    # ids beyond int16 are stored as int32
    import dataclasses

    big = dataclasses.replace(tokenizers[0].output, vocab_size=2**15 + 1)
    rows = big.flatten_indices([torch.full((1, s * s), 2**15) for s in big.scales])
    assert big.id_dtype == rows.dtype == torch.int32 and rows.min() == 2**15
