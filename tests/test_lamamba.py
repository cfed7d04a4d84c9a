"""LaMamba-Diff building blocks: the CPU selective scan (loop reference vs chunked default)."""

import math

import pytest
import torch
import torch.nn.functional as F

from effigen.nn.selective_scan import (
    selective_scan, selective_scan_chunked, selective_scan_loop, selective_scan_recurrent)


def _inputs(b=2, d=6, n=3, L=37, groups=None, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, L, generator=g)
    delta = torch.randn(b, d, L, generator=g)
    A = -torch.exp(torch.randn(d, n, generator=g))
    shape = (b, n, L) if groups is None else (b, groups, n, L)
    B = torch.randn(*shape, generator=g)
    C = torch.randn(*shape, generator=g)
    D = torch.randn(d, generator=g)
    bias = torch.randn(d, generator=g)
    ts = [u, delta, A, B, C, D, bias]
    if grad:
        ts = [t.requires_grad_() for t in ts]
    return ts


def test_loop_matches_hand_recurrence_two_steps():
    u, delta, A, B, C, D, bias = _inputs(b=1, d=1, n=1, L=2)
    y = selective_scan_loop(u, delta, A, B, C, D, bias, delta_softplus=True)
    dt = F.softplus(delta[0, 0] + bias[0])
    a = A[0, 0]
    h1 = dt[0] * B[0, 0, 0] * u[0, 0, 0]
    h2 = math.exp(dt[1] * a) * h1 + dt[1] * B[0, 0, 1] * u[0, 0, 1]
    want = torch.stack([C[0, 0, 0] * h1, C[0, 0, 1] * h2]) + D[0] * u[0, 0]
    torch.testing.assert_close(y[0, 0], want)


