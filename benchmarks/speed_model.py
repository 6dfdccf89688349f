"""Speed of the Elastic-MoT model on this machine, every variant measured side by side.

    python -m lavida_agent.benchmarks.speed_model --out bench_out/speed [--quick]
        [--preset shapes] [--model-path FOLDER] [--repeats N]

What is measured (fp32, `torch.inference_mode()`, medians over repeats after warm-up; the
variants of one table are run round-robin, one call of each per repeat, so that load from
other processes hits all of them alike and the *ratios* stay meaningful):

- **Denoising step** of text-to-image for one prompt with classifier-free guidance (2 rows):
  uncached (the full sequence every step) with all layers vs with elastic activation
  (und rows skip the split layers) -> `elastic_speedup`; uncached vs cached condition (only
  the 64 target positions are run, against the cached prompt keys/values; the pipeline's
  path) -> `cache_speedup`; the same cached step in a *symmetric* MoT of equal depth
  (gen width = und width) -> `symmetric_mot_ratio` (symmetric time / elastic-MoT time).
- **Grounding**: `LavidaPipeline.ground(num_steps=1)` (the grand mode) for 2 images x 3
  expressions, counted with `forward_count` (`grounding_forwards`, 1 by design), against
  decoding the same 12 location tokens per row one forward per token (each reveals one,
  left to right) -> `grounding_speedup`. A stronger sequential baseline that caches the
  image + prompt prefix, the stepwise read (4 forwards: one coordinate of every box each),
  four branches kept by the noun's fit (`reranked`) and the pipeline's default, twelve
  views kept by the noun's fit (`views`), are reported in `details` too.
- **Achieved GFLOP/s** of the cached generation step, FLOPs counted analytically from the
  config (2 x parameters touched x tokens for every matmul, 4 x Lq x Lk x d per row and layer
  for attention), against a 1024 x 1024 fp32 matmul timed in the same run -> `gflops_ratio`.
- **End to end** `LavidaPipeline.generate` with 16 steps for batch 1 and batch 8 (per image),
  including the condition prefill, sampling and VQ decoding.

With `model_path=None` the preset's model is randomly initialised (speed does not depend on
the weights), with the default `VQConfig` tokenizer, also random. Writes `speed.json` and
`speed.md` into `out_dir`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["generation_step_flops", "machine_info", "main", "run"]

DEFAULT_REPEATS = 9
QUICK_REPEATS = 2
PROMPT = "a small red circle left of a large blue square"
EXPRESSIONS = ("the red circle", "the large blue square", "the green triangle on the right")
MATMUL_N = 1024
NUM_STEPS = 16
MAX_PARAMS = 1_000_000_000  # random-init presets above this do not fit this machine's RAM


# ----------------------------------------------------------------------------- helpers


def machine_info() -> dict[str, Any]:
    """torch version, threads, CPU model (from /proc/cpuinfo where readable), load."""
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "mkl": torch.backends.mkl.is_available(),
        "load_average_1_5_15min": load,
    }


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Time every function `repeats` times, round-robin, after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def _sampler_fn(config, batch: int) -> Callable[[], Any]:
    """One `ImageMaskSampler.step` (the pipeline's default settings) on random logits."""
    from lavida_agent.model.pipeline_lavida import DEFAULTS
    from lavida_agent.model.sampling_image import ImageMaskSampler

    G, K = config.image_grid, config.codebook_size
    sampler = ImageMaskSampler(config.image_mask_code, shift=DEFAULTS["shift"], order=DEFAULTS["order"],
                               temperature=DEFAULTS["temperature"])  # fmt: skip
    sampler.set_timesteps(NUM_STEPS, G * G, G)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, G * G, K, generator=g)
    sample = torch.full((batch, G * G), config.image_mask_code, dtype=torch.long)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    return lambda: sampler.step(logits, 0, sample, generator=gens)


def _med(ts: list[float]) -> float:
    return float(statistics.median(ts))


def _timing(ts: list[float]) -> dict[str, Any]:
    return {"median_ms": _med(ts) * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3, "n": len(ts)}


