"""gso.apply / gso.analyze as a whole: healthy models pass unchanged, results come back as
the kind that went in, inputs are never modified, rollback, external data, HF models, Olive."""

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


def test_public_surface() -> None:
    assert gso.get_available_passes() == [
        "excise_dead_units", "factor_low_rank", "relu_to_leaky_relu", "cleanup",
    ]  # fmt: skip
    assert set(gso.__all__) <= set(dir(gso))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_healthy_model_passes_unchanged(exported, dynamo: bool) -> None:
    proto = onnx.load(str(exported("healthy_mlp", dynamo)))
    out, report = gso.apply(proto, feeds("healthy_mlp"))
    assert report.ok and all(p.rewrites == 0 for p in report.passes[:-1])
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
    assert dead[0].site.ir == "onnx" and dead[0].site.op == "Relu"
    assert dead[0].site.module.endswith("Gemm") and dead[0].evidence["constant_values"] == [0.0] * 16
    assert Diagnosis.from_json(d.to_json()).problems == d.problems


def test_same_kind_back_and_input_untouched(exported, tmp_path) -> None:
    src = exported("mlp")
    before = digest(src)
    # path in -> path out (written atomically, no temporary left behind)
    out = tmp_path / "out.onnx"
    got, report = gso.apply(str(src), feeds("mlp"), output=out)
    assert got == str(out) and report.output == str(out) and report.ok
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
    out, report = gso.apply(proto, d, ["excise_dead_units"])
    assert not report.verified and "not verified" in report.verification
    assert report.passes[0].rewrites == 2
    out2, report2 = gso.apply(proto, d, ["excise_dead_units"], data=feeds("mlp", n=2, seed=5))
    assert report2.verified and report2.ok
    js = json.loads(report2.to_json())
    assert js["format"] == "graphsurg.onnx_report/1" and js["ok"] is True
    assert "excise_dead_units: 2 rewrite(s), kept" in report2.summary()


def test_rollback_when_certificates_break(exported) -> None:
    proto = onnx.load(str(exported("dying")))
    cert = Certificates(max_output_change=1e-6)
    out, report = gso.apply(proto, feeds("dying"), ["relu_to_leaky_relu"], certificates=cert)
    rec = report.passes[0]
    assert rec.rewrites == 1 and not rec.kept and not report.ok
    assert "output change" in rec.reason and "max_output_change" in rec.reason
    assert report.rolled_back == ["relu_to_leaky_relu"]
    assert op_types(out) == op_types(proto)  # the rewrite was rolled back


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
    got, report = gso.apply(path, feeds("mlp"), output=out, save_external_data=True,
                            external_data_size_threshold=64)  # fmt: skip
    assert report.ok and got == out
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
    out, report = gso.apply(path, data, ["excise_dead_units"], output=tmp_path / "bert_small.onnx")
    rec = report.passes[0]
    assert rec.rewrites == 1 and report.ok
    assert "intermediate" in rec.notes[0] and "MatMul" in rec.notes[0]
    assert report.params_after == report.params_before - 16 * (32 + 1 + 32)
    assert op_types(out) == op_types(path)
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
    out, report = gso.apply(path, data, ["excise_dead_units", "cleanup"], output=tmp_path / "o.onnx")
    full_check(out)
    # whatever was kept is exact: the output equals the original's
    assert_same_outputs(path, out, data[0], EXACT_RTOL)
    refusals = [r for p in report.passes for r in p.refusals]
    if arch == "vit":  # GELU MLPs on random weights: nothing dormant, the graph passes unchanged
        assert report.ok and op_types(out) == op_types(path) and n_params(out) == n_params(path)
    else:  # the residual Add couples the last block's units with the shortcut: refused
        assert any("adds two branches" in r for r in refusals)


def test_olive_workflow_with_graphsurg_surgeon(exported, tmp_path) -> None:
    pytest.importorskip("olive")
    from olive.workflows import run as olive_run

    import graphsurg.passes.onnx.olive  # noqa: F401  (registers the surgeons)

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
