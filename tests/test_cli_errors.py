"""User errors end in one line that names the input and the fix, and exit status 2; bugs keep their traceback.

One test per class of error found by trying the commands as a new user would (issue 16): non-finite and out-of-range
settings, counts below 1, output folders that already hold images, outputs that cannot be written (checked before the
work), unreadable image inputs, absent devices, a distilled student asked for a cfg_scale, commands on the wrong kind
of folder."""

from __future__ import annotations

import errno
import math

import pytest
import torch

from effigen.cli.main import main
from effigen.config import ConfigError
from effigen.models.dit import DiT, DiTConfig
from effigen.objectives.flow_matching import FlowSamplerConfig, RectifiedFlowConfig
from effigen.pipeline import Pipeline

from conftest import randomize

CLASSES = [str(i) for i in range(10)]


def cli(args, capsys) -> tuple[int, str, str]:
    """Run `effigen ARGS` in-process: (exit status, stdout, stderr). argparse errors exit through SystemExit."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def user_error(args, capsys, *fragments: str) -> str:
    """Assert `effigen ARGS` exits 2 with a one-line error holding every fragment; returns that line."""
    code, out, err = cli(args, capsys)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("effigen ") and ": error: " in line, err
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


@pytest.fixture(scope="module")
def flow_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = DiTConfig(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    pipeline = Pipeline("dit-flow", randomize(DiT(config), std=0.02), RectifiedFlowConfig(prediction="data"),
                        FlowSamplerConfig(solver="euler", num_steps=2, cfg_scale=2.0),
                        {"dataset": "mnist", "resolution": 8, "class_names": CLASSES})
    return pipeline.save_pretrained(tmp_path_factory.mktemp("flow") / "pipe")


@pytest.fixture(scope="module")
def var_folder(tmp_path_factory):
    from effigen.models.var import VAR, VAR_PRESETS, VARConfig
    from effigen.objectives.next_scale import NextScaleConfig
    from effigen.objectives.vq_tokenizer import MSVQ_PRESETS
    from effigen.samplers.next_scale import NextScaleSamplerConfig
    from effigen.tokenizers.msvq import MultiScaleVQ, MultiScaleVQConfig

    torch.manual_seed(0)
    tokenizer = MultiScaleVQ(MultiScaleVQConfig(**MSVQ_PRESETS["MSVQ-Test"], resolution=8)).eval()
    config = VARConfig(**VAR_PRESETS["VAR-Test"], num_classes=4, vocab_size=32, latent_channels=4, scales=(1, 2, 4))
    network = randomize(VAR(config), 0, std=0.05).eval()
    pipeline = Pipeline("var", network, NextScaleConfig(), NextScaleSamplerConfig(cfg_scale=1.5, top_k=0, top_p=0.0),
                        {"class_names": list("abcd")}, tokenizer=tokenizer)
    return pipeline.save_pretrained(tmp_path_factory.mktemp("var") / "pipe")


@pytest.fixture
def image_file(tmp_path):
    from PIL import Image

    path = tmp_path / "in.png"
    Image.fromarray((torch.rand(8, 8, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(path)
    return path


def pngs(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


# ------------------------------------------------------------------------------------------ settings
def test_non_finite_guidance_is_refused_everywhere(flow_folder, var_folder, image_file, tmp_path, capsys):
    # before: `--cfg-scale nan` (or inf) sampled black images and exited 0; Pipeline(..., cfg_scale=nan) gave NaNs
    for value in ("nan", "inf", "-inf"):
        user_error(["sample", "--from", flow_folder, "--num", 2, f"--cfg-scale={value}", "--out", tmp_path / "a.png"],
                   capsys, "--cfg-scale", "finite")
        user_error(["sample", "--from", flow_folder, "--num", 2, f"--sampler.cfg_scale={value}",
                    "--out", tmp_path / "a.png"], capsys, "--sampler.cfg_scale", "not a finite number")
    assert not (tmp_path / "a.png").exists()
    user_error(["edit", "--from", var_folder, "--image", image_file, "--box", "0,0,0.5,0.5", "--cfg-scale", "nan",
                "--out", tmp_path / "e.png"], capsys, "--cfg-scale", "finite")
    user_error(["eval", "--from", flow_folder, "--num-images", 4, "--cfg-scale", "inf"], capsys, "--cfg-scale")
    user_error(["bench", "--from", flow_folder, "--cfg-scale", "nan"], capsys, "--cfg-scale")
    pipeline = Pipeline.from_pretrained(flow_folder)
    for value in (math.nan, math.inf):
        with pytest.raises(ConfigError, match=r"sampler\.cfg_scale: .* not a finite number"):
            pipeline([0, 1], cfg_scale=value)


def test_out_of_range_sampler_settings_name_their_range(flow_folder, var_folder, tmp_path, capsys):
    # before: top_k < 0 and top_p outside [0, 1] silently meant "no filter"; num_steps 0 was a raw traceback
    out = tmp_path / "a.png"
    user_error(["sample", "--from", var_folder, "--num", 2, "--sampler.top_k=-1", "--out", out], capsys,
               "--sampler.top_k=-1", "top_k = -1 is out of range", ">= 0")
    user_error(["sample", "--from", var_folder, "--num", 2, "--sampler.top_p=1.5", "--out", out], capsys,
               "top_p = 1.5", ">= 0 and <= 1")
    user_error(["sample", "--from", var_folder, "--num", 2, "--sampler.temperature=-1", "--out", out], capsys,
               "temperature")
    user_error(["sample", "--from", flow_folder, "--num", 2, "--sampler.cfg_scale=-2", "--out", out], capsys,
               "cfg_scale = -2", ">= 0")
    user_error(["sample", "--from", flow_folder, "--num", 2, "--sampler.num_steps=0", "--out", out], capsys,
               "--sampler.num_steps=0", ">= 1")
    user_error(["sample", "--from", flow_folder, "--num", 2, "--sampler.time_shift=0", "--out", out], capsys,
               "time_shift", "> 0")
    user_error(["bench", "--from", flow_folder, "--time-shift", "-1"], capsys, "--time-shift -1", "> 0")
    assert not out.exists()
    with pytest.raises(ConfigError, match="top_k = -1 is out of range"):
        Pipeline.from_pretrained(var_folder)([0], top_k=-1)
    from effigen.samplers.diffusion import space_timesteps

    with pytest.raises(ConfigError, match=r"num_steps = 11 is out of range .* 1\.\.10"):  # DDPM: more than trained
        space_timesteps(10, 11)


@pytest.mark.parametrize("command", [
    ["sample", "--num", 0], ["sample", "--num", -3], ["sample", "--steps", 0], ["sample", "--batch-size", 0],
    ["sample", "--upscale", 0], ["eval", "--num-images", 0], ["eval", "--batch-size", 0], ["eval", "--steps", 0],
    ["eval", "--ref-num", 0], ["bench", "--batch-size", 0], ["bench", "--steps", 0],
])
def test_counts_below_one_are_refused(command, flow_folder, tmp_path, capsys):
    # before: --num 0 divided by zero, --batch-size 0 and --steps 0 ended in tracebacks from deep inside sampling
    name, flag, value = command
    user_error([name, "--from", flow_folder, flag, value], capsys, f"argument {flag}", "must be >= 1")
    assert not list(tmp_path.iterdir())


def test_edit_counts_below_one_are_refused(var_folder, image_file, tmp_path, capsys):
    for flag in ("--num", "--upscale"):
        user_error(["edit", "--from", var_folder, "--image", image_file, "--box", "0,0,0.5,0.5", flag, 0,
                    "--out", tmp_path / "e.png"], capsys, f"argument {flag}", ">= 1")
    user_error(["cache-latents", "--tokenizer", var_folder, "--out", tmp_path / "c", "--batch-size", 0], capsys,
               "argument --batch-size")


# ------------------------------------------------------------------------------------------ output folders and files
def test_sample_refuses_a_non_empty_folder_unless_told_to_overwrite(flow_folder, tmp_path, capsys):
    # before: a second `effigen sample --out DIR/` left the first run's images beside the new ones
    out = tmp_path / "samples"
    assert cli(["sample", "--from", flow_folder, "--num", 5, "--out", out], capsys)[0] == 0
    assert len(pngs(out)) == 5
    user_error(["sample", "--from", flow_folder, "--num", 2, "--out", out], capsys, f"--out {out} is not empty",
               "--overwrite")
    assert len(pngs(out)) == 5  # untouched
    code, stdout, err = cli(["sample", "--from", flow_folder, "--num", 2, "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert pngs(out) == ["000000.png", "000001.png"] and "replacing 5 old images" in stdout
    (out / "notes.txt").write_text("mine")
    user_error(["sample", "--from", flow_folder, "--num", 2, "--out", out, "--overwrite"], capsys,
               "notes.txt", "clears only PNG images")
    assert (out / "notes.txt").read_text() == "mine" and len(pngs(out)) == 2
    (tmp_path / "empty").mkdir()
    assert cli(["sample", "--from", flow_folder, "--num", 1, "--out", tmp_path / "empty"], capsys)[0] == 0


def test_edit_refuses_a_non_empty_folder_unless_told_to_overwrite(var_folder, image_file, tmp_path, capsys):
    args = ["edit", "--from", var_folder, "--image", image_file, "--box", "0,0,0.5,0.5", "--num", 2,
            "--out", tmp_path / "edits"]
    assert cli(args, capsys)[0] == 0 and len(pngs(tmp_path / "edits")) == 2
    user_error(args, capsys, "is not empty", "--overwrite")
    assert cli([*args, "--overwrite"], capsys)[0] == 0 and len(pngs(tmp_path / "edits")) == 2


def test_outputs_that_cannot_be_written_fail_before_the_work(flow_folder, var_folder, image_file, tmp_path, capsys):
    # before: a raw FileExistsError / NotADirectoryError traceback, after all the sampling or timing was done
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is needed")
    cases = [
        (["sample", "--from", flow_folder, "--num", 2, "--out", blocker / "grid.png"], "--out"),
        (["sample", "--from", flow_folder, "--num", 2, "--out", blocker / "pngs"], "--out"),
        (["edit", "--from", var_folder, "--image", image_file, "--box", "0,0,0.5,0.5", "--out", blocker / "e.png"],
         "--out"),
        (["eval", "--from", flow_folder, "--num-images", 4, "--json", blocker / "r.json"], "--json"),
        (["eval", "--from", flow_folder, "--num-images", 4, "--save-images", blocker / "x.npz"], "--save-images"),
        (["bench", "--from", flow_folder, "--repeats", 1, "--json", blocker / "b.json"], "--json"),
    ]
    for args, flag in cases:
        line = user_error(args, capsys, f"{flag} {blocker}", "cannot write there", "a file is in the way")
        assert "choose a writable path" in line
    user_error(["sample", "--from", flow_folder, "--num", 2, "--out", blocker], capsys,
               f"--out {blocker} is a file, not a folder")
    user_error(["sample", "--from", flow_folder, "--num", 2, "--out", tmp_path], capsys, "is not empty")
    user_error(["cache-latents", "--tokenizer", var_folder, "--out", blocker, "--data.name=mnist"], capsys,
               f"--out {blocker} is a file")


def test_a_full_disk_is_a_one_line_error(flow_folder, tmp_path, capsys, monkeypatch):
    import effigen.cli.sample as sample_command

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sample_command, "save_image_grid", full)
    user_error(["sample", "--from", flow_folder, "--num", 2, "--out", tmp_path / "grid.png"], capsys,
               f"--out {tmp_path / 'grid.png'}", "the disk is full")


# ------------------------------------------------------------------------------------------ inputs
def test_unreadable_image_inputs_name_their_flag(var_folder, image_file, tmp_path, capsys):
    # before: a non-image mask file ended in PIL's UnidentifiedImageError traceback
    junk = tmp_path / "mask.png"
    junk.write_text("not an image")
    user_error(["edit", "--from", var_folder, "--image", image_file, "--mask", junk, "--out", tmp_path / "e.png"],
               capsys, f"--mask {junk}", "not a readable image")
    user_error(["edit", "--from", var_folder, "--image", junk, "--box", "0,0,0.5,0.5", "--out", tmp_path / "e.png"],
               capsys, f"--image {junk}", "not a readable image")


def test_edit_on_a_generator_that_cannot_edit(flow_folder, image_file, tmp_path, capsys):
    user_error(["edit", "--from", flow_folder, "--image", image_file, "--box", "0,0,0.5,0.5",
                "--out", tmp_path / "e.png"], capsys, "dit-flow does not support zero-shot editing", "var, hmar")


@pytest.mark.parametrize("device", ["foo", "cuda", "cuda:7"])
def test_absent_devices_are_named_with_the_right_flag(device, flow_folder, var_folder, image_file, tmp_path, capsys):
    # before: a RuntimeError traceback that suggested --trainer.device=cpu, a flag these commands do not have
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    for args in (["sample", "--from", flow_folder, "--out", tmp_path / "a.png"],
                 ["edit", "--from", var_folder, "--image", image_file, "--box", "0,0,0.5,0.5", "--out", tmp_path / "e.png"],
                 ["eval", "--from", flow_folder],
                 ["bench", "--from", flow_folder],
                 ["cache-latents", "--tokenizer", var_folder, "--out", tmp_path / "c", "--data.name=mnist"]):
        line = user_error([*args, "--device", device], capsys, "--device", "use --device cpu")
        assert "--trainer.device" not in line
    assert [p.name for p in tmp_path.iterdir()] == ["in.png"]  # nothing written


def test_distilled_student_says_its_guidance_is_w(flow_folder, tmp_path, capsys):
    # before: `--cfg-scale` on a student failed with a generic "unknown sampler setting" listing
    from effigen.cli.distill import run as distill

    student = tmp_path / "student"
    assert distill(["--from", str(flow_folder), "--out", str(student), "--stage", "guidance", "--steps", "1",
                    "--teacher-steps", "2", "--max-steps", "1", "--batch-size", "4", "--trainer.precision=fp32",
                    "--trainer.progress=false", "--trainer.log_every=1"]) == 0
    capsys.readouterr()
    for command in ("sample", "bench"):
        user_error([command, "--from", student / "final", "--cfg-scale", "2.5", "--out", tmp_path / "s.png"][
                   : None if command == "sample" else -2], capsys,
                   "--cfg-scale 2.5", "w input", "cfg_scale = 1 + w", "--sampler.guidance_w=1.5", "trained on w in 0..4")
    user_error(["eval", "--from", student / "final", "--cfg-scale", "3"], capsys, "--sampler.guidance_w=2")
    code, out, err = cli(["sample", "--from", student / "final", "--num", 2, "--sampler.guidance_w=1.5",
                          "--out", tmp_path / "s.png"], capsys)
    assert code == 0, err


def test_eval_on_tiny_or_empty_image_sets(tmp_path, capsys):
    # before: an empty folder or a single image ended in a ValueError traceback; 2 images crashed in precision/recall,
    # and FID on a handful of images printed no warning
    import json

    from PIL import Image

    from effigen.data import DataConfig, build_dataset
    from effigen.images import to_uint8

    digits = to_uint8(build_dataset(DataConfig(name="digits", resolution=16), "train").images())
    for name, count in (("empty", 0), ("one", 1), ("five", 5)):
        (tmp_path / name).mkdir()
        for i, image in enumerate(digits[:count].permute(0, 2, 3, 1).numpy()):
            Image.fromarray(image).save(tmp_path / name / f"{i:04d}.png")
    user_error(["eval", "--images", tmp_path / "empty", "--ref-dataset", "digits"], capsys, "no images")
    user_error(["eval", "--images", tmp_path / "one", "--ref-dataset", "digits"], capsys, "1 generated image",
               "at least 2")
    code, out, err = cli(["eval", "--images", tmp_path / "five", "--ref-dataset", "digits", "--json",
                          tmp_path / "r.json"], capsys)
    assert code == 0, err
    assert "effigen eval: warning: FID on 5 generated images" in err and "FID (digits-net)" in out
    assert json.loads((tmp_path / "r.json").read_text())["warnings"]


def test_bugs_keep_their_traceback(monkeypatch, flow_folder, tmp_path):
    import effigen.cli.sample as sample_command

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(sample_command.Pipeline, "__call__", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["sample", "--from", str(flow_folder), "--num", "2", "--out", str(tmp_path / "a.png")])


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_the_executable_exits_with_the_commands_code_and_flushed_output(world_size):
    """`python -m effigen` goes through cli.main.entry: a torchrun worker (WORLD_SIZE > 1) leaves with os._exit after
    flushing, so its output must be complete and its exit code the command's, as for a single process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "WORLD_SIZE": world_size, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    ok = subprocess.run([sys.executable, "-m", "effigen", "presets"], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "mnist-dit" in ok.stdout and ok.stdout.rstrip().splitlines()[-1].strip()  # the whole listing, to its end
    assert ok.stdout == subprocess.run([sys.executable, "-m", "effigen", "presets"], env={**env, "WORLD_SIZE": "1"},
                                       capture_output=True, text=True, timeout=120).stdout
    bad = subprocess.run([sys.executable, "-m", "effigen", "no-such-command"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "unknown command 'no-such-command'" in bad.stderr