def _matmul_fn(n: int) -> Callable[[], Any]:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    return lambda: torch.matmul(a, b, out=out)


# ----------------------------------------------------------------------------- FLOPs


def generation_step_flops(
    config,
    *,
    rows: int,
    seq_len: int,
    key_len: int,
    gen_per_row: int,
    elastic: bool,
    text_head: bool,
    cached: bool,
) -> dict[str, float]:
    """Analytic FLOPs of one text-to-image forward (no vision encoder: t2i has no image input).

    Args:
        rows: batch rows (2 per prompt with CFG).
        seq_len: positions run in this pass per row (the target only when `cached`).
        key_len: keys each query attends over (cache + this pass).
        gen_per_row: gen-branch positions per row (one target image: P).
        elastic: und rows run only the joint layers.
        text_head: the LM head runs over the und rows.
        cached: the pass holds only gen positions (und rows: none).

    Returns FLOPs per component and `total` (2 per multiply-add; attention over the dense
    (Lq, Lk) score matrix, as SDPA computes it with a boolean mask).
    """
    c = config
    d, dg, i_u, i_g = c.hidden_size, c.gen_hidden_size, c.intermediate_size, c.gen_intermediate_size
    L, Lj = c.num_layers, c.joint_layers
    G, P, K, cmp = c.image_grid, c.positions_per_image, c.codebook_size, c.compression
    n_gen = rows * gen_per_row
    n_und = 0 if cached else rows * seq_len - n_gen
    und_layers = Lj if elastic else L
    images = n_gen // P
    f = {
        # q/k/v (dg -> d), shared o_proj rows (d -> dg), gated MLP (3 matrices)
        "gen_layers": 2.0 * n_gen * L * (4 * dg * d + 3 * dg * i_g),
        "und_layers": 2.0 * n_und * und_layers * (4 * d * d + 3 * d * i_u),
        # QK^T and AV: 2 * 2 * Lq * Lk * d per row and layer
        "attention": 4.0 * rows * seq_len * key_len * d * L,
        # compression conv (c x c, stride c) + out_proj per position
        "image_embed": 2.0 * images * P * (dg * dg * cmp * cmp + dg * dg),
        # transposed conv to G x G, proj + classifier per code
        "image_head": 2.0 * images * (P * dg * dg * cmp * cmp + G * G * (dg * dg + dg * K)),
        "text_head": 2.0 * n_und * d * c.vocab_size if text_head else 0.0,
    }
    f["total"] = sum(f.values())
    return f


# ----------------------------------------------------------------------------- setup


def _build_pipeline(preset: str, model_path: str | Path | None):
    from lavida_agent.model.configuration_lavida import PRESETS, LavidaConfig
    from lavida_agent.model.configuration_vq import VQConfig
    from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion, count_parameters
    from lavida_agent.model.modeling_vq import VQImageTokenizer
    from lavida_agent.model.pipeline_lavida import LavidaPipeline
    from lavida_agent.model.tokenization_lavida import build_tokenizer
    from lavida_agent.model.training import corpus_for_tokenizer, token_ids

    if model_path is not None:
        return LavidaPipeline.from_pretrained(model_path), f"weights from {model_path}"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base, vq_config = LavidaConfig(**PRESETS[preset]), VQConfig()
    if base.image_grid != vq_config.latent_size or base.image_size != vq_config.image_size:
        raise ValueError(
            f"preset {preset!r} (grid {base.image_grid}, {base.image_size} px) does not fit the "
            f"default VQ tokenizer (grid {vq_config.latent_size}, {vq_config.image_size} px)"
        )
    with torch.device("meta"):
        n = count_parameters(LavidaForMaskedDiffusion(base))["total"]
    if n > MAX_PARAMS:
        raise ValueError(f"preset {preset!r} has {n / 1e9:.1f}B parameters: too large to benchmark on CPU")
    vq = VQImageTokenizer(vq_config).eval()
    # 200 sampled scenes cover the grammar's words (the full corpus adds ~1 word, 15 s)
    tokenizer = build_tokenizer(corpus_for_tokenizer(n=200))
    try:
        cfg = LavidaConfig(**{**PRESETS[preset], **token_ids(tokenizer), "codebook_size": vq.num_vq_embeddings})
    except ValueError as e:
        raise ValueError(f"preset {preset!r} does not fit the ShapesWorld tokenizer: {e}") from None
    torch.manual_seed(0)
    model = LavidaForMaskedDiffusion(cfg).eval()
    return LavidaPipeline(model, vq, tokenizer), f"random init of preset {preset!r}"


