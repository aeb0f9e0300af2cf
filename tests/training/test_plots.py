"""The plots' styles: no two methods of a figure look the same."""

from fedspa.plots import style


def test_every_method_of_a_figure_has_its_own_style():
    looks = [(s["color"], s["linestyle"], s["marker"]) for s in (style(i) for i in range(24))]
    assert len(set(looks)) == len(looks)


def test_the_accuracy_axis_names_the_split_it_was_measured_on(tmp_path, monkeypatch):
    import matplotlib.axes

    from fedspa.config import ExperimentConfig
    from fedspa.plots import plot_comparison, plot_run

    labels = []
    original = matplotlib.axes.Axes.set_ylabel
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel",
                        lambda self, text, *a, **k: (labels.append(text), original(self, text, *a, **k))[1])
    history = [{"round": r, "bytes_up": 10, "bytes_down": 10, "flops": 1e9, "acc_pooled": 0.5 + 0.1 * r,
                "acc_mean": 0.5, "acc_std": 0.1} for r in (1, 2)]
    for split in ("test", "validation"):
        config = ExperimentConfig.load(None, [f"data.evaluate_on={split}"])
        plot_run(history, tmp_path, config, "fedspa")
        plot_comparison({"fedspa": [history, history]}, tmp_path, config, 2)
    assert labels == ["personalized test accuracy (pooled)"] * 5 + ["personalized validation accuracy (pooled)"] * 5
