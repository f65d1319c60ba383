"""CLIP text encoders and the tokenizer against transformers on random weights and a small BPE vocabulary."""
import json

import pytest
import torch
import transformers
from tokenizers.pre_tokenizers import ByteLevel

from flashstep.models.clip import CLIPTextModel, SDXLTextEncoders
from flashstep.models.configs import CLIPTextConfig
from flashstep.models.tokenizer import CLIPTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

LOW_PRECISION = [torch.float16, torch.bfloat16]

# Small encoders: vocabulary 1000 with <|startoftext|> = 998 and <|endoftext|> = 999, the largest id as in CLIP.
SMALL = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             bos_token_id=998)
SMALL_CONFIGS = {
    "quick_gelu": CLIPTextConfig(**SMALL, hidden_act="quick_gelu", eos_token_id=2),
    "gelu": CLIPTextConfig(**SMALL, hidden_act="gelu", eos_token_id=2),
    "projection": CLIPTextConfig(**SMALL, hidden_act="gelu", eos_token_id=2, with_projection=True, projection_dim=24),
    "eos_id_pooling": CLIPTextConfig(**SMALL, hidden_act="quick_gelu", eos_token_id=999),
}
FULL_CONFIGS = {"clip_l": CLIPTextConfig.clip_l, "openclip_h": CLIPTextConfig.openclip_h,
                "openclip_bigg": CLIPTextConfig.openclip_bigg}


def reference_factory(config):
    hf_config = transformers.CLIPTextConfig(**config.to_transformers())
    model_class = transformers.CLIPTextModelWithProjection if config.with_projection else transformers.CLIPTextModel
    return lambda: model_class(hf_config)


def reference_state(reference, config):
    """transformers' CLIPTextModel keys lack the checkpoint files' ``text_model.`` prefix."""
    state = reference.state_dict()
    return state if config.with_projection else {"text_model." + k: v for k, v in state.items()}


def token_ids(batch, length, vocab_size, seed=0, pad_id=None):
    """(B, L) prompts as the tokenizer makes them: start, words, end, then padding (end token or pad_id)."""
    generator = torch.Generator().manual_seed(seed)
    bos, eos = vocab_size - 2, vocab_size - 1
    ids = torch.randint(1, vocab_size - 2, (batch, length), generator=generator)
    ids[:, 0] = bos
    for row in range(batch):
        end = 3 + (5 * row) % (length - 4)
        ids[row, end] = eos
        ids[row, end + 1:] = eos if pad_id is None else pad_id
    return ids


def reference_outputs(reference, config, ids):
    """(last_hidden_state, hidden_states[-2], pooled or projected)."""
    out = reference(ids, output_hidden_states=True)
    pooled = out.text_embeds if config.with_projection else out.pooler_output
    return out.last_hidden_state, out.hidden_states[-2], pooled


def ours_outputs(model, ids):
    last, pooled = model(ids, pooled=True)
    penultimate, pooled_with_penultimate = model(ids, penultimate=True, pooled=True)
    torch.testing.assert_close(pooled_with_penultimate, pooled, atol=0, rtol=0)
    return last, penultimate, pooled


@pytest.fixture(scope="module")
def small_models(parity):
    models = {}
    for index, (name, config) in enumerate(SMALL_CONFIGS.items()):
        reference = parity.random_reference(reference_factory(config), seed=20 + index)
        ours = CLIPTextModel(config)
        ours.load_state_dict(reference_state(reference, config), strict=True)
        models[name] = (reference, ours)
    return models


@pytest.mark.parametrize("pad_id", [None, 0], ids=["pad_eos", "pad_bang"])
@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_small_config_fp32(small_models, parity, name, pad_id):
    reference, ours = small_models[name]
    ids = token_ids(3, 77, SMALL["vocab_size"], pad_id=pad_id)
    for label, got, expected in zip(("last", "penultimate", "pooled"), ours_outputs(ours, ids),
                                    reference_outputs(reference, SMALL_CONFIGS[name], ids)):
        parity.assert_fp32_parity(got, expected, f"clip {name} {label}")