def _symmetric(model):
    """A randomly initialised MoT of equal depth whose gen branch is as wide as und."""
    from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion

    cfg = copy.deepcopy(model.config)
    cfg.gen_hidden_size = cfg.hidden_size
    cfg.gen_intermediate_size = cfg.intermediate_size
    torch.manual_seed(1)
    return LavidaForMaskedDiffusion(cfg).eval()


def _t2i_inputs(pipe, batch: int) -> dict[str, Any]:
    """Packed CFG rows of `batch` prompts: full sequence, condition prefix and target."""
    from lavida_agent.model.tasks import build_t2i, drop_conditions, pack

    cfg = pipe.config
    cond = [build_t2i(pipe.tokenizer, cfg, PROMPT) for _ in range(batch)]
    exs = cond + [drop_conditions(e, cfg, prompt=True, source=False) for e in cond]
    b = pack(exs, cfg, pad_left=True)
    P, G = cfg.positions_per_image, cfg.image_grid
    L = b.input_ids.shape[1]
    c = L - P
    # half-revealed codes: content does not change the cost
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.codebook_size, (len(exs), G, G), generator=g)
    codes[torch.rand(codes.shape, generator=g) < 0.5] = cfg.image_mask_code
    full = dict(input_ids=b.input_ids, segment_ids=b.segment_ids, attention_mask=b.attention_mask, gen_codes=codes)
    prefix = dict(input_ids=b.input_ids[:, :c], segment_ids=b.segment_ids[:, :c],
                  attention_mask=b.attention_mask[:, :c])  # fmt: skip
    target = dict(input_ids=b.input_ids[:, c:], segment_ids=b.segment_ids[:, c:],
                  attention_mask=b.attention_mask[:, c:], gen_codes=codes)  # fmt: skip
    return dict(full=full, prefix=prefix, target=target, rows=len(exs), seq_len=L, prefix_len=c)


def _step_fns(model, inp: dict, tag: str = "") -> dict[str, Callable[[], Any]]:
    """Forwards of one denoising step: uncached (all layers / elastic), cached (both), prefill."""
    cache_e = model(**inp["prefix"], use_cache=True, elastic=True).cache
    cache_a = model(**inp["prefix"], use_cache=True, elastic=False).cache
    full, prefix, target = inp["full"], inp["prefix"], inp["target"]
    return {
        f"{tag}uncached_all_layers": lambda: model(**full, elastic=False),
        f"{tag}uncached_elastic": lambda: model(**full, elastic=True),
        f"{tag}cached_all_layers": lambda: model(**target, condition_cache=cache_a, elastic=False),
        f"{tag}cached_elastic": lambda: model(**target, condition_cache=cache_e, elastic=True),
        f"{tag}prefill_all_layers": lambda: model(**prefix, use_cache=True, elastic=False),
        f"{tag}prefill_elastic": lambda: model(**prefix, use_cache=True, elastic=True),
    }


def _step_flops(config, inp: dict) -> dict[str, float]:
    P, rows, L = config.positions_per_image, inp["rows"], inp["seq_len"]
    common = dict(rows=rows, gen_per_row=P)
    return {
        "uncached_all_layers": generation_step_flops(
            config, seq_len=L, key_len=L, elastic=False, text_head=True, cached=False, **common
        )["total"],
        "uncached_elastic": generation_step_flops(
            config, seq_len=L, key_len=L, elastic=True, text_head=False, cached=False, **common
        )["total"],
        "cached_elastic": generation_step_flops(
            config, seq_len=P, key_len=L, elastic=True, text_head=False, cached=True, **common
        )["total"],
    }


# ----------------------------------------------------------------------------- grounding


