"""What artists type, in Qwen Text Encode (SDXL): ComfyUI's prompt weighting read exactly as
ComfyUI's own parser reads it (comfy.sd1_clip, compared character by character), malformed
weights as clear errors, the CLIP branch for trigger words (shape, strength, pooled blend), and
`embedding:` names taken out of the Qwen text and routed to the CLIP branch."""

from __future__ import annotations

import logging

import pytest
import qwenclip
import torch

# Prompts made to be tricky, read by the library exactly as ComfyUI reads them.
SAME_AS_COMFY = [
    "",
    "a cat",
    "(a cat)",
    "((a cat))",
    "(((a cat)))",
    "((((((deep))))))",
    "(a cat:1.3)",
    "(a cat:0.5) on a (table:1.2)",
    "((a cat:1.5))",
    "(a (cat:1.5) b:0.8)",
    "((a:1.2) b)",
    "((a:1.5):0.5)",
    "(( a ):1.5)",
    "(a:1.2)(b:0.8)",
    "(a:1.2)b(c)",
    "(a:1.2) (b:1.2) (c:1.2)",
    "(a:.5)",
    "(a:1e1)",
    "(a:1E-1)",
    "(a: 2 )",
    "(a:\t1.5\n)",
    "(a:1_0)",
    "(a:5.)",
    "(a:1.)",
    "(a:+1.5)",
    "(a:00.5)",
    "(a:1.10)",
    "(a:0)",
    "(a:100)",
    "(a:99.99)",
    r"\(a\)",
    r"\(a:1.5\)",
    r"(a \) b:1.2)",
    r"(\(a\):1.3)",
    r"a \\(b)",
    r"(a\:1.5)",
    "\\",
    r"a\b",
    "(a:1.5)\\",
    r"(a:1.5) \(not weighted\) (b)",
    "(a",
    "a)",
    "((a)",
    "(a))",
    "(a)) (b:1.5) c",
    ")(a:1.2)",
    "a (b c",
    "(a (b:1.2)",
    "()",
    "a () b",
    "(())",
    "(:1.2)",
    "(🦊 fox:1.3)",
    "(emoji 👍🏽 thumbs) ok",
    "一只(红色的狐狸:1.4)在雪中",
    "((猫))",
    "(𝒶𝒷𝒸:1.1)",
    "(Ça va? Très bien!:1.05)",
    "time 5:30 pm",
    "(at 5:30)",
    "a:1.2",
    "(a:b:1.2)",
    "line one\n(line two:1.2)\nline three",
    "(multi\nline:0.7)",
    "  spaces  (a:1.2)  ",
    "([a]:1.2) {b} <c>",
    "embedding:foo (a:1.2)",
]

# What the library refuses on purpose (ComfyUI would read the span as text or as an absurd
# weight): the bad weight, and the span it belongs to.
REJECTED = [
    ("a (red:abc) cube", "abc"),
    ("a (red:) cube", "red"),
    ("a (red:-1) cube", "-1"),
    ("a (red:nan) cube", "nan"),
    ("a (red:inf) cube", "inf"),
    ("a (red:101) cube", "101"),
    ("a (red:1e3) cube", "1e3"),
]

SIZES = (1024, 1024, 0, 0, 1024, 1024)


def comfy_chars(text: str) -> list[tuple[str, float]]:
    """Each character with its weight, as ComfyUI's CLIP tokenizer reads the prompt."""
    from comfy.sd1_clip import escape_important, token_weights, unescape_important

    return [(c, w) for seg, w in token_weights(escape_important(text), 1.0) for c in unescape_important(seg)]


def our_chars(text: str) -> list[tuple[str, float]]:
    return [(c, w) for seg, w in qwenclip.parse_prompt(text, "comfy") for c in seg]


def test_there_are_enough_tricky_prompts():
    assert len(SAME_AS_COMFY) >= 60 and len(set(SAME_AS_COMFY)) == len(SAME_AS_COMFY)


@pytest.mark.parametrize("text", SAME_AS_COMFY)
def test_the_parser_reads_weights_as_comfyui_does(text):
    theirs, ours = comfy_chars(text), our_chars(text)
    assert "".join(c for c, _ in ours) == "".join(c for c, _ in theirs)
    for i, ((c, w), (_, tw)) in enumerate(zip(ours, theirs, strict=True)):
        assert abs(w - tw) <= 1e-6, f"{text!r}: character {i} {c!r} weighs {w}, ComfyUI says {tw}"


@pytest.mark.parametrize("text,bad", REJECTED)
def test_a_malformed_weight_is_an_error_naming_the_span(pack, encoder, text, bad):
    with pytest.raises(ValueError) as e:
        pack.nodes.QwenTextEncodeSDXL().encode(encoder, text, *SIZES)
    msg = str(e.value)
    assert "red" in msg and bad in msg and "prompt_syntax" in msg, msg
    # the same text read as plain text is fine
    pack.nodes.QwenTextEncodeSDXL().encode(encoder, text, *SIZES, prompt_syntax="none")


