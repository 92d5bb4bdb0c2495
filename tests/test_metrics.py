import numpy as np
import pytest

from diki_model.metrics import plot_heatmap, stream_metrics

# Rows: after step t; columns: dataset i. Hand-computed values below.
ACC = np.array(
    [
        [80.0, 40.0, 30.0],
        [70.0, 90.0, 36.0],
        [60.0, 85.0, 95.0],
    ]
)


def test_metrics_on_a_hand_computed_matrix():
    m = stream_metrics(ACC)
    # Transfer: i=1 -> mean(acc[0,1]) = 40; i=2 -> mean(acc[0,2], acc[1,2]) = 33 -> (40+33)/2
    assert m.transfer == pytest.approx(36.5)
    # Average: column means 70, 71.666.., 53.666.. -> mean
    assert m.average == pytest.approx((70 + 215 / 3 + 161 / 3) / 3)
    # Last: mean of the last row
    assert m.last == pytest.approx(80.0)


def test_metrics_reject_non_square():
    with pytest.raises(ValueError, match="square"):
        stream_metrics(np.zeros((2, 3)))


def test_heatmap_png(tmp_path):
    out = plot_heatmap(ACC, ["a", "b", "c"], tmp_path / "h.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_metrics_of_one_and_two_steps():
    one = stream_metrics([[42.0]])
    assert np.isnan(one.transfer) and one.average == 42.0 and one.last == 42.0
    two = stream_metrics([[80.0, 10.0], [60.0, 90.0]])
    # Transfer: dataset 2 before it is learned = 10; Average: (70 + 50) / 2; Last: (60 + 90) / 2.
    assert (two.transfer, two.average, two.last) == (10.0, 60.0, 75.0)
    assert two.as_dict() == {"transfer": 10.0, "average": 60.0, "last": 75.0}


def test_metrics_are_computed_in_float64():
    # In float32, (1e8 + 1) / 2 rounds to 5e7 and the average to 2.5e7 exactly.
    acc = np.array([[1e8, 1.0], [1.0, 1.0]], dtype=np.float32)
    assert stream_metrics(acc).average == 25_000_000.75
    assert stream_metrics(acc).last == 1.0 and stream_metrics(acc).transfer == 1.0


def test_metrics_reject_empty_and_non_finite_matrices():
    with pytest.raises(ValueError, match=r"must be square N x N \(steps x datasets\), got shape \(0, 0\)"):
        stream_metrics(np.zeros((0, 0)))
    with pytest.raises(ValueError, match=r"got shape \(4,\)"):
        stream_metrics(np.zeros(4))
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="^accuracy matrix contains non-finite values$"):
            stream_metrics([[1.0, bad], [2.0, 3.0]])