@pytest.mark.parametrize("chunk", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("groups", [None, 2])
def test_chunked_equals_loop(chunk, groups):
    args = _inputs(groups=groups)
    ref = selective_scan_loop(*args, delta_softplus=True)
    out = selective_scan_chunked(*args, delta_softplus=True, chunk=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(selective_scan(*args, delta_softplus=True, impl="chunked"), out if chunk == 8 else
                       selective_scan_chunked(*args, delta_softplus=True))


def test_chunked_equals_loop_gradients():
    a1 = _inputs(L=21, groups=3, grad=True)
    a2 = [t.detach().clone().requires_grad_() for t in a1]
    w = torch.randn(2, 6, 21, generator=torch.Generator().manual_seed(5))
    (selective_scan_loop(*a1, delta_softplus=True) * w).sum().backward()
    (selective_scan_chunked(*a2, delta_softplus=True, chunk=8) * w).sum().backward()
    for t1, t2 in zip(a1, a2):
        torch.testing.assert_close(t2.grad, t1.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("groups", [None, 2])
def test_recurrent_equals_loop_in_outputs_and_gradients(groups):
    a1 = _inputs(L=21, groups=groups, grad=True)
    a2 = [t.detach().clone().requires_grad_() for t in a1]
    w = torch.randn(2, 6, 21, generator=torch.Generator().manual_seed(5))
    ref = selective_scan_loop(*a1, delta_softplus=True)
    out = selective_scan_recurrent(*a2, delta_softplus=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(selective_scan(*[t.detach() for t in a2], delta_softplus=True), out.detach())  # CPU default
    (ref * w).sum().backward()
    (out * w).sum().backward()
    for t1, t2 in zip(a1, a2):
        torch.testing.assert_close(t2.grad, t1.grad, rtol=1e-4, atol=1e-5)


def test_scan_is_causal():
    u, delta, A, B, C, D, bias = _inputs(L=20)
    y = selective_scan_chunked(u, delta, A, B, C, D, bias, chunk=8)
    u2 = u.clone()
    u2[..., 12:] += 1.0
    y2 = selective_scan_chunked(u2, delta, A, B, C, D, bias, chunk=8)
    assert torch.equal(y[..., :12], y2[..., :12])
    assert not torch.allclose(y[..., 12:], y2[..., 12:])


def test_scan_clear_errors():
    u, delta, A, B, C, D, bias = _inputs()
    with pytest.raises(ValueError, match="impl must be one of"):
        selective_scan(u, delta, A, B, C, impl="fast")
    with pytest.raises(ValueError, match="G dividing"):
        selective_scan(u, delta, A, torch.randn(2, 4, 3, 37), C)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(u, delta, A[:3], B, C)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="mamba_ssm"):
            selective_scan(u, delta, A, B, C, impl="cuda")


# ---- scan paths and window attention (effigen.models.lamamba) ----
from effigen.models.lamamba import cross_merge, cross_scan, scan_paths, window_attention  # noqa: E402


@pytest.mark.parametrize("mode", ["snake", "raster"])
def test_scan_paths_are_permutations_and_merge_inverts(mode):
    H, W = 4, 6
    paths = scan_paths(H, W, mode)
    assert paths.shape == (4, H * W)
    for p in paths:
        assert torch.equal(p.sort().values, torch.arange(H * W))
    x = torch.randn(2, 3, H, W)
    seq = cross_scan(x, paths)
    assert torch.equal(seq[:, 0, :, 0], x[:, :, 0, 0])  # both modes' first path starts at the top-left token
    assert torch.equal(seq[:, 2, :, -1], x[:, :, paths[2, -1] // W, paths[2, -1] % W])
    torch.testing.assert_close(cross_merge(seq, paths, H, W), 4 * x)


def test_snake_paths_are_continuous_and_start_where_documented():
    H, W = 6, 4
    paths = scan_paths(H, W, "snake")
    r, c = paths // W, paths % W
    steps = (r[:, 1:] - r[:, :-1]).abs() + (c[:, 1:] - c[:, :-1]).abs()
    assert torch.all(steps == 1)  # every step moves to a grid neighbour
    starts = [(int(r[k, 0]), int(c[k, 0])) for k in range(4)]
    assert starts == [(0, 0), (H - 1, 0), (H - 1, 0), (H - 1, W - 1)]
    assert int(r[0, 1]) == 0 and int(r[2, 1]) == H - 2  # the first two are row-wise, the last two column-wise
    raster = scan_paths(H, W, "raster")
    rr = raster // W
    assert (rr[0, 1:] - rr[0, :-1]).abs().max() == 1 and ((raster[0] % W)[W] == 0)  # raster jumps at row ends


def test_snake_paths_need_even_grid():
    with pytest.raises(ValueError, match="even grid"):
        scan_paths(5, 4, "snake")
    with pytest.raises(ValueError, match="scan mode"):
        scan_paths(4, 4, "zigzag")


@pytest.mark.parametrize("shift", [0, 2])
def test_window_attention_equals_dense_masked_attention(shift):
    H = W = 8
    win, nh, d = 4, 2, 5
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, nh, H * W, d, generator=g) for _ in range(3))
    out = window_attention(q, k, v, H, W, win, shift)
    # dense reference: token i sees j iff both fall in the same window of the rolled grid and were not split by
    # the cyclic roll (their original rows and columns lie less than a window apart)
    idx = torch.arange(H * W)
    r, c = idx // W, idx % W
    wr, wc = ((r - shift) % H) // win, ((c - shift) % W) // win
    same = (wr[:, None] == wr[None]) & (wc[:, None] == wc[None])
    near = ((r[:, None] - r[None]).abs() < win) & ((c[:, None] - c[None]).abs() < win)
    mask = torch.zeros(H * W, H * W).masked_fill(~(same & near), float("-inf"))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if shift:
        assert not torch.allclose(out, window_attention(q, k, v, H, W, win, 0))


def test_window_attention_clear_errors():
    q = torch.randn(1, 1, 36, 4)
    with pytest.raises(ValueError, match="divisible by the window size 4"):
        window_attention(q, q, q, 6, 6, 4)
    with pytest.raises(ValueError, match="window shift"):
        window_attention(q, q, q, 6, 6, 3, 3)


def test_snake_paths_literal_4x4():
    # the orders of the official model/continuous_scan.py for N=4, written out by hand
    want = [[0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12],
            [12, 13, 14, 15, 11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0],
            [12, 8, 4, 0, 1, 5, 9, 13, 14, 10, 6, 2, 3, 7, 11, 15],
            [15, 11, 7, 3, 2, 6, 10, 14, 13, 9, 5, 1, 0, 4, 8, 12]]
    assert scan_paths(4, 4, "snake").tolist() == want


# ---------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------

from conftest import randomize  # noqa: E402

from effigen.convert.lamamba_official import lamamba_config_from_state_dict, load_official_lamamba  # noqa: E402
from effigen.io import CheckpointError  # noqa: E402
from effigen.models.lamamba import (  # noqa: E402
    LaMamba, LaMambaConfig, PatchExpanding2D, PatchMerging2D, SS2D, shifted_window_mask)
from effigen.nn.taps import Taps  # noqa: E402


def tiny(**kw):
    return LaMambaConfig(**{**dict(input_size=8, in_channels=3, embed_dim=8, depths=[1, 1, 1, 1], bottleneck_depth=1,
                                   num_heads=2, window_size=4, num_classes=4, scan_impl="chunked"), **kw})


@pytest.mark.parametrize("channels, size, patch, learn_sigma", [(3, 8, 1, False), (4, 16, 1, True), (1, 16, 2, True)])
def test_forward_shapes_pixels_and_latents(channels, size, patch, learn_sigma):
    model = randomize(LaMamba(tiny(in_channels=channels, input_size=size, patch_size=patch, learn_sigma=learn_sigma)))
    out = model(torch.randn(2, channels, size, size), torch.rand(2), torch.tensor([0, 4]))  # 4 = null class
    assert out.shape == (2, channels * (2 if learn_sigma else 1), size, size) and torch.isfinite(out).all()


def test_unet_levels_widths_resolutions_and_skips():
    config = tiny(input_size=16, depths=[1, 1, 1, 1], bottleneck_depth=1)
    model = randomize(LaMamba(config))
    assert config.dims == [8, 16, 32, 32] and config.encoder_resolutions() == [16, 8, 4, 4]
    assert [len(s.blocks) for s in model.layers_up] == [2, 2, 2, 2]  # one block more per decoder level
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1])
    n = len(model.blocks())
    out, features = model(x, t, y, taps=Taps(blocks=tuple(range(n))))
    assert torch.equal(out, model(x, t, y))
    shapes = [tuple(features.blocks[i].shape[1:]) for i in range(n)]  # (tokens, width) per block, forward order
    assert shapes == [(256, 8), (64, 16), (16, 32), (16, 32), (16, 32),  # encoder, bottleneck
                      (16, 32), (16, 32), (16, 32), (16, 32), (64, 16), (64, 16), (256, 8), (256, 8)]  # decoder
    h = torch.randn(2, 8, 8, 16)
    assert PatchMerging2D(16, 32)(h).shape == (2, 4, 4, 32)
    assert PatchExpanding2D(16)(h).shape == (2, 16, 16, 8)
    assert PatchExpanding2D(16, 2, keep_width=True)(h).shape == (2, 16, 16, 16)
    with pytest.raises(ValueError, match="0..12"):
        model(x, t, y, taps=Taps(blocks=(13,)))


def test_patch_merging_and_expanding_follow_the_official_layouts():
    merge = PatchMerging2D(1, 4)
    with torch.no_grad():
        merge.norm.weight.fill_(1.0), merge.norm.bias.zero_(), merge.reduction.weight.copy_(torch.eye(4))
    x = torch.arange(16.0).view(1, 4, 4, 1)
    got = merge(x)[0, 0, 0]
    ref = torch.tensor([0.0, 4.0, 1.0, 5.0])  # [(0,0), (1,0), (0,1), (1,1)]: rows vary first
    torch.testing.assert_close(got, F.layer_norm(ref, (4,)))
    expand = PatchExpanding2D(4)
    with torch.no_grad():
        expand.expand.weight.copy_(torch.eye(8, 4).repeat(1, 1)), expand.norm.weight.fill_(1.0)
    v = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    e = expand.expand(v).view(2, 2, 2)  # '(p1 p2 c)': channel block (p1, p2) goes to row p1, column p2
    torch.testing.assert_close(expand(v)[0], F.layer_norm(e, (2,)))


def test_initial_output_is_zero_and_blocks_start_as_identity():
    model = LaMamba(tiny())
    assert torch.count_nonzero(model(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1]))) == 0
    for block in (model.layers[0].blocks[0], model.mid_layer.blocks[0], model.layers_up[3].blocks[1]):
        width = block.norm.normalized_shape[0]
        x = torch.randn(2, 4, 4, width)
        assert torch.equal(block(x, torch.randn(2, 32)), x)


