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


@pytest.fixture
def kept_figures(monkeypatch):
    """The figures plot_heatmap closes, kept open to be looked at."""
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    monkeypatch.undo()
    for fig in kept:
        plt.close(fig)


def test_heatmap_content(tmp_path, kept_figures):
    acc = [[59.94, 60.0], [12.25, 99.0], [5.0, 75.5]]  # 3 rows (steps), 2 columns (datasets)
    out = plot_heatmap(
        acc, ["x", "y"], tmp_path / "deep" / "er" / "h.png", row_names=["zero-shot", "after x", "after y"]
    )
    assert out == tmp_path / "deep" / "er" / "h.png" and out.read_bytes()[:4] == b"\x89PNG"
    [fig] = kept_figures
    ax, cbar = fig.axes
    assert tuple(fig.get_size_inches()) == pytest.approx((1.6 + 0.75 * 2, 1.4 + 0.5 * 3)) and fig.dpi == 110
    assert ax.get_title() == "accuracy after each step (%)" and ax.title.get_fontsize() == 10
    assert ax.get_xlabel() == "evaluated on"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y"] and list(ax.get_xticks()) == [0, 1]
    assert all(t.get_rotation() == 40 and t.get_horizontalalignment() == "right" for t in ax.get_xticklabels())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["zero-shot", "after x", "after y"]
    assert list(ax.get_yticks()) == [0, 1, 2]
    cells = {(t.get_position(), t.get_text()): t for t in ax.texts}
    want = {((0, 0), "59.9"): "white", ((1, 0), "60.0"): "black", ((0, 1), "12.2"): "white",
            ((1, 1), "99.0"): "black", ((0, 2), "5.0"): "white", ((1, 2), "75.5"): "black"}  # fmt: skip
    assert set(cells) == set(want)
    for key, colour in want.items():
        t = cells[key]
        assert (t.get_color(), t.get_fontsize(), t.get_horizontalalignment(), t.get_verticalalignment()) == (
            colour, 8, "center", "center",
        )  # fmt: skip
    [image] = ax.get_images()
    assert image.get_clim() == (0, 100) and image.get_cmap().name == "viridis" and ax.get_aspect() == "auto"
    np.testing.assert_array_equal(image.get_array(), np.asarray(acc))
    # The colour bar: a thin strip (fraction 0.046) just right of the matrix (pad 0.04), as laid out
    # by the pinned matplotlib.
    main, bar = ax.get_position(), cbar.get_position()
    assert bar.width / main.width == pytest.approx(0.0251796697 / 0.5003090889, rel=1e-3)
    gap = 0.8070946868 - (0.2848902330 + 0.5003090889)
    assert (bar.x0 - main.x1) / main.width == pytest.approx(gap / 0.5003090889, rel=1e-3)


def test_heatmap_default_rows_title_and_errors(tmp_path, kept_figures):
    plot_heatmap(np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64), ["a", "b", "c"], tmp_path / "h.png", title="T")
    [fig] = kept_figures
    ax = fig.axes[0]
    assert ax.get_title() == "T"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["after a", "after b"]  # one row per step so far
    assert sorted(t.get_text() for t in ax.texts) == ["1.0", "2.0", "3.0", "4.0", "5.0", "6.0"]
    assert tuple(fig.get_size_inches()) == pytest.approx((1.6 + 0.75 * 3, 1.4 + 0.5 * 2))
    for bad in (np.zeros((2, 2)), np.zeros(3)):
        with pytest.raises(ValueError, match=r"does not match 3 dataset names$"):
            plot_heatmap(bad, ["a", "b", "c"], tmp_path / "x.png")