@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_penultimate_alone_stops_before_the_last_layer(small_models, name):
    reference, ours = small_models[name]
    ids = token_ids(2, 77, SMALL["vocab_size"], seed=2)
    penultimate = ours(ids, penultimate=True)
    torch.testing.assert_close(penultimate, ours(ids, penultimate=True, pooled=True)[0], atol=0, rtol=0)
    last_layer = ours.text_model.encoder.layers[-1]
    calls = []
    handle = last_layer.register_forward_hook(lambda *args: calls.append(1))
    try:
        ours(ids, penultimate=True)
    finally:
        handle.remove()
    assert not calls


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", ["quick_gelu", "projection"])
def test_small_config_low_precision(small_models, parity, name, dtype):
    reference, _ = small_models[name]
    config = SMALL_CONFIGS[name]
    reference_low = parity.cast_copy(reference_factory(config), reference.state_dict(), dtype)
    ours_low = parity.ours_sharing(lambda: CLIPTextModel(config), reference_state(reference_low, config))
    ids = token_ids(2, 77, SMALL["vocab_size"], seed=1)
    for label, got, expected, expected_low in zip(("last", "penultimate", "pooled"), ours_outputs(ours_low, ids),
                                                  reference_outputs(reference, config, ids),
                                                  reference_outputs(reference_low, config, ids)):
        parity.assert_low_precision_parity(got, expected, expected_low, f"clip {name} {label} {dtype}")


@pytest.fixture(scope="module")
def full_model(request, parity):
    config = FULL_CONFIGS[request.param]()
    reference = parity.random_reference(reference_factory(config), seed=30)
    ours = parity.ours_sharing(lambda: CLIPTextModel(config), reference_state(reference, config))
    yield request.param, config, reference, ours


@pytest.mark.slow
@pytest.mark.parametrize("full_model", list(FULL_CONFIGS), indirect=True)
def test_full_config(full_model, parity):
    """The real encoders at 16 tokens: CLIP-L (quick_gelu), OpenCLIP-H (gelu), bigG (projection, penultimate);
    CLIP-L also in fp16 and bf16."""
    name, config, reference, ours = full_model
    ids = token_ids(2, 16, config.vocab_size, seed=4)
    expected = reference_outputs(reference, config, ids)
    for label, got, want in zip(("last", "penultimate", "pooled"), ours_outputs(ours, ids), expected):
        parity.assert_fp32_parity(got, want, f"clip {name} full {label}")
    if name != "clip_l":
        return
    for dtype in LOW_PRECISION:
        reference_low = parity.cast_copy(reference_factory(config), reference.state_dict(), dtype)
        ours_low = parity.ours_sharing(lambda: CLIPTextModel(config), reference_state(reference_low, config))
        for label, got, want, want_low in zip(("last", "penultimate", "pooled"), ours_outputs(ours_low, ids), expected,
                                              reference_outputs(reference_low, config, ids)):
            parity.assert_low_precision_parity(got, want, want_low, f"clip {name} full {label} {dtype}")