def test_conditioning_changes_output():
    model = randomize(LaMamba(tiny()))
    x = torch.randn(1, 3, 8, 8)
    a = model(x, torch.tensor([0.3]), torch.tensor([0]))
    assert not torch.allclose(a, model(x, torch.tensor([0.3]), torch.tensor([1])))
    assert not torch.allclose(a, model(x, torch.tensor([0.7]), torch.tensor([0])))


@pytest.mark.parametrize("scan", ["snake", "raster"])
def test_ss2d_is_the_sum_of_four_directional_scans(scan):
    """SS2D against a direct computation: each direction k scans its own path with its own x_proj / dt_proj / A / D,
    position by position, and the outputs are put back at their raster positions and summed."""
    torch.manual_seed(0)
    op = randomize(SS2D(6, d_state=2, dt_rank=2, scan=scan, scan_impl="chunked"), std=0.2)
    H = W = 4
    x = torch.randn(2, H, W, 6)
    xi, z = op.in_proj(x).chunk(2, dim=-1)
    u = F.silu(op.conv2d(xi.permute(0, 3, 1, 2))).flatten(2)  # (B, inner, L) raster order
    d, N, R = op.inner, op.d_state, op.rank
    A = -torch.exp(op.A_logs).view(4, d, N)
    y = torch.zeros(2, d, H * W)
    for k, path in enumerate(scan_paths(H, W, scan)):
        h = torch.zeros(2, d, N)
        for pos in path.tolist():
            proj = torch.einsum("cd,bd->bc", op.x_proj_weight[k], u[:, :, pos])
            dt = F.softplus(proj[:, :R] @ op.dt_projs_weight[k].T + op.dt_projs_bias[k])  # (B, d)
            Bk, Ck = proj[:, R:R + N], proj[:, R + N:]
            h = torch.exp(dt[..., None] * A[k]) * h + (dt * u[:, :, pos])[..., None] * Bk[:, None, :]
            y[:, :, pos] += (h * Ck[:, None, :]).sum(-1) + op.Ds.view(4, d)[k] * u[:, :, pos]
    ref = op.out_proj(op.out_norm(y.transpose(1, 2).reshape(2, H, W, d)) * F.silu(z))
    torch.testing.assert_close(op(x), ref, atol=1e-5, rtol=1e-4)


