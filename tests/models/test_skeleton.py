"""The meta skeleton: the same module tree as LlamaForCausalLM built on meta, with no initialiser run."""

import torch

from models.config import LlamaConfig
from models.llama import LlamaForCausalLM
from models.skeleton import _SkipInit, meta_model

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attention_bias=True)


def signature(model):
    return {name: (tuple(t.shape), t.dtype, t.device.type) for name, t in
            [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]}


def test_same_tree_as_a_meta_model():
    for cfg in (CFG, CFG.replace(tie_word_embeddings=True)):
        with torch.device("meta"):
            reference = LlamaForCausalLM(cfg)
        skeleton = meta_model(cfg)
        assert signature(skeleton) == signature(reference)
        assert {where for _, _, where in signature(skeleton).values()} == {"meta"}
        assert (skeleton.lm_head.weight is skeleton.model.embed_tokens.weight) == cfg.tie_word_embeddings
        assert [type(m) for m in skeleton.modules()] == [type(m) for m in reference.modules()]


def test_no_initialiser_runs_and_no_random_number_is_drawn():
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    meta_model(CFG)
    assert torch.equal(torch.random.get_rng_state(), state)
    t = torch.arange(6.0)
    with _SkipInit():
        assert torch.nn.init.normal_(t) is t and torch.nn.init.uniform_(tensor=t) is t
        torch.nn.init.kaiming_uniform_(t.view(2, 3), a=5)
        doubled = t * 2  # every other torch function runs
    assert torch.equal(t, torch.arange(6.0)) and torch.equal(doubled, torch.arange(6.0) * 2)