def _encode(pack, encoder, text, **kw):
    cond, extra = pack.nodes.QwenTextEncodeSDXL().encode(encoder, text, *SIZES, **kw)[0][0]
    return cond, extra


def test_weighting_is_on_by_default_and_none_reads_the_text_as_written(pack, encoder):
    plain, _ = _encode(pack, encoder, "a red cube", prompt_syntax="none")
    # weight 1: the syntax is removed and the output is bit-identical to the plain text
    assert torch.equal(_encode(pack, encoder, "a (red:1.0) cube")[0], plain)
    weighted, _ = _encode(pack, encoder, "a (red:1.5) cube")
    assert not torch.equal(weighted, plain)
    lib = encoder.base.encoder
    want, _ = lib.encode(["a (red:1.5) cube"], syntax="comfy")
    assert torch.equal(weighted, want)
    literal, _ = _encode(pack, encoder, "a (red:1.0) cube", prompt_syntax="none")
    assert not torch.equal(literal, plain), "none: the LLM reads the brackets"
    a1111 = _encode(pack, encoder, "a [red] cube", prompt_syntax="a1111")[0]
    assert not torch.equal(a1111, _encode(pack, encoder, "a [red] cube")[0])


# -- the CLIP branch -------------------------------------------------------------------------


def _clip_encode(clip, text):
    """What CLIPTextEncode makes of `text`: cond and pooled."""
    import nodes

    ((cond, extra),) = nodes.CLIPTextEncode().encode(clip, text)[0]
    return cond, extra["pooled_output"]


def test_the_clip_branch_appends_clip_tokens_scaled_and_keeps_our_pooled(pack, encoder, teacher_clip):
    ours, ours_extra = _encode(pack, encoder, "a fox in snow")
    theirs, their_pooled = _clip_encode(teacher_clip, "my_trigger_word")
    cond, extra = _encode(pack, encoder, "a fox in snow", clip=teacher_clip, clip_text="my_trigger_word")
    assert cond.shape == (1, 154, 2048) and cond.dtype == torch.float32
    assert torch.equal(cond[:, :77], ours) and torch.equal(cond[:, 77:], theirs)
    assert torch.equal(extra["pooled_output"], ours_extra["pooled_output"]), "blend 0 keeps our pooled"
    assert {k: v for k, v in extra.items() if k != "pooled_output"} == {
        k: v for k, v in ours_extra.items() if k != "pooled_output"
    }, "the size conditioning is ours"
    half, _ = _encode(
        pack, encoder, "a fox in snow", clip=teacher_clip, clip_text="my_trigger_word", clip_strength=0.5
    )
    assert torch.equal(half[:, :77], ours) and torch.equal(half[:, 77:], theirs * 0.5)
    _, blended = _encode(
        pack, encoder, "a fox in snow", clip=teacher_clip, clip_text="x", clip_pooled_blend=1.0
    )
    assert torch.equal(blended["pooled_output"], _clip_encode(teacher_clip, "x")[1])
    _, quarter = _encode(
        pack, encoder, "a fox in snow", clip=teacher_clip, clip_text="x", clip_pooled_blend=0.25
    )
    want = 0.75 * ours_extra["pooled_output"] + 0.25 * _clip_encode(teacher_clip, "x")[1]
    assert torch.allclose(quarter["pooled_output"], want, atol=1e-6)


def test_a_long_clip_text_adds_77_tokens_per_chunk_with_comfyuis_weighting(pack, encoder, teacher_clip):
    tags = ", ".join(f"tag{i}" for i in range(60))  # > 75 CLIP tokens: several chunks
    theirs, _ = _clip_encode(teacher_clip, tags)
    chunks = theirs.shape[1] // 77
    assert chunks >= 2 and theirs.shape[1] == 77 * chunks
    cond, _ = _encode(pack, encoder, "a fox", clip=teacher_clip, clip_text=tags)
    assert cond.shape == (1, 77 * (1 + chunks), 2048) and torch.equal(cond[:, 77:], theirs)
    # ComfyUI's own weighting works in the CLIP text (it is CLIPTextEncode's)
    weighted, _ = _encode(pack, encoder, "a fox", clip=teacher_clip, clip_text="(my_trigger_word:1.4)")
    assert torch.equal(weighted[:, 77:], _clip_encode(teacher_clip, "(my_trigger_word:1.4)")[0])
    assert not torch.equal(weighted[:, 77:], _clip_encode(teacher_clip, "my_trigger_word")[0])


def test_a_connected_clip_with_no_clip_text_changes_nothing(pack, encoder, teacher_clip):
    alone, extra = _encode(pack, encoder, "a fox")
    with_clip, with_extra = _encode(pack, encoder, "a fox", clip=teacher_clip, clip_text="  ")
    assert torch.equal(alone, with_clip) and torch.equal(extra["pooled_output"], with_extra["pooled_output"])


