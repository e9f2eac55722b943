"""CoCoOp (Zhou et al., CVPR 2022): CoOp's context shifted per image by a small meta-network.

Context v_m(x) = v_m + pi(x), with pi = Linear(D, D/16) - ReLU - Linear(D/16, width) applied to the
normalized image feature x; every class's prompt of an image uses that image's context, so the class
text features are per image: logits_ic = exp(s) cos(x_i, g(t_c(x_i))). Trainable: the M context vectors
and the meta-network, 4 x 512 + (512 x 32 + 32) + (32 x 512 + 512) = 35,360 at ViT-B/16.

The cost is B x C text-tower passes per batch (the reference trains with batch size 1 for this reason,
and evaluates every test image against every class); the passes run in chunks of `text_chunk_size`
prompts, each only up to its longest prompt, so memory does not grow with the class count at test time.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from vlm_adapt.backbones import Backbone
from vlm_adapt.backbones.towers import normalize
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.coop import CoOp
from vlm_adapt.methods.registry import register_method
from vlm_adapt.methods.tasks import ClassificationOutput


@register_method("cocoop")
class CoCoOp(CoOp):
    def __init__(self, backbone: Backbone, n_ctx: int = 4, ctx_init: str | None = "a photo of a",
                 meta_reduction: int = 16, **kwargs: Any):
        """`meta_reduction`: the meta-network's bottleneck is the image feature size divided by it (16)."""
        if kwargs.get("csc"):
            raise ConfigError("method=cocoop has one context shared by all classes: set method.module.csc=false.")
        super().__init__(backbone, n_ctx=n_ctx, ctx_init=ctx_init, **kwargs)
        image_dim = self.clip.visual.output_dim
        width = self.clip.token_embedding.weight.shape[1]
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(image_dim, image_dim // meta_reduction)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(image_dim // meta_reduction, width)),
        ]))

    def per_image_class_features(self, image_features: Tensor, space: LabelSpace) -> Tensor:
        """(B, C, D) normalized class features of every image's own prompts; `image_features` normalized."""
        tokens, positions = self._tokens(space)
        num_classes = len(tokens)
        contexts = self.ctx.unsqueeze(0) + self.meta_net(image_features).unsqueeze(1)  # (B, M, width)
        prompts = torch.arange(len(image_features) * num_classes, device=tokens.device)  # image-major
        eot = self.towers.eot_index(tokens).repeat(len(image_features))

        def encode(index: Tensor, eot_index: Tensor) -> Tensor:
            classes = index % num_classes
            ctx = contexts[index // num_classes]
            return self.towers.encode_text_embeddings(
                self.prompt_embeddings(tokens[classes], positions[classes], classes, ctx), eot_index)

        features = self.towers.encode_in_chunks(encode, prompts, eot, self.hparams.text_chunk_size)
        return normalize(features).view(len(image_features), num_classes, -1)

    def per_image_logits(self, images: Tensor, space: LabelSpace) -> tuple[Tensor, Tensor]:
        """(logits (B, C), class features (B, C, D)) of a batch of images."""
        image_features = normalize(self.encode_images(images))
        text_features = self.per_image_class_features(image_features, space)
        logits = self.clip.logit_scale.exp() * torch.einsum("bd,bcd->bc", image_features, text_features)
        return logits, text_features

    def forward(self, images: Tensor, space: LabelSpace) -> Tensor:
        return self.per_image_logits(images, space)[0]

    def classification_forward(self, batch: Any) -> ClassificationOutput:
        images, labels = batch[-2:]
        logits, text_features = self.per_image_logits(images, self.train_label_space)
        return ClassificationOutput(logits, labels, text_features, labels)
