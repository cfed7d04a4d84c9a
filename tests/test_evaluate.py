import json

import numpy as np
import pytest
import torch

from effigen.data import DataConfig, build_dataset
from effigen.eval.evaluate import (Reference, balanced_labels, evaluate_images, generate_for_evaluation,
                                   load_extractor)
from effigen.eval.metrics import save_reference_statistics
from effigen.images import to_uint8
from effigen.models.dit import DiT
from effigen.objectives.flow_matching import FlowSamplerConfig, RectifiedFlowConfig
from effigen.pipeline import Pipeline

from conftest import randomize


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFIGEN_CACHE", str(tmp_path / "cache"))


def metric(record, key):
    return next(m["value"] for m in record["metrics"] if m["metric"] == key)


def test_held_out_mnist_is_close_and_corrupted_mnist_is_far():
    extractor = load_extractor("mnist-net")
    test_images = to_uint8(build_dataset(DataConfig(name="mnist", resolution=32), "test").images())
    reference = Reference(dataset="mnist", split="train", resolution=32, num=2000)
    clean = evaluate_images(test_images, reference, extractor, ("fid", "precision_recall", "is"), progress=False)
    generator = torch.Generator().manual_seed(0)
    noisy = (test_images.float() + 76 * torch.randn(test_images.shape, generator=generator)).clamp(0, 255).to(torch.uint8)
    corrupted = evaluate_images(noisy, reference, extractor, ("fid", "precision_recall"), progress=False)
    blurred_float = torch.nn.functional.avg_pool2d(test_images.float(), 5, stride=1, padding=2, count_include_pad=False)
    blurred = evaluate_images(blurred_float.round().to(torch.uint8), reference, extractor, ("fid",), progress=False)
    assert metric(clean, "fid") * 10 < metric(corrupted, "fid")
    assert metric(clean, "fid") * 10 < metric(blurred, "fid")
    assert metric(clean, "precision") > 0.8 and metric(clean, "recall") > 0.8
    assert metric(corrupted, "precision") < metric(clean, "precision")
    assert metric(clean, "is") > 5  # ten confidently recognised, balanced classes
    assert clean["metrics"][0]["name"] == "FID (mnist-net)" and clean["num_reference"] == 2000
    # the second run reads the cached reference features
    again = evaluate_images(test_images, reference, extractor, ("fid",), progress=False)
    assert metric(again, "fid") == pytest.approx(metric(clean, "fid"))


def test_reference_statistics_file_gives_the_same_fid(tmp_path):
    extractor = load_extractor("digits-net")
    train = to_uint8(build_dataset(DataConfig(name="digits", resolution=16), "train").images())
    test = to_uint8(build_dataset(DataConfig(name="digits", resolution=16), "test").images())
    features = extractor.features(train, progress=False)["features"]
    save_reference_statistics(tmp_path / "ref.npz", features.mean(0), np.cov(features, rowvar=False))
    from_stats = evaluate_images(test, Reference(statistics=str(tmp_path / "ref.npz")), extractor, ("fid",), progress=False)
    from_data = evaluate_images(test, Reference(dataset="digits", resolution=16), extractor, ("fid",), progress=False)
    assert metric(from_stats, "fid") == pytest.approx(metric(from_data, "fid"), rel=1e-4)


@pytest.fixture
def pipeline(tiny_dit_config):
    return Pipeline("dit-flow", randomize(DiT(tiny_dit_config)), RectifiedFlowConfig(),
                    FlowSamplerConfig(solver="euler", num_steps=2), {"dataset": "digits"})


def test_generation_is_balanced_and_independent_of_batching(pipeline):
    assert balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    a = generate_for_evaluation(pipeline, 10, seed=1, batch_size=10, chunk_size=4, progress=False)
    b = generate_for_evaluation(pipeline, 10, seed=1, batch_size=3, chunk_size=4, progress=False)
    assert a.dtype == torch.uint8 and a.shape == (10, 3, 8, 8)
    assert (a.int() - b.int()).abs().max() <= 1  # equal up to rounding across batch shapes
    assert not torch.equal(a, generate_for_evaluation(pipeline, 10, seed=2, chunk_size=4, progress=False))


