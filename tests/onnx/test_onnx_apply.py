"""gso.apply / gso.analyze as a whole: healthy models pass unchanged, results come back as
the kind that went in, inputs are never modified, exact by default, per-site rollback,
external data, HF models, Olive."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from _onnx_helpers import (
    EXPORTERS,
    assert_same_outputs,
    digest,
    feeds,
    full_check,
    n_params,
    op_types,
)
from _onnx_models import export

from graphsurg import Certificates, Diagnosis
from graphsurg import onnx as gso

EXACT_RTOL = 1e-5  # float32 summation-order round-off (see test_onnx_passes)


def _ops(model: object) -> list[str]:
    """Op types without ``Constant`` nodes (the adapter writes their tensors back as
    initializers)."""
    return [t for t in op_types(model) if t != "Constant"]  # type: ignore[arg-type]


def test_public_surface() -> None:
    names = gso.get_available_passes()
    assert set(names) == {"excise_dead", "factor_low_rank", "activation_swap", "cleanup"}
    assert names[-1] == "cleanup"
    assert set(gso.__all__) <= set(dir(gso))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_healthy_model_passes_unchanged(exported, dynamo: bool) -> None:
    proto = onnx.load(str(exported("healthy_mlp", dynamo)))
    out, res = gso.apply(proto, feeds("healthy_mlp"))
    assert res.ok and res.kept == [] and res.ir == "onnx"
    assert op_types(out) == op_types(proto)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert_same_outputs(proto, out, feeds("healthy_mlp", n=1, seed=3)[0], 0.0)


def test_analyze_finds_planted_units(exported) -> None:
    d = gso.analyze(exported("mlp"), feeds("mlp"))
    assert d.capture == "onnxruntime" and d.batches == 8
    dead = d.of_kind("DeadNeurons")
    assert [p.units for p in dead] == [tuple(range(0, 32, 2)), (1, 5, 7)]
    assert dead[0].site.ir == "onnx" and dead[0].site.op == "relu"
    assert dead[0].site.module.endswith("Gemm") and dead[0].evidence["constant_values"] == [0.0] * 16
    assert Diagnosis.from_json(d.to_json()).problems == d.problems


def test_same_kind_back_and_input_untouched(exported, tmp_path) -> None:
    src = exported("mlp")
    before = digest(src)
    # path in -> path out (written atomically, no temporary left behind)
    out = tmp_path / "out.onnx"
    got, res = gso.apply(str(src), feeds("mlp"), output=out)
    assert got == str(out) and res.output == str(out) and res.ok
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    full_check(out)
    assert n_params(out) < n_params(src)
    # ModelProto in -> ModelProto out; the proto is not modified
    proto = onnx.load(str(src))
    ser = proto.SerializeToString()
    got_p, _ = gso.apply(proto, feeds("mlp"))
    assert isinstance(got_p, onnx.ModelProto) and proto.SerializeToString() == ser
    # ir.Model in -> ir.Model out; the model is not modified
    model = ir.load(src)
    n = model.graph.num_nodes()
    w = model.graph.initializers["fc1.weight"].const_value.numpy().copy()  # type: ignore[union-attr]
    got_m, _ = gso.apply(model, feeds("mlp"))
    assert isinstance(got_m, ir.Model) and got_m is not model
    assert model.graph.num_nodes() == n
    assert np.array_equal(model.graph.initializers["fc1.weight"].const_value.numpy(), w)  # type: ignore[union-attr]
    assert digest(src) == before
    with pytest.raises(gso.OnnxInputError, match="never modifies its input"):
        gso.apply(str(src), feeds("mlp"), output=src)


def test_diagnosis_input_and_report_json(exported) -> None:
    proto = onnx.load(str(exported("mlp")))
    d = gso.analyze(proto, feeds("mlp"))
    out, res = gso.apply(proto, d, ["excise_dead_units"])  # the old pass name still works
    assert "not verified" in res.verified_on
    assert len(res.kept_at("excise_dead")) == 2
    out2, res2 = gso.apply(proto, d, ["excise_dead"], data=feeds("mlp", n=2, seed=5))
    assert res2.ok and "verified on 2 given held-out batch(es)" in res2.verified_on
    js = json.loads(res2.to_json())
    assert js["format"] == "graphsurg.surgery/1" and js["ok"] is True and js["ir"] == "onnx"
    assert js["size"]["params_after"] < js["size"]["params_before"]
    text = res2.summary()
    assert "2 of 2 schema(s) kept" in text and "excise_dead" in text and "nodes " in text


def test_rollback_when_certificates_break(exported) -> None:
    proto = onnx.load(str(exported("dying")))
    out, res = gso.apply(proto, feeds("dying"), ["activation_swap"], max_output_change=1e-6)
    assert not res.ok and [r["replacement"] for r in res.rolled_back] == ["activation_swap"]
    reason = res.rolled_back[0]["reason"]
    assert "output change" in reason and "max_output_change" in reason
    assert op_types(out) == op_types(proto)  # the rewrite was rolled back
    assert "rolled back: #0 activation_swap" in res.summary()


def test_exact_by_default(exported) -> None:
    """The lossy ReLU -> LeakyReLU swap would apply to the dying model (it does when asked);
    by default nothing changes the function: outputs within the exact tolerance."""
    proto = onnx.load(str(exported("dying")))
    data = feeds("dying")
    # without healing a swap does not revive dormant units: the dead-unit certificate is off
    cert = Certificates(max_output_change=1.0, require_no_dead_units=False)
    asked, res = gso.apply(proto, data, allow_inexact=True, certificates=cert)
    assert res.kept_at("activation_swap") and "LeakyRelu" in op_types(asked)
    out, res = gso.apply(proto, data)
    assert res.ok and not res.kept_at("activation_swap") and "LeakyRelu" not in op_types(out)
    for feed in data:
        assert_same_outputs(proto, out, feed, EXACT_RTOL)
    with pytest.raises(gso.OnnxInputError, match="change the model's function.*allow-inexact"):
        gso.apply(proto, data, ["activation_swap"])


def test_external_data_round_trip(exported, tmp_path) -> None:
    src = onnx.load(str(exported("mlp")))
    folder = tmp_path / "ext"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save(src, str(path), save_as_external_data=True, location="m.onnx.data",
              size_threshold=64)  # fmt: skip
    assert (folder / "m.onnx.data").exists()
    before = digest(folder / "m.onnx.data")
    out = tmp_path / "o" / "small.onnx"
    got, res = gso.apply(path, feeds("mlp"), output=out, save_external_data=True,
                         external_data_size_threshold=64)  # fmt: skip
    assert res.ok and got == out
    assert (out.parent / "small.onnx.data").exists()
    assert digest(folder / "m.onnx.data") == before
    loaded = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in loaded.graph.initializer)
    full_check(out)
    assert_same_outputs(path, out, feeds("mlp", n=1, seed=9)[0], EXACT_RTOL)


def _hf_bert(tmp_path):  # type: ignore[no-untyped-def]
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, vocab_size=100, hidden_act="relu")  # fmt: skip
    bert = T.BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # plant 16 dead units in layer 0's feed-forward
        bert.encoder.layer[0].intermediate.dense.weight[:16] = 0
        bert.encoder.layer[0].intermediate.dense.bias[:16] = -1e3

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = bert

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=x).last_hidden_state

    return export(Wrap(), torch.randint(0, 100, (2, 8)), tmp_path / "bert.onnx", dynamo=False)


def test_hf_bert_excision(tmp_path) -> None:
    path = _hf_bert(tmp_path)
    rng = np.random.default_rng(0)
    data = [{"x": rng.integers(0, 100, (8, 8)).astype(np.int64)} for _ in range(6)]
    out, res = gso.apply(path, data, ["excise_dead"], output=tmp_path / "bert_small.onnx")
    [v] = res.kept_at("excise_dead")
    assert res.ok and "intermediate" in v.site
    assert res.size["params_after"] == res.size["params_before"] - 16 * (32 + 1 + 32)
    assert _ops(out) == _ops(path)
    full_check(out)
    assert_same_outputs(path, out, data[0], EXACT_RTOL)


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_hf_vision_models(tmp_path, arch: str) -> None:
    import transformers as T

    torch.manual_seed(0)
    if arch == "vit":
        m = T.ViTModel(T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64),
                       add_pooling_layer=False)  # fmt: skip
    else:
        m = T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                         layer_type="basic"))  # fmt: skip

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            o = self.m(pixel_values=x)
            return o.last_hidden_state if arch == "vit" else o.pooler_output

    path = export(Wrap(), torch.randn(2, 3, 32, 32), tmp_path / f"{arch}.onnx", dynamo=False)
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((8, 3, 32, 32)).astype(np.float32)} for _ in range(4)]
    d = gso.analyze(path, data)
    assert d.capture == "onnxruntime" and d.layers  # activations were observed
    out, res = gso.apply(path, data, ["excise_dead", "cleanup"], output=tmp_path / "o.onnx")
    full_check(out)
    # whatever was kept is exact: the output equals the original's
    assert_same_outputs(path, out, data[0], EXACT_RTOL)
    refusals = [r for _, r in res.plan.untreated] + [r["reason"] for r in res.rolled_back]
    if arch == "vit":  # GELU MLPs on random weights: nothing dormant, the graph passes unchanged
        assert res.ok and _ops(out) == _ops(path)
        assert res.size["params_after"] == res.size["params_before"]
    else:  # units constant on calibration data: refused (not constant) or rolled back (they
        # fire on held-out data) -- each with its reason, never kept inexact
        assert refusals and all(refusals), res.summary()


def test_olive_workflow_with_graphsurg_surgeon(exported, tmp_path) -> None:
    pytest.importorskip("olive")
    from olive.workflows import run as olive_run

    import graphsurg.olive  # noqa: F401  (registers the surgeons)

    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((256, 16)).astype(np.float32))
    cfg = {
        "input_model": {"type": "ONNXModel", "model_path": str(exported("mlp"))},
        "passes": {
            "surgery": {
                "type": "GraphSurgeries",
                "surgeries": [{"surgeon": "GraphsurgExciseDeadUnits", "data": str(calib)}],
            }
        },
        "output_dir": str(tmp_path / "olive_out"),
        "cache_dir": str(tmp_path / "olive_cache"),
        "log_severity_level": 3,
    }
    olive_run(cfg)
    out = tmp_path / "olive_out" / "model.onnx"
    assert out.exists()
    dims = {t.name: tuple(t.dims) for t in onnx.load(str(out)).graph.initializer}
    assert dims["fc1.weight"] == (16, 16) and dims["fc2.weight"] == (29, 16)
    full_check(out)
    assert_same_outputs(exported("mlp"), out, feeds("mlp", n=1)[0], EXACT_RTOL)