def test_odd_sizes_are_a_clear_error():
    with pytest.raises(ValueError, match=r"input_size 30: the 2 patch mergings .* Allowed sizes .*: 8, 16, 32, 48"):
        LaMambaConfig(**{**tiny().__dict__, "input_size": 30})
    with pytest.raises(ValueError, match="snake scan needs even level resolutions.*scan='raster'"):
        tiny(input_size=12, window_size=16)  # levels 12, 6, 3, 3, all inside one window
    assert LaMamba(tiny(input_size=12, window_size=16, scan="raster"))(torch.randn(1, 3, 12, 12), torch.rand(1),
                                                        torch.tensor([0])).shape == (1, 3, 12, 12)
    with pytest.raises(ValueError, match="neither <= nor a multiple of window_size 4"):
        tiny(input_size=24)  # level 0 at 24 > window 4 is fine, level 1 at 12 too, but 6 is neither
    model = LaMamba(tiny())
    with pytest.raises(ValueError, match=r"expects \(B, 3, 8, 8\) inputs .*allowed: 8, 16, 32"):
        model(torch.randn(1, 3, 16, 16), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="divisible by its 3 heads"):
        tiny(num_heads=3)


def test_official_xl_preset_sizes():
    from effigen.models.lamamba import LAMAMBA_PRESETS

    config = LaMambaConfig(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                           **LAMAMBA_PRESETS["LaMamba-XL"])
    assert config.dims == [320, 640, 1280, 1280] and config.encoder_resolutions() == [32, 16, 8, 8]
    with torch.device("meta"):
        model = LaMamba(config)
    assert [len(s.blocks) for s in model.layers_up] == [3, 3, 3, 3]
    assert model.layers[0].blocks[0].op.rank == 20 and model.layers[0].blocks[1].attn.shift == 4