def _ground_sequential(pipe, images, expressions, *, cache_prefix: bool) -> tuple[list, int]:
    """Decode the boxes one location token per forward (each forward reveals one per row).

    Returns the location ids per row and the number of forwards used.
    """
    from lavida_agent.model.tasks import build_ground, pack

    cfg, model = pipe.config, pipe.model
    exs = [build_ground(pipe.tokenizer, cfg, im, ex) for im, ex in zip(images, expressions)]
    b = pack(exs, cfg, pad_left=True)
    ids = b.input_ids.clone()
    loc = torch.arange(cfg.loc_token_offset, cfg.loc_token_offset + cfg.num_loc_tokens)
    masked = [(ids[r] == cfg.mask_token_id).nonzero().squeeze(1) for r in range(len(exs))]
    forwards = 0
    c = 0
    cache = None
    if cache_prefix:
        # the image + prompt segment (0) is cached once; the answer segment (1) is re-run
        starts = [int(((b.segment_ids[r] == 1) & b.attention_mask[r]).nonzero()[0]) for r in range(len(exs))]
        c = min(starts)
        cache = model(input_ids=ids[:, :c], pixel_values=b.pixel_values, segment_ids=b.segment_ids[:, :c],
                      attention_mask=b.attention_mask[:, :c], use_cache=True).cache  # fmt: skip
        forwards += 1
    for step in range(max(len(m) for m in masked)):
        if cache is None:
            logits = model(input_ids=ids, pixel_values=b.pixel_values, segment_ids=b.segment_ids,
                           attention_mask=b.attention_mask).text_logits  # fmt: skip
        else:
            logits = model(input_ids=ids[:, c:], segment_ids=b.segment_ids[:, c:],
                           attention_mask=b.attention_mask[:, c:], condition_cache=cache).text_logits  # fmt: skip
        forwards += 1
        for r, m in enumerate(masked):
            if step < len(m):
                pos = int(m[step])
                ids[r, pos] = loc[logits[r, pos - c, loc].argmax()]
    return [ids[r, m].tolist() for r, m in enumerate(masked)], forwards


def _grounding_case():
    from lavida_agent.tools.shapes_world.render import render
    from lavida_agent.tools.shapes_world.sampler import sample_scene

    images = [render(sample_scene(np.random.default_rng(s), n_objects=3)) for s in (1, 2)]
    return images, [list(EXPRESSIONS) for _ in images]


# ----------------------------------------------------------------------------- run


