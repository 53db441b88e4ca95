"""Parity of our Flax CLIP text encoder with transformers on tiny random models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jax_inversion.models.convert import WeightMismatchError, convert_state_dict
from jax_inversion.models.clip import (
    CLIPTextConfig,
    CLIPTextTransformer,
    add_text_model_prefix,
    eos_positions_from_ids,
    init_abstract_params,
)

VOCAB, SEQ = 1000, 77
TOL = 1e-4


def _tiny_config(hidden_act, eos_token_id, projection):
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=SEQ,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        projection_dim=24,
        eos_token_id=eos_token_id,
        bos_token_id=0,
        pad_token_id=1,
        architectures=["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
    )


def _torch_model(config_dict, projection, seed=0):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(**config_dict, attn_implementation="eager")
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def _state_dict(model):
    return add_text_model_prefix({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})


def _ids(eos_token_id, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB - 1, size=(2, SEQ))
    ids[:, 0] = 0
    eos = eos_token_id if eos_token_id != 2 else VOCAB - 1
    ids[0, 9] = eos
    ids[0, 10:] = eos
    ids[1, 40] = eos
    return ids


def _convert(model, module):
    return convert_state_dict(_state_dict(model), init_abstract_params(module), ignore=(r"position_ids",))


CASES = [
    ("quick_gelu", 2, False),
    ("gelu", 999, False),
    ("quick_gelu", 999, True),
    ("gelu", 2, True),
]


@pytest.mark.parametrize("hidden_act,eos_token_id,projection", CASES)
def test_matches_transformers(hidden_act, eos_token_id, projection):
    config_dict = _tiny_config(hidden_act, eos_token_id, projection)
    model = _torch_model(config_dict, projection)
    config = CLIPTextConfig.from_dict(config_dict)
    assert config.has_projection == projection
    module = CLIPTextTransformer(config)
    params = {"params": _convert(model, module)}

    ids = _ids(eos_token_id)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
    out = module.apply(params, jnp.asarray(ids, jnp.int32))

    assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
    diffs = {
        "last_hidden_state": (out.last_hidden_state, ref.last_hidden_state),
        "hidden_states[-2]": (out.hidden_states[-2], ref.hidden_states[-2]),
        "hidden_states[-1]": (out.hidden_states[-1], ref.hidden_states[-1]),
    }
    if projection:
        diffs["text_embeds"] = (out.text_embeds, ref.text_embeds)
        with torch.no_grad():
            ref_pooled = model.text_model(torch.from_numpy(ids)).pooler_output
        diffs["pooled_output"] = (out.pooled_output, ref_pooled)
    else:
        diffs["pooled_output"] = (out.pooled_output, ref.pooler_output)
        assert out.text_embeds is None
    for name, (ours, theirs) in diffs.items():
        err = float(np.max(np.abs(np.asarray(ours) - theirs.numpy())))
        print(f"{hidden_act} eos={eos_token_id} proj={projection} {name}: max abs diff {err:.3e}")
        assert err < TOL, (name, err)


def test_eos_positions_follow_transformers_rule():
    ids = _ids(999)
    np.testing.assert_array_equal(eos_positions_from_ids(ids, 999), [9, 40])
    np.testing.assert_array_equal(eos_positions_from_ids(_ids(2), 2), [9, 40])


@pytest.mark.parametrize("projection", [False, True])
def test_inputs_embeds_equals_ids(projection):
    config_dict = _tiny_config("quick_gelu", 999, projection)
    module = CLIPTextTransformer(CLIPTextConfig.from_dict(config_dict))
    ids = jnp.asarray(_ids(999), jnp.int32)
    variables = {"params": _convert(_torch_model(config_dict, projection), module)}

    embeds = module.apply(variables, ids, method=CLIPTextTransformer.embed_tokens)
    assert embeds.shape == (2, SEQ, 32)
    apply = module.apply
    from_ids = apply(variables, ids)
    eos = eos_positions_from_ids(ids, 999)
    from_embeds = apply(variables, inputs_embeds=embeds, eos_positions=eos)
    for a, b in zip(jax.tree_util.tree_leaves(from_ids), jax.tree_util.tree_leaves(from_embeds)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert apply(variables, inputs_embeds=embeds).pooled_output is None
    init_from_embeds = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), inputs_embeds=embeds))
    assert jax.tree_util.tree_structure(init_from_embeds) == jax.tree_util.tree_structure(variables)
    with pytest.raises(ValueError):
        module.apply(variables, ids, inputs_embeds=embeds)
    with pytest.raises(ValueError):
        module.apply(variables)


def test_abstract_params_match_torch_keys():
    config_dict = _tiny_config("quick_gelu", 2, True)
    model = _torch_model(config_dict, True)
    abstract = init_abstract_params(CLIPTextTransformer(CLIPTextConfig.from_dict(config_dict)))
    assert abstract["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"].shape == (32, 32)
    assert abstract["text_projection"]["kernel"].shape == (32, 24)
    assert "bias" not in abstract["text_projection"]
    n_params = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract))
    assert n_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "key,mutate",
    [
        ("text_model.encoder.layers.1.mlp.fc1.weight", lambda sd, k: sd.pop(k)),
        ("text_model.encoder.layers.1.self_attn.q_proj.bias", lambda sd, k: sd.__setitem__(k.replace("q_proj", "query_proj"), sd.pop(k))),
        ("text_projection.weight", lambda sd, k: sd.pop(k)),
    ],
)
def test_missing_or_renamed_key_raises(key, mutate):
    config_dict = _tiny_config("quick_gelu", 2, True)
    model = _torch_model(config_dict, True)
    module = CLIPTextTransformer(CLIPTextConfig.from_dict(config_dict))
    sd = _state_dict(model)
    mutate(sd, key)
    with pytest.raises(WeightMismatchError, match=key.replace(".", r"\.")):
        convert_state_dict(sd, init_abstract_params(module), ignore=(r"position_ids",))


def test_config_from_dict_ignores_unknown_keys():
    d = {**_tiny_config("gelu", 2, False), "torch_dtype": "float16", "dropout": 0.0, "model_type": "clip_text_model"}
    config = CLIPTextConfig.from_dict(d)
    assert config.hidden_act == "gelu" and not config.has_projection and config.eos_token_id == 2
    assert CLIPTextConfig.from_dict({"architectures": None}).has_projection is False
    with pytest.raises(ValueError):
        CLIPTextConfig.from_dict({"hidden_act": "relu"})


def test_abstract_params_of_a_short_context_encoder():
    """A text encoder with fewer than 77 positions (the toy world's has 24) loads: shapes come from its config."""
    config_dict = dict(_tiny_config("quick_gelu", 2, False), max_position_embeddings=24)
    abstract = init_abstract_params(CLIPTextTransformer(CLIPTextConfig.from_dict(config_dict)))
    assert abstract["text_model"]["embeddings"]["position_embedding"]["embedding"].shape == (24, 32)
    n_params = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract))
    assert n_params == sum(p.numel() for p in _torch_model(config_dict, False).parameters())
