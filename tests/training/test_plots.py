"""The plots' styles: no two methods of a figure look the same."""

from fedspa.plots import style


def test_every_method_of_a_figure_has_its_own_style():
    looks = [(s["color"], s["linestyle"], s["marker"]) for s in (style(i) for i in range(24))]
    assert len(set(looks)) == len(looks)