def test_config_and_buffers_are_read_off_an_official_state_dict(tmp_path):
    config = tiny(input_size=16, depths=[2, 1, 1, 2], num_heads=[2, 4, 4, 8], mlp_ratio=2.0, in_channels=4,
                  learn_sigma=True, num_classes=7, d_state=2, dt_rank="auto", scan="snake", scan_impl="auto")
    model = randomize(LaMamba(config))
    state = dict(model.state_dict())
    res = config.encoder_resolutions()
    levels = [(f"layers.{i}.", r) for i, r in enumerate(res)] + [("mid_layer.", res[-1])]
    levels += [(f"layers_up.{i}.", r) for i, r in enumerate(res[::-1])]
    for name, module in model.named_modules():  # the official file carries the derived window buffers
        if name.endswith("attn"):
            state[name + ".relative_position_index"] = module.relative_position_index
            if module.shift:  # official mask values: -100 between regions
                r = next(r for prefix, r in levels if name.startswith(prefix))
                mask = shifted_window_mask(r, r, module.window, module.shift)
                state[name[:-4] + "attn_mask"] = mask.masked_fill(torch.isinf(mask), -100.0)
    assert lamamba_config_from_state_dict(state) == config
    torch.save({"model": {}, "ema": state, "opt": {}, "args": {}, "config": {}}, tmp_path / "ckpt.pt")
    loaded = load_official_lamamba(tmp_path / "ckpt.pt")
    x = torch.randn(1, 4, 16, 16)
    assert torch.equal(loaded(x, torch.tensor([0.5]), torch.tensor([3])), model.eval()(x, torch.tensor([0.5]),
                                                                                        torch.tensor([3])))
    del state["layers.0.blocks.1.attn_mask"]  # a checkpoint without the shift effigen expects
    torch.save({"ema": state}, tmp_path / "noshift.pt")
    with pytest.raises(CheckpointError, match="shifts the windows of layers.0.blocks.1"):
        load_official_lamamba(tmp_path / "noshift.pt")


@pytest.mark.parametrize("preset, method", [("mnist-lamamba", "lamamba-ddpm"), ("mnist-lamamba-flow", "lamamba-flow")])
def test_trains_samples_saves_and_loads_with_the_shared_objectives(preset, method, tmp_path):
    from effigen.pipeline import Pipeline
    from effigen.training.experiment import build_experiment_dict
    from effigen.training.run import build_and_train

    config = build_experiment_dict(preset, overrides=[
        f"--trainer.output_dir={tmp_path}", "--network_preset=LaMamba-Test", "--data.resolution=8",
        "--trainer.max_steps=2", "--trainer.batch_size=4", "--trainer.sample_every=0", "--trainer.checkpoint_every=0",
        "--trainer.progress=false", "--sampler.num_steps=2"])
    summary = build_and_train(config, quiet=True)
    pipeline = Pipeline.from_pretrained(summary["pipeline"])
    assert pipeline.method.name == method and isinstance(pipeline.generator, LaMamba)
    assert pipeline.generator.config.learn_sigma == (method == "lamamba-ddpm")
    images = pipeline([0, 1], seed=0)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    # save -> load round trip: same weights, same outputs
    again = Pipeline.from_pretrained(pipeline.save_pretrained(tmp_path / "copy"))
    assert again.generator.config == pipeline.generator.config
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(again.generator(x, t, y), pipeline.generator(x, t, y))
    assert torch.equal(again([0, 1], seed=0), images)


def test_converter_rejects_unsupported_official_options(tmp_path, capsys):
    from effigen.cli.main import main

    model = randomize(LaMamba(tiny(window_size=8)))  # one window per level: no shifted blocks, no masks to carry
    torch.save({"ema": model.state_dict()}, tmp_path / "ckpt.pt")
    (tmp_path / "concat.yaml").write_text("MODEL:\n  SKIP_CONCAT: true\n  VSSM:\n    CONTINUOUS_SCAN: false\n")
    with pytest.raises(CheckpointError, match=r"MODEL.SKIP_CONCAT = True \(supported: False\)"):
        load_official_lamamba(tmp_path / "ckpt.pt", tmp_path / "concat.yaml")
    (tmp_path / "raster.yaml").write_text("MODEL:\n  VSSM:\n    CONTINUOUS_SCAN: false\n    WINDOW_SIZE: 8\n")
    assert load_official_lamamba(tmp_path / "ckpt.pt", tmp_path / "raster.yaml").config.scan == "raster"
    with pytest.raises(SystemExit):
        main(["convert", "dit-official", "--ckpt", str(tmp_path / "ckpt.pt"), "--config", "x.yaml", "--out", "o"])
    assert "only lamamba-official takes --config" in capsys.readouterr().err