def test_eval_cli_writes_a_record(pipeline, tmp_path, run_cli, capsys):
    pipeline.save_pretrained(tmp_path / "pipe")
    code, out, err = run_cli(["eval", "--from", tmp_path / "pipe", "--num", "40", "--json", tmp_path / "r.json",
                              "--resolution", "16", "--metrics", "fid,is,kid,precision_recall"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["feature_extractor"] == "digits-net" and record["num_generated"] == 40
    assert {m["metric"] for m in record["metrics"]} >= {"fid", "is", "kid", "precision", "recall"}
    assert record["settings"]["sampler"]["num_steps"] == 2 and "FID (digits-net)" in out
    code, out, err = run_cli(["eval", "--images", tmp_path / "missing", "--ref-dataset", "mnist"], capsys)
    assert code == 2 and "missing" in err


def test_eval_under_torchrun_equals_one_process(pipeline, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    pipeline.save_pretrained(tmp_path / "pipe")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), "EFFIGEN_CACHE": str(tmp_path / "c")}
    records = []
    for nproc in (1, 2):
        out = tmp_path / f"r{nproc}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                   "effigen", "eval", "--from", str(tmp_path / "pipe"), "--num-images", "30", "--resolution", "16",
                   "--device", "cpu", "--metrics", "fid,precision_recall", "--json", str(out),
                   "--save-images", str(tmp_path / f"images{nproc}.npz")]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        records.append(json.loads(out.read_text()))
    one, two = (np.load(tmp_path / f"images{n}.npz")["arr_0"] for n in (1, 2))
    assert one.shape == (30, 8, 8, 3) and np.abs(one.astype(int) - two.astype(int)).max() <= 1
    assert metric(records[0], "fid") == pytest.approx(metric(records[1], "fid"), rel=1e-2, abs=1e-3)


def _write_pngs(folder, images):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{i:04d}.png")


def test_reference_cache_misses_when_images_are_rewritten_in_place(tmp_path):
    # The cache used to key on the folder's mtime, which rewriting a file in place does not change (and which can be
    # restored): the stale features gave FID 1.05 where the new images give 156. It now keys on every file.
    import os

    extractor = load_extractor("digits-net")
    digits = to_uint8(build_dataset(DataConfig(name="digits", resolution=16), "train").images())
    generated, reference_images = digits[:200], digits[200:400]
    folder = tmp_path / "ref"
    _write_pngs(folder, reference_images)
    reference = Reference(images=str(folder), resolution=16)
    first = metric(evaluate_images(generated, reference, extractor, ("fid",), progress=False), "fid")
    assert metric(evaluate_images(generated, reference, extractor, ("fid",), progress=False), "fid") == first  # hit
    folder_times = os.stat(folder)
    _write_pngs(folder, 255 - reference_images)  # same names, new content: negatives of the digits
    os.utime(folder, ns=(folder_times.st_atime_ns, folder_times.st_mtime_ns))  # the folder looks untouched
    assert os.stat(folder).st_mtime_ns == folder_times.st_mtime_ns
    cached = metric(evaluate_images(generated, reference, extractor, ("fid",), progress=False), "fid")
    fresh = metric(evaluate_images(generated, reference, extractor, ("fid",), progress=False, use_cache=False), "fid")
    assert fresh > 10 * first  # the rewritten reference really is far
    assert cached == pytest.approx(fresh)  # a miss: recomputed, not the stale 'first'


def test_files_fingerprint_sees_every_file_change(tmp_path):
    import os
    import time

    from effigen.eval.evaluate import files_fingerprint

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"1234")
    base = files_fingerprint(tmp_path / "a")
    assert files_fingerprint(tmp_path / "a") == base
    stat = os.stat(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "x.png").write_bytes(b"12345")  # another size
    assert files_fingerprint(tmp_path / "a") != base
    time.sleep(0.05)  # past the file system's timestamp granularity (a jiffy)
    (tmp_path / "a" / "x.png").write_bytes(b"1234")
    os.utime(tmp_path / "a" / "x.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: ctime differs
    changed = files_fingerprint(tmp_path / "a")
    assert changed != base
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "y.png").write_bytes(b"")  # a file added in a subfolder (folder datasets)
    assert files_fingerprint(tmp_path / "a") != changed
    assert files_fingerprint(tmp_path / "a" / "x.png") != files_fingerprint(tmp_path / "a")  # a single file works too


def test_too_few_images_are_refused_and_small_sets_warn(tmp_path):
    from effigen.eval.evaluate import SmallSampleWarning
    from effigen.eval.metrics import EvaluationError

    extractor = load_extractor("digits-net")
    digits = to_uint8(build_dataset(DataConfig(name="digits", resolution=16), "train").images())
    reference = Reference(dataset="digits", resolution=16)
    with pytest.raises(EvaluationError, match="1 generated image: .* at least 2"):
        evaluate_images(digits[:1], reference, extractor, ("fid",), progress=False)
    with pytest.warns(SmallSampleWarning) as caught:
        record = evaluate_images(digits[:20], reference, extractor, ("fid", "kid", "precision_recall"), progress=False)
    messages = [str(w.message) for w in caught]
    assert any("FID on 20 generated images with 128-dimensional features" in m and "rank" in m for m in messages)
    assert any(m.startswith("KID from subsets of 20") for m in messages)
    assert any(m.startswith("precision/recall on 20 images") for m in messages)
    assert record["warnings"] == messages and metric(record, "fid") > 0
    with pytest.warns(SmallSampleWarning, match="precision/recall skipped"):  # 3 <= k images: skipped, not a crash
        record = evaluate_images(digits[:3], reference, extractor, ("fid", "precision_recall"), progress=False)
    assert {m["metric"] for m in record["metrics"]} == {"fid"}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallSampleWarning)  # enough images: no warning
        evaluate_images(digits[:300], Reference(dataset="digits", resolution=16, num=300), extractor, ("fid",),
                        progress=False)
