"""CoOp's options: class-token position (end / middle / front), class-specific context, ctx_init length."""

import pytest
import torch

from vlm_adapt.backbones import load_backbone
from vlm_adapt.data.label_space import LabelSpace
from vlm_adapt.errors import ConfigError
from vlm_adapt.methods.coop import CoOp

SPACE = LabelSpace("toy", ("tench", "english springer", "cassette player"), ("a photo of a {}.",))


def coop(**kwargs):
    model = CoOp(load_backbone("vlm-tiny", None), n_ctx=kwargs.pop("n_ctx", 4), **kwargs)
    model.attach_label_spaces(SPACE, [SPACE])
    return model


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_context_sits_exactly_where_the_placeholders_are(position, csc):
    model = coop(class_token_position=position, csc=csc)
    tokens, positions = model._tokens(SPACE)
    x_embedding = model.towers.token_embeddings(model.tokenizer(["X"]))[0, 1]
    with torch.no_grad():  # context = the placeholder's own embedding: the prompt must be unchanged
        model.ctx.copy_(x_embedding.expand_as(model.ctx))
    classes = torch.arange(len(tokens))
    torch.testing.assert_close(model.prompt_embeddings(tokens, positions, classes),
                               model.towers.token_embeddings(tokens))
    names = model.tokenizer(list(SPACE.classnames))
    for c, start in enumerate({"end": [1 + 4] * 3, "front": [1] * 3, "middle": [1 + 2] * 3}[position]):
        length = int(model.towers.eot_index(names)[c]) - 1
        assert torch.equal(tokens[c, start : start + length], names[c, 1 : 1 + length])


def test_class_specific_context_has_one_set_per_class_and_each_class_gets_its_own():
    model = coop(csc=True)
    assert model.ctx.shape == (3, 4, 64) and model.trainable_parameter_names() == ["ctx"]
    features = model.encode_label_space(SPACE)
    features[1].sum().backward()
    grad = model.ctx.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0
    other = LabelSpace("other", ("goldfish",), SPACE.templates)
    assert not model.supports_label_space(other) and model.supports_label_space(SPACE)


def test_ctx_init_length_by_tokens_or_by_the_references_word_count():
    # "itap" is two BPE tokens: CoOp's word count gives 4 context vectors, the token count 5
    assert coop(ctx_init="itap of a photo").ctx.shape[0] == 5
    assert coop(ctx_init="itap of a photo", ctx_init_length="words").ctx.shape[0] == 4
    assert coop(ctx_init="a photo of a").ctx.shape[0] == 4


def test_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match="end, middle, front|'end', 'middle', 'front'"):
        coop(class_token_position="left")
    with pytest.raises(ConfigError, match="ctx_init=null or csc=false"):
        coop(csc=True, ctx_init="a photo of a")
