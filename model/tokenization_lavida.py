"""Text tokenizer: a word-level `tokenizers` model wrapped as a `PreTrainedTokenizerFast`.

ShapesWorld has a closed vocabulary, so a word-level model is exact and tiny: every word of
the grammar, every template word and punctuation mark gets one id; anything else is
`[UNK]`. Special tokens (fixed ids, in this order):

    [PAD] [UNK] [EOS] [MASK] [BOS] <img_gen> <img_src> <img_enc> <user> <assistant>
    <box_p> </box_p> <LOC_BEGIN> <LOC_END>  then <LOC_0> .. <LOC_64>  then words

`<LOC_i>` is quantised coordinate i of a 64 px canvas (65 bins, `tools.boxes.quantize`).
Decoding joins words with spaces and re-attaches punctuation (`"no : missing"` ->
`"no: missing"`), the inverse of the pre-tokenizer's split.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "SPECIAL_TOKENS",
    "build_tokenizer",
    "clean_decoded",
    "loc_token",
]

SPECIAL_TOKENS: list[str] = [
    "[PAD]", "[UNK]", "[EOS]", "[MASK]", "[BOS]",
    "<img_gen>", "<img_src>", "<img_enc>", "<user>", "<assistant>",
    "<box_p>", "</box_p>", "<LOC_BEGIN>", "<LOC_END>",
]  # fmt: skip
NUM_LOC_TOKENS = 65

# The closed vocabulary of SHAPES_WORLD.md's grammars plus task-template words. Words
# found in the corpus given to `build_tokenizer` are added too, so a new template word
# only needs to appear in a template.
BASE_WORDS = """
a an the and of on at to in is are there what how many which color colour shape object
objects image background left right above below top bottom center centre middle of
circle circles square squares triangle triangles diamond diamonds
red green blue yellow purple orange white black gray grey
small large larger smaller size
zero one two three four five six seven eight nine ten
make change turn into remove add move resize replace it them
yes no nothing missing extra expected should be wrong not removed
describe generate plan layout locate edit does match find image
, . : ; ? ! ' -
""".split()


def loc_token(i: int) -> str:
    """The location token for quantised coordinate `i`."""
    return f"<LOC_{int(i)}>"


_WORD_RE = re.compile(r"<[^<>\s]+>|\[[A-Z]+\]|[a-z0-9]+|[^\sa-z0-9]")


def _words(texts: Iterable[str]) -> set[str]:
    found: set[str] = set()
    for text in texts:
        for tok in _WORD_RE.findall(text.lower()):
            if not (tok.startswith("<") and tok.endswith(">")) and not tok.startswith("["):
                found.add(tok)
    return found


def build_tokenizer(corpus: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Build the word-level tokenizer from the base vocabulary plus the words of `corpus`."""
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + [loc_token(i) for i in range(NUM_LOC_TOKENS)]:
        vocab[tok] = len(vocab)
    for word in sorted(set(BASE_WORDS) | _words(corpus)):
        vocab.setdefault(word, len(vocab))
    model = models.WordLevel(vocab=vocab, unk_token="[UNK]")
    tok = Tokenizer(model)
    tok.normalizer = None
    # Special tokens are matched before pre-tokenization; words are split on whitespace
    # and punctuation, lower-cased by `encode_text` before they get here.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.add_special_tokens(SPECIAL_TOKENS + [loc_token(i) for i in range(NUM_LOC_TOKENS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="[EOS]",
        mask_token="[MASK]",
        bos_token="[BOS]",
    )


_PUNCT_BEFORE = re.compile(r"\s+([,.:;?!])")


def clean_decoded(text: str) -> str:
    """Undo the word split: `"no : missing blue square ."` -> `"no: missing blue square."`."""
    return _PUNCT_BEFORE.sub(r"\1", " ".join(text.split())).strip()