def test_clip_text_without_a_clip_is_a_warning_and_the_qwen_prompt_still_works(pack, encoder, caplog):
    """A warning rather than an error: the Qwen prompt is complete on its own, so the picture
    still renders (as ComfyUI itself ignores a missing embedding with a warning), and the
    warning says what to connect."""
    alone, _ = _encode(pack, encoder, "a fox")
    with caplog.at_level(logging.WARNING, logger="qwenclip"):
        cond, _ = _encode(pack, encoder, "a fox", clip_text="my_trigger_word")
    assert torch.equal(cond, alone)
    assert "clip_text was ignored: no CLIP is connected" in caplog.text


def test_a_clip_that_is_not_sdxls_is_a_clear_error(pack, encoder):
    class SD15Clip:  # CLIP-L only: 768-wide tokens
        def tokenize(self, text):
            return text

        def encode_from_tokens(self, tokens, return_pooled=False):
            return torch.zeros(1, 77, 768), torch.zeros(1, 768)

    with pytest.raises(ValueError, match="768-wide tokens; SDXL's makes 2048"):
        _encode(pack, encoder, "a fox", clip=SD15Clip(), clip_text="x")


# -- embedding: names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,qwen,refs",
    [
        ("embedding:EasyNegative, blurry", "blurry", ["embedding:EasyNegative"]),
        ("a cat, embedding:foo, blurry", "a cat, blurry", ["embedding:foo"]),
        ("blurry, embedding:foo,", "blurry", ["embedding:foo"]),
        ("a\nembedding:sub/n.pt\nb", "a\n\nb", ["embedding:sub/n.pt"]),
        ("(embedding:foo:1.2) a cat", "a cat", ["(embedding:foo:1.2)"]),
        ("a (embedding:foo) b", "a b", ["(embedding:foo)"]),
        ("a (embedding:x red:1.2)", "a (red:1.2)", ["embedding:x"]),
        (r"\(embedding:foo\) x", r"\(embedding:foo\) x", []),
        ("myembedding:foo", "myembedding:foo", []),
        ("(red:1.2) cube", "(red:1.2) cube", []),
    ],
)
def test_embedding_names_are_split_off_as_comfyui_finds_them(pack, text, qwen, refs):
    out, got, names = pack.nodes.split_embeddings(text)
    assert (out, got) == (qwen, refs)
    assert names == [r.strip("()").split(":")[1] for r in refs]


@pytest.fixture(scope="module")
def embedding_clip(pack, comfy_dirs):
    """A tiny SDXL textual inversion (2 vectors for CLIP-L and CLIP-G) in an embeddings folder,
    and a tiny CLIP made after that folder is registered (as Load Checkpoint makes one)."""
    import folder_paths
    from safetensors.torch import save_file

    d = comfy_dirs["input"].parent / "models" / "embeddings"
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    save_file(
        {"clip_l": torch.randn(2, 768, generator=g), "clip_g": torch.randn(2, 1280, generator=g)},
        str(d / "tiny_emb.safetensors"),
    )
    folder_paths.add_model_folder_path("embeddings", str(d), is_default=True)
    return pack.demo.tiny_clip()


def test_an_embedding_is_stripped_warned_and_routed_to_the_clip(pack, encoder, embedding_clip, caplog):
    with caplog.at_level(logging.WARNING):
        cond, extra = _encode(pack, encoder, "a fox, embedding:tiny_emb, snow", clip=embedding_clip)
    assert "embedding:tiny_emb: a CLIP textual inversion cannot feed the LLM" in caplog.text
    assert "it goes through the connected CLIP" in caplog.text
    assert "does not exist" not in caplog.text, "ComfyUI's CLIP found the embedding"
    qwen, qwen_extra = _encode(pack, encoder, "a fox, snow")
    assert cond.shape == (1, 154, 2048) and torch.equal(cond[:, :77], qwen)
    assert torch.equal(cond[:, 77:], _clip_encode(embedding_clip, "embedding:tiny_emb")[0])
    assert not torch.equal(cond[:, 77:], _clip_encode(embedding_clip, "tiny_emb")[0]), "a vector, not text"
    assert torch.equal(extra["pooled_output"], qwen_extra["pooled_output"])
    # with trigger words too: both reach the CLIP, the embedding after them
    both, _ = _encode(pack, encoder, "a fox, embedding:tiny_emb", clip=embedding_clip, clip_text="trigger")
    assert torch.equal(both[:, 77:], _clip_encode(embedding_clip, "trigger, embedding:tiny_emb")[0])


def test_an_embedding_without_a_clip_is_stripped_and_the_warning_says_what_to_connect(pack, encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="qwenclip"):
        cond, _ = _encode(pack, encoder, "(embedding:tiny_emb:1.2) a fox, snow")
    assert torch.equal(cond, _encode(pack, encoder, "a fox, snow")[0])
    assert "embedding:tiny_emb" in caplog.text and "connect the checkpoint's CLIP" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qwenclip"):
        _encode(pack, encoder, "a fox, embedding:tiny_emb", clip_text="my_trigger_word")
    assert "embedding:tiny_emb" in caplog.text and "clip_text was ignored" in caplog.text, "both are said"
