"""A smoke version of the benchmark: two tasks, tiny sizes, every method, through the CLI."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diki_model import TrainConfig
from diki_model.bench.offline import offline_stream
from diki_model.bench.stream import METHODS, StreamBenchmark


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
    for r in results.values():
        assert r.eval_names == ["faces", "textures", extra[0].name]
        np.testing.assert_allclose(r.acc[0], zs[0])  # every method starts from zero-shot
        s = r.stream_matrix()
        assert r.metrics()["last"] == pytest.approx(s[-1].mean())
        assert r.metrics()["transfer"] == pytest.approx(s[0, 1])
        assert ((0 <= r.acc) & (r.acc <= 100)).all()
    # Shared training: the DIKI family gets identical learned-task accuracy under the true task
    # when routing is right, and routing is measured for the methods that route.
    assert results["diki"].routing_accuracy and len(results["diki"].routing_accuracy) == 2
    assert results["true-task"].routing_accuracy == []
    # The true-task method answers a not-yet-learned set with the frozen model: its transfer is zero-shot's.
    assert results["true-task"].metrics()["transfer"] == pytest.approx(results["zero-shot"].metrics()["transfer"])


def test_cli_writes_json_table_and_heatmaps(data_dir, tmp_path):
    from pipelines.cli import app

    out = tmp_path / "bench"
    args = [
        "bench", "stream", "--order", "faces,textures", "--data", str(data_dir), "--out", str(out),
        "--methods", "zero-shot,diki", "--extra-roles", "", "--backbone", "diki-test-tiny", "--epochs", "1",
        "--train-limit", "48", "--test-limit", "24",
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