def run(
    *,
    out_dir: str | Path = "bench_out",
    quick: bool = False,
    preset: str = "shapes",
    model_path: str | Path | None = None,
    repeats: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run every speed measurement once, side by side, and write `speed.json` + `speed.md`.

    Args:
        out_dir: where the two files go (created).
        quick: few repeats and one warm-up round (for tests; well under a minute).
        preset: `LavidaConfig` preset used when `model_path` is None (random weights).
        model_path: a `LavidaPipeline` folder to time instead of a random preset.
        repeats: timed repeats per measurement (default 9, quick 2); end-to-end runs use
            about half as many.
        threads: torch intra-op threads for the run (default: leave torch's setting);
            restored afterwards.

    Returns the JSON document (see the module docstring for the headline keys).
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(out_dir, quick, preset, model_path, repeats)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out_dir, quick, preset, model_path, repeats) -> dict[str, Any]:
    from lavida_agent.model.modeling_lavida import count_parameters

    t_start = time.perf_counter()
    repeats = repeats or (QUICK_REPEATS if quick else DEFAULT_REPEATS)
    warmup = 1 if quick else 2
    e2e_repeats = 1 if quick else max(1, (repeats + 1) // 2)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    with torch.inference_mode():
        pipe, source = _build_pipeline(preset, model_path)
        model, cfg = pipe.model, pipe.config
        sym = _symmetric(model)

        # -- denoising step, batch 1 (2 CFG rows): every variant round-robin
        inp1 = _t2i_inputs(pipe, 1)
        inp8 = _t2i_inputs(pipe, 8)
        sym_fns = _step_fns(sym, inp1, "symmetric_")
        fns = {
            **_step_fns(model, inp1),
            **{k: sym_fns[k] for k in ("symmetric_uncached_all_layers", "symmetric_uncached_elastic",
                                        "symmetric_cached_elastic")},
            "batch8_cached_elastic": _step_fns(model, inp8)["cached_elastic"],
            "sampler_step_batch1": _sampler_fn(cfg, 1),
            "sampler_step_batch8": _sampler_fn(cfg, 8),
            "matmul": _matmul_fn(MATMUL_N),
        }  # fmt: skip
        step_times = _interleaved(fns, repeats, warmup)
        med = {k: _med(v) for k, v in step_times.items()}

        # -- grounding: one forward vs one forward per location token
        images, exprs = _grounding_case()
        before = pipe.forward_count
        pipe.ground(images, exprs, num_steps=1)
        grounding_forwards = pipe.forward_count - before
        before = pipe.forward_count
        pipe.ground(images, exprs, candidates=1)  # one coordinate per box per forward
        stepwise_forwards = pipe.forward_count - before
        before = pipe.forward_count
        pipe.ground(images, exprs, candidates=4)  # 4 branches a box, kept by the noun's fit
        reranked_forwards = pipe.forward_count - before
        before = pipe.forward_count
        pipe.ground(images, exprs, views=12)  # the default: 12 views, kept by the noun's fit
        views_forwards = pipe.forward_count - before
        _, seq_forwards = _ground_sequential(pipe, images, exprs, cache_prefix=False)
        _, seq_cached_forwards = _ground_sequential(pipe, images, exprs, cache_prefix=True)
        g_times = _interleaved(
            {
                "one_forward": lambda: pipe.ground(images, exprs, num_steps=1),
                "stepwise": lambda: pipe.ground(images, exprs, candidates=1),
                "reranked": lambda: pipe.ground(images, exprs, candidates=4),
                "views": lambda: pipe.ground(images, exprs, views=12),
                "sequential": lambda: _ground_sequential(pipe, images, exprs, cache_prefix=False),
                "sequential_cached_prefix": lambda: _ground_sequential(pipe, images, exprs, cache_prefix=True),
            },
            repeats, warmup,
        )  # fmt: skip
        g_med = {k: _med(v) for k, v in g_times.items()}

        # -- end to end generate, 16 steps
        e2e: dict[str, Any] = {}
        for bsz in (1, 8):
            prompts = [PROMPT] * bsz
            before = pipe.forward_count
            t0 = time.perf_counter()
            pipe.generate(prompts, num_steps=NUM_STEPS, seed=0)  # warm-up, counts forwards
            ts = [time.perf_counter() - t0]
            forwards = pipe.forward_count - before
            if not quick:  # quick: the warm-up call is the measurement (already warm from steps)
                ts = _interleaved({"g": lambda p=prompts: pipe.generate(p, num_steps=NUM_STEPS, seed=0)},
                                  e2e_repeats, 0)["g"]  # fmt: skip
            e2e[f"batch{bsz}"] = {**_timing(ts), "per_image_ms": _med(ts) * 1e3 / bsz, "forwards": forwards}

    # -- FLOPs and throughput
    flops1 = _step_flops(cfg, inp1)
    flops8 = _step_flops(cfg, inp8)
    flops_sym = _step_flops(sym.config, inp1)
    matmul_gflops = 2 * MATMUL_N**3 / med["matmul"] / 1e9
    step_gflops = {
        "cached_elastic": flops1["cached_elastic"] / med["cached_elastic"] / 1e9,
        "uncached_elastic": flops1["uncached_elastic"] / med["uncached_elastic"] / 1e9,
        "uncached_all_layers": flops1["uncached_all_layers"] / med["uncached_all_layers"] / 1e9,
        "symmetric_cached_elastic": flops_sym["cached_elastic"] / med["symmetric_cached_elastic"] / 1e9,
        "batch8_cached_elastic": flops8["cached_elastic"] / med["batch8_cached_elastic"] / 1e9,
    }

    result: dict[str, Any] = {
        "elastic_speedup": med["uncached_all_layers"] / med["uncached_elastic"],
        "cache_speedup": med["uncached_elastic"] / med["cached_elastic"],
        "symmetric_mot_ratio": med["symmetric_cached_elastic"] / med["cached_elastic"],
        "grounding_forwards": int(grounding_forwards),
        "grounding_speedup": g_med["sequential"] / g_med["one_forward"],
        "gflops_ratio": step_gflops["cached_elastic"] / matmul_gflops,
        "step_ms": med["cached_elastic"] * 1e3,
        "achieved_gflops": step_gflops["cached_elastic"],
        "matmul_gflops": matmul_gflops,
        "generate_ms": {"batch1": e2e["batch1"]["median_ms"], "batch8_per_image": e2e["batch8"]["per_image_ms"]},
        "details": {
            "step": {
                "what": "one denoising step of text-to-image, 1 prompt with CFG (2 rows)",
                "rows": inp1["rows"], "seq_len": inp1["seq_len"], "prefix_len": inp1["prefix_len"],
                "target_len": cfg.positions_per_image,
                "timings": {k: _timing(v) for k, v in step_times.items()
                            if k != "matmul" and not k.startswith("sampler_")},
                "gflop": {**{k: v / 1e9 for k, v in flops1.items()},
                          "symmetric_cached_elastic": flops_sym["cached_elastic"] / 1e9,
                          "batch8_cached_elastic": flops8["cached_elastic"] / 1e9},
                "achieved_gflops": step_gflops,
                "elastic_speedup_cached": med["cached_all_layers"] / med["cached_elastic"],
                "elastic_speedup_prefill": med["prefill_all_layers"] / med["prefill_elastic"],
                "cache_and_elastic_speedup": med["uncached_all_layers"] / med["cached_elastic"],
                "symmetric_mot_ratio_uncached_elastic": med["symmetric_uncached_elastic"] / med["uncached_elastic"],
                "symmetric_mot_ratio_uncached_all_layers":
                    med["symmetric_uncached_all_layers"] / med["uncached_all_layers"],
                "symmetric_flop_ratio_cached": flops_sym["cached_elastic"] / flops1["cached_elastic"],
            },
            "matmul": {"size": MATMUL_N, **_timing(step_times["matmul"]), "gflops": matmul_gflops},
            "sampler": {
                "what": "ImageMaskSampler.step on (B, G*G, K) logits (multinomial draw per row + reveal)",
                **{k: _timing(v) for k, v in step_times.items() if k.startswith("sampler_")},
            },
            "grounding": {
                "images": len(images), "expressions_per_image": len(EXPRESSIONS),
                "loc_tokens_per_image": 4 * len(EXPRESSIONS),
                "forwards": {"one_forward": grounding_forwards, "stepwise": stepwise_forwards,
                             "reranked": reranked_forwards, "views": views_forwards,
                             "sequential": seq_forwards, "sequential_cached_prefix": seq_cached_forwards},
                "timings": {k: _timing(v) for k, v in g_times.items()},
                "speedup_vs_sequential_cached_prefix": g_med["sequential_cached_prefix"] / g_med["one_forward"],
            },
            "generate": {"num_steps": NUM_STEPS, **e2e},
        },
        "model": {
            "source": source,
            "params": count_parameters(model),
            "symmetric_params": count_parameters(sym),
            "config": {k: getattr(cfg, k) for k in (
                "hidden_size", "num_layers", "joint_layers", "num_heads", "intermediate_size",
                "gen_hidden_size", "gen_intermediate_size", "vocab_size", "codebook_size",
                "image_grid", "compression", "attention_mode")},
        },  # fmt: skip
        "settings": {"quick": quick, "preset": None if model_path else preset, "repeats": repeats,
                     "threads": torch.get_num_threads(),
                     "warmup": warmup, "e2e_repeats": e2e_repeats, "dtype": "float32",
                     "inference_mode": True, "interleaved": True},  # fmt: skip
        "machine": machine_info(),
    }
    result["elapsed_s"] = time.perf_counter() - t_start
    (out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "speed.md").write_text(to_markdown(result))
    return result


# ----------------------------------------------------------------------------- report


def to_markdown(r: dict[str, Any]) -> str:
    """The headline table, the per-step table and the end-to-end table."""
    d, m = r["details"], r["machine"]
    st = d["step"]
    t = st["timings"]
    lines = [
        "# Model speed",
        "",
        f"{r['model']['source']}; {m['cpu_model']}, {m['threads']} threads, torch {m['torch']}, fp32, "
        f"load average {m['load_average_1_5_15min']}. Medians of {r['settings']['repeats']} "
        "round-robin repeats after warm-up: ratios are side by side in one run.",
        "",
        "| metric | value | meaning |",
        "| --- | --- | --- |",
        f"| elastic_speedup | {r['elastic_speedup']:.2f}x | uncached step: all layers / elastic "
        "(und skips split layers) |",
        f"| cache_speedup | {r['cache_speedup']:.2f}x | elastic step: full sequence / cached condition |",
        f"| symmetric_mot_ratio | {r['symmetric_mot_ratio']:.2f}x | cached step: symmetric MoT / Elastic-MoT |",
        f"| grounding_forwards | {r['grounding_forwards']} | forwards of `ground` for "
        f"{d['grounding']['images']} images x {d['grounding']['expressions_per_image']} expressions |",
        f"| grounding_speedup | {r['grounding_speedup']:.2f}x | one LOC token per forward / one forward "
        f"(vs cached-prefix sequential: {d['grounding']['speedup_vs_sequential_cached_prefix']:.2f}x) |",
        f"| gflops_ratio | {r['gflops_ratio']:.3f} | cached step {r['achieved_gflops']:.1f} GFLOP/s / "
        f"{d['matmul']['size']}^2 matmul {r['matmul_gflops']:.1f} GFLOP/s |",
        f"| generate, batch 1 | {d['generate']['batch1']['median_ms']:.1f} ms | {d['generate']['num_steps']} "
        f"steps, {d['generate']['batch1']['forwards']} forwards, incl. VQ decode |",
        f"| generate, batch 8 | {d['generate']['batch8']['per_image_ms']:.1f} ms / image | "
        f"{d['generate']['batch8']['median_ms']:.0f} ms per call |",
        "",
        f"## One denoising step (1 prompt + CFG = {st['rows']} rows, sequence {st['seq_len']} = "
        f"prefix {st['prefix_len']} + target {st['target_len']})",
        "",
        "| variant | median ms | min ms | GFLOP | GFLOP/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, tm in t.items():
        gf = st["gflop"].get(name)
        ach = st["achieved_gflops"].get(name)
        lines.append(
            f"| {name} | {tm['median_ms']:.2f} | {tm['min_ms']:.2f} | "
            f"{'' if gf is None else f'{gf:.3f}'} | {'' if ach is None else f'{ach:.1f}'} |"
        )
    for name, tm in d["sampler"].items():
        if name != "what":
            lines.append(f"| {name} (`ImageMaskSampler.step`) | {tm['median_ms']:.2f} | {tm['min_ms']:.2f} |  |  |")
    g = d["grounding"]
    lines += [
        "",
        "## Grounding",
        "",
        "| method | forwards | median ms |",
        "| --- | --- | --- |",
    ]
    for name, tm in g["timings"].items():
        lines.append(f"| {name} | {g['forwards'][name]} | {tm['median_ms']:.1f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lavida_agent.benchmarks.speed_model", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", default="bench_out/speed", help="output folder (speed.json, speed.md)")
    parser.add_argument("--quick", action="store_true", help="few repeats (well under a minute)")
    parser.add_argument("--preset", default="shapes", help="config preset for random weights")
    parser.add_argument("--model-path", default=None, help="a LavidaPipeline folder instead of random weights")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    r = run(out_dir=args.out, quick=args.quick, preset=args.preset, model_path=args.model_path,
            repeats=args.repeats, threads=args.threads)  # fmt: skip
    print(to_markdown(r))
    print(f"wrote {Path(args.out) / 'speed.json'} and speed.md in {r['elapsed_s']:.1f} s")


if __name__ == "__main__":
    main()