@pytest.mark.parametrize("name", FULL_CONFIGS)
def test_full_config_keys_and_round_trip(name):
    config = FULL_CONFIGS[name]()
    with torch.device("meta"):
        ours = CLIPTextModel(config)
        reference = reference_factory(config)()
    expected = {k: v.shape for k, v in reference_state(reference, config).items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    assert CLIPTextConfig.from_transformers(reference.config.to_dict()) == config
    assert CLIPTextConfig.from_transformers(config.to_transformers()) == config


def test_presets():
    clip_l, clip_h, bigg = CLIPTextConfig.clip_l(), CLIPTextConfig.openclip_h(), CLIPTextConfig.openclip_bigg()
    assert (clip_l.hidden_size, clip_l.num_hidden_layers, clip_l.hidden_act) == (768, 12, "quick_gelu")
    assert (clip_h.hidden_size, clip_h.num_hidden_layers, clip_h.hidden_act) == (1024, 23, "gelu")
    assert (bigg.hidden_size, bigg.num_hidden_layers, bigg.projection_dim, bigg.with_projection) == (1280, 32, 1280, True)
    assert all(c.max_position_embeddings == 77 and c.eos_token_id == 2 for c in (clip_l, clip_h, bigg))


# ---------------------------------------------------------------------------------------------------------------
# tokenizer

WORDS = ["a", "photo", "of", "cat", "castle", "dog", "the", "hello", "sky", "!!", "painting", "oil"]
PROMPTS = [
    "A photo of a CAT",
    "   a  photo\tof \n\n the   DOG  ",
    "Hello!! the castle!",
    "",
    "ünïcödé sky, oil-painting",
    "a cat <|endoftext|> dog",
    "the sky's 2024 cats",
    "a photo of a cat " * 30,
]


def write_tokenizer_folder(folder, pad_token):
    """vocab.json + merges.txt (byte alphabet, word-final forms, a merge chain per word) and the two configs:
    tokenizer_config.json says <|endoftext|>, special_tokens_map.json says ``pad_token`` (as SD 2.x ships it)."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    merges = []
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols = [pair[0] + pair[1]] + symbols[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "pad_token": "<|endoftext|>", "model_max_length": 77, "do_lower_case": True,
         "tokenizer_class": "CLIPTokenizer"}))
    pad = {"content": pad_token, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": pad}))
    return folder


def transformers_ids(folder, prompts):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder))
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {"sd1": write_tokenizer_folder(root / "sd1", "<|endoftext|>"), "sd2": write_tokenizer_folder(root / "sd2", "!")}


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_tokenizer_matches_transformers(tokenizer_folders, kind):
    folder = tokenizer_folders[kind]
    ours = CLIPTokenizer.from_folder(folder)
    ids = ours(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), 77)
    assert torch.equal(ids, transformers_ids(folder, PROMPTS))
    expected_pad = 0 if kind == "sd2" else ours.eos_token_id
    assert ours.pad_token_id == expected_pad and ids[3, 2:].eq(expected_pad).all()
    assert ids[-1, -1] == ours.eos_token_id and ids[-1].eq(ours.eos_token_id).sum() == 1  # truncated, not padded
    assert ours.decode(ours(PROMPTS[1])[0].tolist()) == "a photo of the dog"


def test_tokenizer_from_tokenizer_json(tokenizer_folders, tmp_path):
    """A folder with only tokenizer.json (+ its tokenizer_config.json) as transformers saves it."""
    saved = tmp_path / "saved"
    transformers.CLIPTokenizer.from_pretrained(str(tokenizer_folders["sd2"])).save_pretrained(str(saved))
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (saved / name).unlink(missing_ok=True)
    assert (saved / "tokenizer.json").is_file()
    ours = CLIPTokenizer.from_folder(saved)
    assert ours.pad_token == "!"
    assert torch.equal(ours(PROMPTS), transformers_ids(tokenizer_folders["sd2"], PROMPTS))


def test_encode_prompt_and_sdxl_dual_encoder(tokenizer_folders, parity):
    """SDXL: context = [CLIP-L penultimate ‖ bigG penultimate], pooled = bigG's projected end token."""
    vocab_size = len(json.loads((tokenizer_folders["sd1"] / "vocab.json").read_text()))
    config_l = CLIPTextConfig(vocab_size=vocab_size, hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                              num_attention_heads=2, hidden_act="quick_gelu", eos_token_id=2)
    config_g = CLIPTextConfig(vocab_size=vocab_size, hidden_size=40, intermediate_size=80, num_hidden_layers=4,
                              num_attention_heads=4, hidden_act="gelu", eos_token_id=2, with_projection=True,
                              projection_dim=32)
    reference_l = parity.random_reference(reference_factory(config_l), seed=40)
    reference_g = parity.random_reference(reference_factory(config_g), seed=41)
    encoders = []
    for config, reference in ((config_l, reference_l), (config_g, reference_g)):
        model = CLIPTextModel(config)
        model.load_state_dict(reference_state(reference, config), strict=True)
        encoders.append(model)
    tokenizer_l = CLIPTokenizer.from_folder(tokenizer_folders["sd1"])
    tokenizer_g = CLIPTokenizer.from_folder(tokenizer_folders["sd2"])
    dual = SDXLTextEncoders(encoders[0], encoders[1], tokenizer_l, tokenizer_g)
    prompts = PROMPTS[:3]
    context, pooled = dual.encode_prompt(prompts)

    out_l = reference_l(transformers_ids(tokenizer_folders["sd1"], prompts), output_hidden_states=True)
    out_g = reference_g(transformers_ids(tokenizer_folders["sd2"], prompts), output_hidden_states=True)
    assert context.shape == (3, 77, 24 + 40) and pooled.shape == (3, 32)
    parity.assert_fp32_parity(context, torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1),
                              "sdxl context")
    parity.assert_fp32_parity(pooled, out_g.text_embeds, "sdxl pooled")
    parity.assert_fp32_parity(encoders[0].encode_prompt(prompts, tokenizer_l), out_l.last_hidden_state,
                              "encode_prompt last_hidden_state")


def test_sdxl_helper_needs_the_projection_encoder():
    plain = CLIPTextModel(SMALL_CONFIGS["gelu"])
    with pytest.raises(ValueError, match="text_projection"):
        SDXLTextEncoders(plain, plain)
