"""`LavidaConfig`: hyperparameters of the Elastic-MoT masked-diffusion model.

One config describes every scale, from the test-sized model to the Lavida-O shapes
(8B understanding + 2.4B generation branch, `LAVIDA_O_FACTS.md` §1.1, §2). Token ids of
the special tokens come from the text tokenizer and are stored here so a checkpoint
folder is self-describing.

Example:
    >>> from lavida_agent.model.configuration_lavida import LavidaConfig
    >>> config = LavidaConfig(hidden_size=64, num_layers=2, joint_layers=1, num_heads=4,
    ...                       gen_hidden_size=32, intermediate_size=128, gen_intermediate_size=64)
    >>> config.head_dim
    16
"""

from __future__ import annotations

from transformers import PretrainedConfig

__all__ = ["LavidaConfig", "PRESETS"]


class LavidaConfig(PretrainedConfig):
    """Configuration of `LavidaForMaskedDiffusion`.

    Args:
        vocab_size: Text vocabulary size, including special and location tokens.
        hidden_size: Width of the understanding (und) branch; also the attention width.
        num_layers: Number of Elastic-MoT layers.
        joint_layers: Layers `< joint_layers` attend over the whole sequence; later
            layers attend within each modality only (Lavida-O `dual_tower_layers`).
        num_heads: Attention heads (head_dim = hidden_size / num_heads) for both branches.
        intermediate_size: Hidden size of the und gated MLP.
        gen_hidden_size: Width of the generation (gen) branch; its Q/K/V project up to
            `hidden_size` so both branches share heads (FACTS §2.2).
        gen_intermediate_size: Hidden size of the gen gated MLP.
        rope_theta: RoPE base; positions are plain 1-D sequence indices (FACTS §11.1).
        rms_norm_eps: Epsilon of every RMSNorm.
        codebook_size: VQ codebook size K; code id K is the image mask code.
        image_grid: VQ grid side (16 for 64 px images with a 4x tokenizer).
        compression: Token compression factor per side (2: 2x2 codes -> one position).
        vision_patch_size: Patch size of the understanding-side vision encoder.
        vision_hidden_size: Width of the vision encoder.
        vision_layers: Depth of the vision encoder.
        vision_heads: Heads of the vision encoder.
        vision_stem: How a patch becomes a token: `"linear"` (ViT patch embedding + learned
            position) or `"modulated"` (MLP content code next to the code modulated by a
            fixed 2-D sin/cos position code; learns where things are much sooner, see
            `LavidaVisionEncoder`) or `"conv"` (the same, with the content code from a small
            CNN whose cells see a whole object, so shape is readable; `conv_stem`). Configs
            written before it existed mean `"linear"`.
        loc_code_dim: Width of a fixed 1-D sin/cos code of the coordinate each `<LOC_i>`
            stands for, projected (learned, from zero) into the token's input embedding and
            into its output row of the LM head, so neighbouring coordinates share structure
            instead of being 65 unrelated classes; the same code of each gen image
            position's centre (x, y) is projected into its input, so a plan's boxes and the
            positions to draw share one geometry. 0 (configs written before it): off.
        plan_layout: Let the gen branch read the plan's boxes directly (a small-scale
            addition, off in configs written before it): every fully visible plan item
            (`<box_p> label </box_p> <LOC_BEGIN> x0 y0 x1 y1 <LOC_END>`) before a target image
            adds, at each VQ cell its box covers, a projection (from zero) of its label's word
            embeddings and of the cell's offsets to the box edges. At 2.4B parameters Lavida-O
            learns plan-following through attention; a 6M model given only attention drew
            blobs even from the true layout (2% correct), see `LavidaImageEmbedding`.
        copy_dim: Width of the copy head's query/key (0, configs written before it: off).
            A small-scale addition: a text position may also copy a token of its
            conditions (earlier segments: the prompt, the question, the instruction), by one
            attention over their final hidden states whose distribution, scaled by a learned
            gate (zero at start, so weights trained without it load unchanged), is added to
            the LM head's logits. A 7.8M model trained on two CPU cores never learned to
            route the prompt's colour into its plan through attention (P(colour) stayed 1/6
            through 1000 plan-only steps while shape copied at 0.99), see
            `LavidaForMaskedDiffusion._copy_logits`.
        condition_pool: Add to every position's input a projection (learned, from zero, so
            weights trained without it load unchanged) of the mean input embedding of the
            text tokens of its conditions (earlier segments), one projection for the und
            branch and one for the gen branch. A small-scale addition: the 7.8M model never
            learned to route a word that changes a *number* (the relation in `a red circle
            left of a blue square`: the planner put the first object right of the second
            whatever the relation said, through 300 plan-only steps) or the prompt's colour
            into single-shot drawing (colour at chance); a bag of the condition's words puts
            them one linear map away from every slot. See `LavidaForMaskedDiffusion._condition_pool`.
        image_copy: A copy path for image codes (off in configs written before it). An
            edit's target cell may copy its source's code at the same cell: the image head
            adds, to the logit of that code, a gate read from the cell's own final features
            (a linear map, zero at start, so weights trained without it load unchanged). A
            small-scale addition for the single-shot edit, whose target keeps most of its
            source: the 2x2-compressed generation branch learnt that copy slowly through
            attention (0.58 -> 0.73 of the untouched cells after 1500 steps; weights README,
            stop 33). With it a drawer copies 0.98 of them within 250 steps but still does
            not learn where to edit, so no shipped weights use it (stop 34). See
            `LavidaImageHead`.
        image_size: Input image side for the vision encoder and the VQ tokenizer.
        attention_mode: `"one_way"`: a position attends only to positions of its own or
            an earlier segment, so conditions never see what is being generated and
            their keys/values can be cached; `"full"`: every position attends to all.
        mask_token_id, pad_token_id, eos_token_id, img_gen_token_id, img_src_token_id,
        img_enc_token_id, loc_token_offset, num_loc_tokens, box_start_token_id,
        box_end_token_id, loc_begin_token_id, loc_end_token_id: ids from the tokenizer
        (the last four are read only with `plan_layout`).
            `img_gen` marks a position of an image to generate, `img_src` a position of an
            edit source's VQ codes (both routed to the gen branch), `img_enc` a position
            holding a vision-encoder feature (und branch). `<LOC_i>` has id
            `loc_token_offset + i`.
    """

    model_type = "lavida_mdm"

    def __init__(
        self,
        vocab_size: int = 512,
        hidden_size: int = 256,
        num_layers: int = 6,
        joint_layers: int = 3,
        num_heads: int = 8,
        intermediate_size: int = 704,
        gen_hidden_size: int = 128,
        gen_intermediate_size: int = 384,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        codebook_size: int = 512,
        image_grid: int = 16,
        compression: int = 2,
        vision_patch_size: int = 8,
        vision_hidden_size: int = 128,
        vision_layers: int = 2,
        vision_heads: int = 4,
        vision_stem: str = "linear",
        loc_code_dim: int = 0,
        plan_layout: bool = False,
        copy_dim: int = 0,
        condition_pool: bool = False,
        image_copy: bool = False,
        image_size: int = 64,
        attention_mode: str = "one_way",
        mask_token_id: int = 3,
        pad_token_id: int = 0,
        eos_token_id: int = 2,
        img_gen_token_id: int = 5,
        img_src_token_id: int = 6,
        img_enc_token_id: int = 7,
        loc_token_offset: int = 16,
        num_loc_tokens: int = 65,
        box_start_token_id: int = 10,
        box_end_token_id: int = 11,
        loc_begin_token_id: int = 12,
        loc_end_token_id: int = 13,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.joint_layers = joint_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.gen_hidden_size = gen_hidden_size
        self.gen_intermediate_size = gen_intermediate_size
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.codebook_size = codebook_size
        self.image_grid = image_grid
        self.compression = compression
        self.vision_patch_size = vision_patch_size
        self.vision_hidden_size = vision_hidden_size
        self.vision_layers = vision_layers
        self.vision_heads = vision_heads
        self.vision_stem = vision_stem
        self.loc_code_dim = loc_code_dim
        self.plan_layout = plan_layout
        self.copy_dim = copy_dim
        self.condition_pool = condition_pool
        self.image_copy = image_copy
        self.image_size = image_size
        self.attention_mode = attention_mode
        self.mask_token_id = mask_token_id
        self.img_gen_token_id = img_gen_token_id
        self.img_src_token_id = img_src_token_id
        self.img_enc_token_id = img_enc_token_id
        self.loc_token_offset = loc_token_offset
        self.num_loc_tokens = num_loc_tokens
        self.box_start_token_id = box_start_token_id
        self.box_end_token_id = box_end_token_id
        self.loc_begin_token_id = loc_begin_token_id
        self.loc_end_token_id = loc_end_token_id
        self.initializer_range = initializer_range
        self._check_sizes()  # before transformers reads the derived sizes
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)
        self.validate_architecture()

    # ------------------------------------------------------------------ derived sizes

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def image_mask_code(self) -> int:
        """Code id of a masked image token (one past the codebook)."""
        return self.codebook_size

    @property
    def positions_per_image(self) -> int:
        """Sequence positions one image occupies after token compression (64 by default)."""
        return (self.image_grid // self.compression) ** 2

    @property
    def vision_tokens_per_image(self) -> int:
        return (self.image_size // self.vision_patch_size) ** 2

    def _check_sizes(self) -> None:
        for name in ("hidden_size", "num_heads", "num_layers", "intermediate_size", "image_size", "image_grid",
                     "compression", "vision_patch_size", "vision_hidden_size", "vision_heads", "gen_hidden_size",
                     "codebook_size"):  # fmt: skip
            value = getattr(self, name, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def validate_architecture(self) -> None:
        """Raise `ValueError` naming the offending values when the shapes do not fit."""
        self._check_sizes()
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if not 0 <= self.joint_layers <= self.num_layers:
            raise ValueError(
                f"joint_layers ({self.joint_layers}) must be in [0, num_layers={self.num_layers}]"
            )
        if self.gen_hidden_size > self.hidden_size:
            raise ValueError(
                f"gen_hidden_size ({self.gen_hidden_size}) must not exceed hidden_size "
                f"({self.hidden_size}): gen states live in the first channels of the und width"
            )
        if self.image_grid % self.compression:
            raise ValueError(
                f"image_grid ({self.image_grid}) must be divisible by compression "
                f"({self.compression})"
            )
        if self.image_size % self.vision_patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by vision_patch_size "
                f"({self.vision_patch_size})"
            )
        if self.vision_stem not in ("linear", "modulated", "conv"):
            raise ValueError(f"vision_stem must be 'linear', 'modulated' or 'conv', got {self.vision_stem!r}")
        if self.vision_stem in ("modulated", "conv") and self.vision_hidden_size % 8:
            raise ValueError(
                f"vision_stem={self.vision_stem!r} needs vision_hidden_size divisible by 8, got {self.vision_hidden_size}"
            )
        if self.vision_stem == "conv" and self.vision_patch_size & (self.vision_patch_size - 1):
            raise ValueError(f"vision_stem='conv' needs a power-of-two vision_patch_size, got {self.vision_patch_size}")
        if self.loc_code_dim and (self.loc_code_dim < 4 or self.loc_code_dim % 2):
            raise ValueError(f"loc_code_dim must be 0 (off) or an even number >= 4, got {self.loc_code_dim}")
        if self.copy_dim < 0:
            raise ValueError(f"copy_dim must be 0 (off) or positive, got {self.copy_dim}")
        if self.plan_layout:
            markers = ("box_start_token_id", "box_end_token_id", "loc_begin_token_id", "loc_end_token_id")
            bad = [name for name in markers if not 0 <= getattr(self, name) < self.vocab_size]
            if bad:
                raise ValueError(f"plan_layout reads the plan markers, but {', '.join(bad)} "
                                 f"lie outside [0, vocab_size={self.vocab_size})")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(
                f"vision_hidden_size ({self.vision_hidden_size}) must be divisible by "
                f"vision_heads ({self.vision_heads})"
            )
        if self.attention_mode not in ("one_way", "full"):
            raise ValueError(
                f"attention_mode must be 'one_way' or 'full', got {self.attention_mode!r}"
            )
        for name in ("mask_token_id", "img_gen_token_id", "img_src_token_id", "img_enc_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} ({value}) must be in [0, vocab_size={self.vocab_size})")
        if self.loc_token_offset + self.num_loc_tokens > self.vocab_size:
            raise ValueError(
                f"location tokens [{self.loc_token_offset}, "
                f"{self.loc_token_offset + self.num_loc_tokens}) exceed vocab_size "
                f"({self.vocab_size})"
            )


# Named configurations. `tiny` is for tests, `shapes` is the embedded model, `lavida-o`
# reproduces the parameter shapes of the released checkpoint (FACTS §1.1, §2.1-2.2):
# und 4096 x 32 layers (LLaDA-8B), gen 2048 wide, 17 joint layers, 8192 codes.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=128, hidden_size=64, num_layers=2, joint_layers=1, num_heads=4,
        intermediate_size=128, gen_hidden_size=32, gen_intermediate_size=64,
        codebook_size=32, vision_hidden_size=32, vision_layers=1, vision_heads=2,
        loc_token_offset=40, num_loc_tokens=65, vision_stem="modulated", loc_code_dim=8, plan_layout=True,
        copy_dim=16, condition_pool=True,
    ),
    "shapes": dict(vision_stem="conv", loc_code_dim=32, plan_layout=True, copy_dim=64, condition_pool=True),
    "lavida-o": dict(
        vocab_size=127378, hidden_size=4096, num_layers=32, joint_layers=17, num_heads=32,
        intermediate_size=12288, gen_hidden_size=2048, gen_intermediate_size=8192,
        rope_theta=500000.0, codebook_size=8192, image_grid=64, compression=2,
        image_size=1024, vision_patch_size=64, vision_hidden_size=1152, vision_layers=26,
        vision_heads=16, mask_token_id=126336, pad_token_id=126081, eos_token_id=126081,
        img_gen_token_id=126089, img_src_token_id=126090, img_enc_token_id=126091,
        loc_token_offset=126349, num_loc_tokens=1025,
    ),
}  # fmt: skip
