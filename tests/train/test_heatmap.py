"""Heatmaps of matched layer pairs (vlsi.train.heatmap): colours, labels, files."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from vlsi.train.heatmap import NEVER, colour, heatmap_json, render_heatmap, row_shares, save_heatmap

COUNTS = torch.tensor([[5, 3, 0, 0], [0, 2, 6, 0], [0, 0, 0, 0]])


def test_row_shares_sum_to_one_and_keep_empty_rows_zero():
    shares = row_shares(COUNTS)
    assert torch.allclose(shares[:2].sum(dim=1), torch.ones(2, dtype=shares.dtype))
    assert shares[2].sum() == 0
    assert shares[0, 0] == pytest.approx(5 / 8)


def test_colour_runs_from_light_to_dark():
    light, dark = colour(0.0), colour(1.0)
    assert sum(light) > 600 and sum(dark) < 150
    assert colour(-1.0) == light and colour(2.0) == dark  # clamped
    mids = [sum(colour(x / 10)) for x in range(11)]
    assert mids == sorted(mids, reverse=True)  # monotonically darker


def _pixels(figure) -> Image.Image:
    buf = io.BytesIO()
    figure.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def test_render_draws_cells_in_their_share_colour():
    cell = 40
    image = _pixels(render_heatmap(COUNTS, [1, 5, 9], [1, 5, 9, 13], title="t", cell=cell))
    assert image.width > 4 * cell and image.height > 3 * cell
    # every chosen cell in its share's colour (the darkest: row 1, column 2, share 0.75),
    # and the unchosen ones in grey
    pixels = {rgb for _, rgb in image.getcolors(maxcolors=1 << 20)}
    assert {colour(5 / 8), colour(3 / 8), colour(2 / 8), colour(6 / 8), NEVER} <= pixels
    # a matrix without a pair chosen has no share colour in its grid
    empty = _pixels(render_heatmap(COUNTS * 0, [1, 5, 9], [1, 5, 9, 13], cell=cell))
    assert colour(6 / 8) not in {rgb for _, rgb in empty.getcolors(maxcolors=1 << 20)}


def test_render_labels_cells_rows_and_axes():
    figure = render_heatmap(COUNTS, [1, 5, 9], [1, 5, 9, 13], title="last 10%")
    figure.draw_without_rendering()
    texts = {t.get_text() for t in figure.findobj(lambda a: hasattr(a, "get_text")) if t.get_text()}
    assert {"62%", "38%", "25%", "75%", "n=8", "n=0", "13", "9", "last 10%",
            "student layer", "teacher layer"} <= texts
    assert "0%" not in {t.get_text() for t in figure.axes[0].texts}  # unchosen cells stay blank


def test_same_counts_give_the_same_png(tmp_path):
    a, _ = save_heatmap(tmp_path / "a.png", COUNTS, [1, 5, 9], [1, 5, 9, 13], title="t")
    b, _ = save_heatmap(tmp_path / "b.png", COUNTS, [1, 5, 9], [1, 5, 9, 13], title="t")
    assert a.read_bytes() == b.read_bytes()


def test_render_checks_shapes():
    with pytest.raises(ValueError, match="row labels"):
        render_heatmap(COUNTS, [1, 5], [1, 5, 9, 13])
    with pytest.raises(ValueError, match="2-D"):
        render_heatmap(torch.zeros(3, dtype=torch.int64), [1], [1])


def test_save_writes_png_and_json(tmp_path):
    png, js = save_heatmap(tmp_path / "sub" / "heatmap_end.png", COUNTS, [1, 5, 9], [1, 5, 9, 13],
                           title="last 10%", steps=[91, 100])
    with Image.open(png) as im:
        assert im.format == "PNG"
    payload = json.loads(js.read_text())
    assert js.name == "heatmap_end.json"
    assert payload["counts"] == COUNTS.tolist()
    assert payload["row_labels"] == [1, 5, 9] and payload["col_labels"] == [1, 5, 9, 13]
    assert payload["steps"] == [91, 100] and payload["title"] == "last 10%"
    assert payload == {**heatmap_json(COUNTS, [1, 5, 9], [1, 5, 9, 13], title="last 10%"), "steps": [91, 100]}
