"""Run-length encoding: both pixel orders, overlaps, malformed strings."""

from __future__ import annotations

import numpy as np
import pytest

from unetlab.data.rle import labels_to_rles, rle_decode, rle_encode, rles_to_labels
from unetlab.errors import ErrorKind, UnetlabError


@pytest.mark.parametrize("order", ["F", "C"])
def test_roundtrip_random_masks(order):
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random((9, 13)) > 0.5
        np.testing.assert_array_equal(rle_decode(rle_encode(m, order), m.shape, order), m)


def test_column_major_numbering_is_kaggles():
    m = np.zeros((3, 4), bool)
    m[1:3, 0] = True  # pixels 2, 3 in column-major order
    m[0, 1] = True  # pixel 4
    assert rle_encode(m) == "2 3"
    assert rle_encode(m, "C") == "2 1 5 1 9 1"
    assert rle_decode("", (3, 4)).sum() == 0


def test_labels_roundtrip_and_first_object_keeps_overlaps():
    lab = np.zeros((6, 7), np.int32)
    lab[0:2, 0:3], lab[3:6, 2:7] = 1, 2
    np.testing.assert_array_equal(rles_to_labels(labels_to_rles(lab), lab.shape), lab)
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[0:2, 0:2], b[1:3, 1:3] = True, True
    out = rles_to_labels([rle_encode(a), "", rle_encode(b)], (4, 4))
    assert out[1, 1] == 1 and out[2, 2] == 3 and 2 not in out
    assert rles_to_labels([rle_encode(a), "", rle_encode(b)], (4, 4), skip_empty=True).max() == 2


@pytest.mark.parametrize("bad", ["1 2 3", "a b", "0 2", "10 20"])
def test_malformed_strings_raise(bad):
    with pytest.raises(UnetlabError):
        rle_decode(bad, (3, 4))


def test_one_table_of_conventions_for_writing_and_reading(tmp_path):
    from unetlab.data.rle import RLE_STYLES, read_rle_table, rle_convention
    from unetlab.inference import writers

    assert not hasattr(writers, "RLE_STYLES") or writers.RLE_STYLES is RLE_STYLES  # no second table
    assert rle_convention(["ImageId", "EncodedPixels"]) == ("imageid", "encodedpixels", "F")
    assert rle_convention(["id", "annotation", "width", "height"]) == ("id", "annotation", "C")
    assert rle_convention(["name", "mask"]) is None
    lab = np.zeros((5, 6), np.int32)
    lab[1:3, 2:5] = 4
    for style, (id_col, rle_col, order) in RLE_STYLES.items():
        path = writers.write_rle_csv(tmp_path / f"{style}.csv", [("img", lab)], style=style)
        assert path.read_text().splitlines()[0] == f"{id_col},{rle_col}"
        rles, _sizes, got_order, *_ = read_rle_table(path)
        assert got_order == order and np.array_equal(rles_to_labels(rles["img"], lab.shape, order) > 0, lab > 0)


def test_the_layout_evaluation_and_writers_decode_a_csv_alike(tmp_path):
    """One decoding of run-length CSVs: the rle_csv layout, `evaluate` and the writers' reader give the same
    labels, and the same one-line error (CSV and image id named) for a run outside the image."""
    from PIL import Image

    from unetlab.data.layouts import load_dataset
    from unetlab.evaluation.evaluate import _csv_source
    from unetlab.inference.writers import rle_csv_labels

    lab = np.zeros((6, 5), np.int32)
    lab[0:2, 0:2], lab[3:5, 2:5] = 1, 2
    rows = [f"a,{r},6,5" for r in labels_to_rles(lab)]
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("ImageId,EncodedPixels,Height,Width\n" + "\n".join(rows) + "\n")
    (tmp_path / "images").mkdir()
    for key in ("a", "b"):
        Image.fromarray(np.zeros((6, 5), np.uint8)).save(tmp_path / "images" / f"{key}.png")
    via = {"layout": load_dataset(tmp_path, "rle_csv").samples[0].load_mask(),
           "evaluate": _csv_source(csv_path).loaders["a"](), "writers": rle_csv_labels(csv_path)["a"]}
    for got in via.values():
        np.testing.assert_array_equal(got, lab)
    with open(csv_path, "a") as fh:
        fh.write("b,1 2,6,5\nb,29 9,6,5\n")  # the second run ends past the 30 pixels
    samples = {s.name: s for s in load_dataset(tmp_path, "rle_csv").samples}
    loaders = _csv_source(csv_path).loaders
    for decode in (samples["b"].load_mask, loaders["b"], lambda: rle_csv_labels(csv_path)):
        with pytest.raises(UnetlabError, match=r"train.csv: line 5: bad run-length mask for image id b: .*outside") as err:
            decode()
        assert err.value.kind is ErrorKind.UNREADABLE
