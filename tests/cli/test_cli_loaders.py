"""Model/data/loss loaders: file formats, specs, and refusal of anything that could run code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from graphsurg import BadInputError
from graphsurg._loaders import is_spec, load_data, load_loss, load_model


def test_npz_rows_are_cut_into_tuple_batches(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", y=np.arange(10.0), x=np.ones((10, 3)))  # x first whatever the order
    b = load_data(str(tmp_path / "d.npz"), batch_size=4)
    assert [t[0].shape[0] for t in b] == [4, 4, 2]
    assert b[0][0].shape == (4, 3) and b[0][0].dtype == torch.float32
    assert torch.equal(b[2][1], torch.tensor([8.0, 9.0]))
    assert len(load_data(str(tmp_path / "d.npz"), batch_size=4, max_batches=2)) == 2


def test_npz_object_arrays_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "o.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(BadInputError, match="without pickled objects"):
        load_data(str(tmp_path / "o.npz"))


def test_npz_mismatched_rows(tmp_path: Path) -> None:
    np.savez(tmp_path / "m.npz", x=np.ones((10, 3)), y=np.ones(9))
    with pytest.raises(BadInputError, match="different first dimensions"):
        load_data(str(tmp_path / "m.npz"))


def test_pt_forms(tmp_path: Path) -> None:
    torch.save(torch.ones(5, 2), tmp_path / "t.pt")
    assert [t.shape[0] for t in load_data(str(tmp_path / "t.pt"), batch_size=2)] == [2, 2, 1]
    batches = [(torch.ones(2, 2), torch.zeros(2)), (torch.ones(3, 2), torch.zeros(3))]
    torch.save(batches, tmp_path / "l.pt")
    got = load_data(str(tmp_path / "l.pt"))
    assert len(got) == 2 and got[1][0].shape == (3, 2)
    torch.save([], tmp_path / "e.pt")
    with pytest.raises(BadInputError, match="no batches"):
        load_data(str(tmp_path / "e.pt"))


def test_pt_with_pickled_class_is_refused(tmp_path: Path) -> None:
    torch.save({"x": torch.ones(2), "obj": Path("x")}, tmp_path / "p.pt")
    with pytest.raises(BadInputError, match="refuses to load"):
        load_data(str(tmp_path / "p.pt"))


def test_unknown_suffix_and_missing(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(BadInputError, match="unsupported file type '.csv'"):
        load_data(str(tmp_path / "d.csv"))
    with pytest.raises(BadInputError, match="unsupported file type '.pt'"):
        torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "m.pt")
        load_model(str(tmp_path / "m.pt"))
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    with pytest.raises(BadInputError, match="not a readable torch.export archive"):
        load_model(str(tmp_path / "bad.pt2"))


def test_pt2_roundtrip(tmp_path: Path) -> None:
    m = torch.nn.Sequential(torch.nn.Linear(3, 2))
    x = torch.randn(4, 3)
    torch.export.save(torch.export.export(m, (x,)), tmp_path / "m.pt2")
    loaded = load_model(str(tmp_path / "m.pt2"))
    torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)  # same graph, same weights


def test_specs_and_losses() -> None:
    assert is_spec("pkg.mod:make") and not is_spec("model.pt2") and not is_spec("C:/x/y.pt2")
    assert load_loss(None) is None
    mse = load_loss("mse")
    assert mse is not None
    out = torch.zeros(2, 3)
    assert float(mse(out, (out, torch.ones(2, 3)))) == 1.0
    ce = load_loss("cross_entropy")
    assert ce is not None and float(ce(torch.zeros(2, 4), (None, torch.tensor([0, 1])))) > 0
    with pytest.raises(BadInputError, match="pass mse, cross_entropy"):
        load_loss("hinge")
    with pytest.raises(BadInputError, match="no target"):
        mse(out, out)
