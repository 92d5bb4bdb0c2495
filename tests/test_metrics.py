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
