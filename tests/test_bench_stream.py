"""A smoke version of the benchmark: two tasks, tiny sizes, every method, through the CLI."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diki_model import TrainConfig, create_diki_model
from diki_model.bench.offline import offline_stream
from diki_model.bench.stream import METHODS, MethodResult, StreamBenchmark
from diki_model.data import load_split_tensors
from tests.test_model import frozen_clip_probs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from diki_model.datasets import build_domain

    out = tmp_path_factory.mktemp("domains")
    for name in ("faces", "textures", "shape-colour"):
        build_domain(name, out, train_size=64, test_size=32)
    return out


def test_every_method_runs_and_the_metrics_follow_the_matrix(data_dir):
    stream, _ = offline_stream(data_dir, order=["faces", "textures"], extra_roles=())
    extra = [t for t in offline_stream(data_dir, order=["shape-colour"], extra_roles=())[0]]
    extra[0].role = "heldout"
    bench = StreamBenchmark(
        "diki-test-tiny", None, stream, extra, METHODS, TrainConfig(epochs=1, batch_size=32),
        train_limit=64, test_limit=40, progress=False, log=lambda s: None,
    )  # fmt: skip
    results = bench.run()
    assert list(results) == list(METHODS)
    zs = results["zero-shot"].acc
    assert zs.shape == (3, 3) and np.allclose(zs, zs[0])  # the frozen model never changes
    # The zero-shot row, recomputed from the untouched CLIP on the same 32 test images per set.
    frozen = create_diki_model("diki-test-tiny", None, seed=0)
    for col, task in enumerate([*stream, extra[0]]):
        x, y = load_split_tensors(data_dir / task.name, "test", frozen.preprocess, limit=40)
        assert len(y) == 32
        probs = frozen_clip_probs(frozen, x, [task.template.format(c) for c in task.classes])
        assert zs[0, col] == pytest.approx(100.0 * int((probs.argmax(-1) == y).sum()) / 32, abs=1e-9)
    for r in results.values():
        assert r.eval_names == ["faces", "textures", extra[0].name]
        np.testing.assert_allclose(r.acc[0], zs[0])  # every method starts from zero-shot
        a = r.acc  # rows: zero-shot, after faces, after textures; columns: faces, textures, held-out
        assert r.metrics()["last"] == pytest.approx((a[2, 0] + a[2, 1]) / 2)
        assert r.metrics()["transfer"] == pytest.approx(a[1, 1])  # textures, before it is learned
        assert r.metrics()["average"] == pytest.approx((a[1, 0] + a[2, 0] + a[1, 1] + a[2, 1]) / 4)
        # Each accuracy is a whole number of the 32 test images.
        images = a * 32 / 100
        np.testing.assert_allclose(images, np.round(images), rtol=0, atol=1e-9)
    # Shared training: the DIKI family gets identical learned-task accuracy under the true task
    # when routing is right, and routing is measured for the methods that route.
    assert results["iki"].routing_accuracy and len(results["iki"].routing_accuracy) == 2
    # The learning check refuses, on validation figures, what the product would refuse; the refusing
    # methods then never route to those tasks. On this random backbone nothing is learned.
    for m in ("diki", "diki-standardized"):
        assert results[m].refused == [n for n, v in results[m].learning.items() if not v["ok"]]
        assert results[m].refused == ["faces", "textures"]
        np.testing.assert_array_equal(results[m].acc, zs)  # so the model stays the frozen one
        assert results[m].routing_accuracy == []
    assert results["iki"].refused == [] and results["iki"].learning.keys() == {"faces", "textures"}
    assert results["true-task"].routing_accuracy == []
    # The true-task method answers a not-yet-learned set with the frozen model: its transfer is zero-shot's.
    assert results["true-task"].metrics()["transfer"] == pytest.approx(results["zero-shot"].metrics()["transfer"])
    true_task = results["true-task"].acc
    assert true_task[1, 1] == zs[1, 1]  # textures after learning faces only
    np.testing.assert_array_equal(true_task[:, 2], zs[:, 2])  # the held-out set is never learned


def test_method_result_metrics_use_the_stream_columns_after_each_step():
    # Row 0 is zero-shot and the last column a held-out set: neither enters Transfer / Average / Last.
    acc = np.array(
        [
            [10.0, 20.0, 30.0],
            [80.0, 25.0, 31.0],
            [70.0, 90.0, 33.5],
        ]
    )
    r = MethodResult("m", ["a", "b", "held"], ["stream", "stream", "heldout"], acc)
    np.testing.assert_array_equal(r.stream_matrix(), [[80.0, 25.0], [70.0, 90.0]])
    # Transfer: b before it is learned = 25. Average: column means 75 and 57.5. Last: (70 + 90) / 2.
    assert r.metrics() == pytest.approx({"transfer": 25.0, "average": 66.25, "last": 80.0})
    assert r.retention() == pytest.approx({"held": 3.5})  # 33.5 after the last step vs 30 zero-shot
    assert r.to_dict()["metrics"] == r.metrics() and r.to_dict()["acc"] == acc.tolist()


def test_cli_writes_json_table_and_heatmaps(data_dir, tmp_path):
    from pipelines.cli import app

    out = tmp_path / "bench"
    args = [
        "bench", "stream", "--order", "faces,textures", "--data", str(data_dir), "--out", str(out),
        "--methods", "zero-shot,diki", "--extra-roles", "", "--backbone", "diki-test-tiny", "--epochs", "1",
        "--train-limit", "48", "--test-limit", "24", "--seeds", "0",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in payload["summary"]] == ["zero-shot", "diki"]
    assert payload["meta"]["stream"] == ["faces", "textures"]
    # No --lr: the backbone's measured rate; a random test backbone has none, so the authors' 5.
    assert payload["meta"]["train_config"]["lr"] == 5.0 and "--lr 5.0" in payload["meta"]["command"]
    assert (out / "heatmap-diki.png").read_bytes()[:4] == b"\x89PNG"
    assert "| diki |" in (out / "summary.md").read_text()
    assert "Transfer" in result.output


def test_unknown_method_and_domain_are_clear_errors(data_dir):
    with pytest.raises(ValueError, match="unknown domains"):
        offline_stream(data_dir, order=["nope"])
    stream, _ = offline_stream(data_dir, order=["faces"], extra_roles=())
    with pytest.raises(ValueError, match="unknown methods"):
        StreamBenchmark("diki-test-tiny", None, stream, [], ["magic"])


def test_cli_runs_several_seeds_and_writes_mean_and_spread_into_a_page(data_dir, tmp_path):
    from pipelines.cli import app

    out, doc = tmp_path / "bench", tmp_path / "results.md"
    doc.write_text("# Results\n\n<!-- bench-stream:begin -->\nold\n<!-- bench-stream:end -->\n\nkept\n")
    args = [
        "bench", "stream", "--order", "faces,textures", "--data", str(data_dir), "--out", str(out),
        "--methods", "zero-shot,diki,true-task", "--extra-roles", "", "--backbone", "diki-test-tiny", "--epochs", "1",
        "--train-limit", "48", "--test-limit", "24", "--seeds", "0,1", "--doc", str(doc),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    runs = [json.loads((out / "custom" / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    agg = json.loads((out / "aggregate.json").read_text())
    assert agg["runs"] == ["custom/seed-0", "custom/seed-1"]
    lasts = [next(r["last"] for r in run["summary"] if r["method"] == "true-task") for run in runs]
    assert agg["methods"]["true-task"]["columns"]["last"] == lasts
    mean, std = sum(lasts) / 2, abs(lasts[0] - lasts[1]) / 2**0.5  # sample std of two values
    text = doc.read_text()
    assert text.startswith("# Results\n") and text.rstrip().endswith("kept") and "old" not in text
    cell = f"{mean:.1f} ± {std:.1f}"
    assert any(line.startswith("| true-task |") and cell in line for line in text.splitlines()), text
    assert "--seeds 0,1" in text
