"""Train and evaluate the ShapesWorld VQ image tokenizer.

Training data is rendered on the fly from a seeded `numpy.random.Generator` (ShapesWorld
`sample_scene` + `render`), so a run is a pure function of its arguments. Checkpoints
hold the full training state (model incl. EMA codebook buffers, optimizer, scheduler,
step, the data generator's state and the restart `torch.Generator`'s state): a resumed
run continues exactly as the uninterrupted one would have. Resuming with a different
`--steps` re-targets the cosine schedule at the new total (logged as a warning), which
is how a run is shortened or extended on a busy machine.

Run it:

    python -m lavida_agent.model.training_vq --out checkpoints/vq --steps 3000 \
        --eval-scenes 500 --export model/weights/vq

Files in `--out`: `checkpoint.pt` (latest training state), `metrics.jsonl` (one JSON
record per `log_every` steps), `final/` (fp32 `save_pretrained` of the last step) and
`eval.json` when `--eval-scenes` is given.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .configuration_vq import VQConfig
from .modeling_vq import VQImageTokenizer, images_to_tensor, tensor_to_images
from .run_folder import RunFolderError, check_resume, load_checkpoint, read_metrics, truncate_metrics

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
EVAL_NAME = "eval.json"

# (rng, batch_size) -> uint8 images (B, 64, 64, 3)
BatchSampler = Callable[[np.random.Generator, int], np.ndarray]


# ----------------------------------------------------------------------------- data
def sample_shapes_world_batch(rng: np.random.Generator, batch_size: int, crowded: float = 0.0) -> np.ndarray:
    """Render `batch_size` random ShapesWorld scenes: uint8 `(B, 64, 64, 3)`.

    `crowded`: the share drawn as crowded scenes (`crowded_scene`), where objects nearly
    touch; off, nothing more is drawn from `rng`, so earlier runs replay.
    """
    from lavida_agent.tools.shapes_world.render import render
    from lavida_agent.tools.shapes_world.sampler import sample_scene

    def one():
        return crowded_scene(rng) if crowded and rng.random() < crowded else sample_scene(rng)

    return np.stack([render(one()) for _ in range(batch_size)])


def crowded_scene(rng: np.random.Generator):
    """Three or four objects, the first two large: objects a pixel or two apart, where a
    4-px code holds the edges of two objects (the tokenizer's remaining failures: a box
    one or two pixels off, or an unknown blob, where two objects nearly touch)."""
    from lavida_agent.tools.shapes_world.sampler import sample_scene

    n = int(rng.integers(3, 5))
    return sample_scene(rng, n_objects=n, sizes=["large", "large"] + [None] * (n - 2))


# ----------------------------------------------------------------------------- schedule
def warmup_cosine(
    step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.05
) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _WarmupCosine:
    """LR lambda as a callable object, so `LambdaLR.state_dict()` records its settings."""

    def __init__(self, warmup_steps: int, total_steps: int):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, warmup_steps=self.warmup_steps, total_steps=self.total_steps)


# ----------------------------------------------------------------------------- checkpoints
def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a torn checkpoint


def _load_checkpoint(path: Path) -> dict[str, Any]:
    return load_checkpoint(path, map_location="cpu", weights_only=True)


def _check_run(steps: int, batch_size: int, lr: float, log_every: int, save_every: int, crowded: float) -> None:
    for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every),
                        ("save_every", save_every)):  # fmt: skip
        if value < 1:
            raise RunFolderError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not lr > 0:
        raise RunFolderError(f"--lr must be > 0, got {lr}")
    if not 0.0 <= crowded <= 1.0:
        raise RunFolderError(f"--crowded must be a share in [0, 1], got {crowded}")


# ----------------------------------------------------------------------------- training
def train_vq(
    config: VQConfig,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    out_dir: str | os.PathLike,
    log_every: int = 50,
    save_every: int = 500,
    resume: bool = True,
    progress: bool = True,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    edge_loss_weight: float = 0.0,
    crowded: float = 0.0,
    sample_batch: BatchSampler | None = None,
    init_from: str | os.PathLike | None = None,
    decoder_only: bool = False,
) -> dict[str, Any]:
    """Train a `VQImageTokenizer` on ShapesWorld renders.

    Args:
        config: Architecture of the tokenizer.
        steps: Total optimizer steps (the LR schedule spans exactly these).
        batch_size: Images per step.
        lr: Peak AdamW learning rate.
        seed: Seeds the weight init, the data generator and the restart generator.
        out_dir: Where `checkpoint.pt`, `metrics.jsonl` and `final/` go.
        log_every: Steps between JSONL metric records.
        save_every: Steps between checkpoints (one is always written at the end).
        resume: Continue from `out_dir/checkpoint.pt` if it exists.
        progress: Show a tqdm bar.
        warmup_steps: Linear warmup length; default `min(200, steps // 10)`.
        weight_decay: AdamW weight decay (0: the model is tiny and the data unlimited).
        grad_clip: Max global gradient norm.
        edge_loss_weight: Extra reconstruction weight on object outlines (see
            `VQImageTokenizer.forward`).
        crowded: The share of crowded scenes (objects nearly touching) in each batch.
        sample_batch: `(rng, batch_size) -> uint8 (B, 64, 64, 3)`; default ShapesWorld
            (with `crowded`).
        init_from: A saved tokenizer (`save_pretrained` folder) whose weights start the
            run. Decoder blocks that `config` adds beyond the saved ones start as exact
            identities (their last conv is zero).
        decoder_only: Train the decoder alone: the encoder and the codebook are frozen
            (no EMA updates, no restarts), so every image keeps the codes it had and a
            transformer trained on those codes stays valid. Needs `init_from`.

    A resume must be the same run: other arguments than the checkpoint's (all but `steps`,
    `log_every`, `save_every` and `progress`) are a `RunFolderError` naming them, as is a
    `steps` below the checkpoint's step; a fresh run starts a fresh `metrics.jsonl` and
    removes an earlier run's `eval.json`.

    Returns:
        Final metrics: `step`, `loss`, `recon_loss`, `commitment_loss`, `perplexity`,
        `codebook_usage` (EMA), `lr`, `seconds_per_step` (this process; None when it ran no
        step), `out_dir`.
    """
    _check_run(steps, batch_size, lr, log_every, save_every, crowded)
    if decoder_only and init_from is None:
        raise ValueError("decoder_only=True needs init_from: a frozen encoder must come from somewhere")
    out_path = Path(out_dir)
    ckpt_path = out_path / CHECKPOINT_NAME
    metrics_path = out_path / METRICS_NAME
    if sample_batch is None:
        sample_batch = functools.partial(sample_shapes_world_batch, crowded=crowded) if crowded else sample_shapes_world_batch
    # what makes the run this run (a resume checks it; `steps` may change, with a warning)
    run = {"batch_size": batch_size, "lr": lr, "seed": seed, "warmup_steps": warmup_steps,
           "weight_decay": weight_decay, "grad_clip": grad_clip, "edge_loss_weight": edge_loss_weight,
           "crowded": crowded, "decoder_only": decoder_only,
           "init_from": None if init_from is None else str(Path(init_from).resolve())}  # fmt: skip
    warmup_steps = min(200, max(1, steps // 10)) if warmup_steps is None else warmup_steps
    state = _load_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None
    if state is not None:
        if state["config"] != config.to_dict():
            raise RunFolderError(
                f"checkpoint {ckpt_path} was written for a different config: "
                f"{state['config']} != {config.to_dict()}"
            )
        if "run" in state:  # checkpoints written before the check have no record of it
            check_resume(out_path, state["run"], run)
        if int(state["step"]) > steps:
            raise RunFolderError(f"{out_path} is at step {state['step']}, past --steps {steps}: give at least "
                             f"{state['step']} steps to resume it")  # fmt: skip
    out_path.mkdir(parents=True, exist_ok=True)

    # Three independent streams from one seed: init, data, codebook restarts.
    init_generator = torch.Generator().manual_seed(seed)
    model = VQImageTokenizer(config, generator=init_generator)
    if init_from is not None and state is None:  # a resume has its own
        _load_initial_weights(model, init_from)
    if decoder_only:
        model.encoder.requires_grad_(False)
        model.quantizer.requires_grad_(False)
    data_rng = np.random.default_rng([seed, 1])
    restart_generator = torch.Generator().manual_seed(seed + 2)
    trainable = model.decoder.parameters() if decoder_only else model.parameters()
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _WarmupCosine(warmup_steps, steps))

    start_step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        saved_steps = scheduler.lr_lambdas[0].total_steps  # restored by load_state_dict
        if saved_steps != steps:
            # `load_state_dict` restored the old schedule's settings; re-target the cosine at
            # the new total (a shortened/extended run, no longer identical to either).
            logger.warning(
                "resuming a %d-step run as a %d-step run: the LR schedule is re-targeted",
                saved_steps, steps,
            )  # fmt: skip
            scheduler.lr_lambdas[0] = _WarmupCosine(warmup_steps, steps)
            for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base_lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
        data_rng.bit_generator.state = state["data_rng"]
        restart_generator.set_state(state["restart_generator"])
        start_step = int(state["step"])
        truncate_metrics(metrics_path, start_step)
        logger.info("resumed from %s at step %d", ckpt_path, start_step)
    else:  # a fresh run starts a fresh log, and an earlier run's evaluation is not its own
        metrics_path.unlink(missing_ok=True)
        (out_path / EVAL_NAME).unlink(missing_ok=True)

    def save(step: int) -> None:
        _save_checkpoint(
            ckpt_path,
            {
                "step": step,
                "steps": steps,
                "config": config.to_dict(),
                "run": run,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "data_rng": data_rng.bit_generator.state,
                "restart_generator": restart_generator.get_state(),
                "elapsed_s": before + time.perf_counter() - t_start,
            },
        )

    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "training VQ (%.2fM params, K=%d) for %d steps, batch %d, lr %g",
        n_params / 1e6, config.num_vq_embeddings, steps, batch_size, lr,
    )  # fmt: skip

    model.train()
    # a finished run asked again reports its last record
    last: dict[str, Any] = next(reversed(read_metrics(metrics_path)), None) or {"step": start_step}
    window: list[dict[str, float]] = []
    t_start = time.perf_counter()
    before = float(state.get("elapsed_s", 0.0)) if state is not None else 0.0  # the run's time before a resume
    bar = tqdm(total=steps, initial=start_step, disable=not progress, desc="vq", dynamic_ncols=True)
    with bar:
        for step in range(start_step, steps):
            pixels = images_to_tensor(sample_batch(data_rng, batch_size))  # (B, 3, 64, 64)
            if decoder_only:  # eval mode: no codebook EMA update, no dead-code restart
                model.encoder.eval()
                model.quantizer.eval()
            lr_now = scheduler.get_last_lr()[0]  # the rate this step takes
            output = model(pixels, generator=restart_generator, edge_loss_weight=edge_loss_weight)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()

            window.append(
                {
                    "loss": output.loss.item(),
                    "recon_loss": output.recon_loss.item(),
                    "commitment_loss": output.commitment_loss.item(),
                    "perplexity": output.perplexity.item(),
                    "grad_norm": float(grad_norm),
                    "restarts": float(output.num_restarted),
                }
            )
            done = step + 1
            bar.update(1)
            if done % log_every == 0 or done == steps:
                record: dict[str, Any] = {"step": done}
                for key in window[0]:
                    record[key] = float(np.mean([w[key] for w in window]))
                record["restarts"] = int(sum(w["restarts"] for w in window))
                record["codebook_usage"] = float(output.codebook_usage)
                record["lr"] = lr_now
                record["elapsed_s"] = round(before + time.perf_counter() - t_start, 2)
                window = []
                with metrics_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.4f}", ppl=f"{record['perplexity']:.0f}")
                logger.info("step %d %s", done, {k: v for k, v in record.items() if k != "step"})
                last = record
            if done % save_every == 0 or done == steps:
                save(done)

    elapsed = time.perf_counter() - t_start
    ran = steps - start_step
    model.eval()
    model.save_pretrained(out_path / "final", dtype=torch.float32)
    result = dict(last)
    result.update(
        step=steps,
        seconds_per_step=elapsed / ran if ran else None,
        out_dir=str(out_path),
    )
    return result


def _load_initial_weights(model: VQImageTokenizer, directory: str | os.PathLike) -> None:
    """Copy a saved tokenizer's weights into `model`; extra decoder blocks become identities."""
    source = VQImageTokenizer.from_pretrained(directory)
    mine, theirs = model.config.to_dict(), source.config.to_dict()
    for cfg in (mine, theirs):
        cfg["decoder_res_blocks"] = None
    if mine != theirs:
        diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs.get(k)}
        raise ValueError(f"{directory} has a different architecture (saved, requested): {diff}")
    if model.config.num_decoder_blocks < source.config.num_decoder_blocks:
        raise ValueError(
            f"{directory} has {source.config.num_decoder_blocks} decoder blocks; "
            f"a run from it needs at least as many, got {model.config.num_decoder_blocks}"
        )
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    added = {f"decoder.blocks.{i}." for i in range(source.config.num_decoder_blocks, model.config.num_decoder_blocks)}
    wrong = [k for k in missing if not any(k.startswith(a) for a in added)] + list(unexpected)
    if wrong:
        raise ValueError(f"weights from {directory} do not fit: {wrong[:5]}")
    with torch.no_grad():
        for i in range(source.config.num_decoder_blocks, model.config.num_decoder_blocks):
            model.decoder.blocks[i].conv2.weight.zero_()
            if model.decoder.blocks[i].conv2.bias is not None:
                model.decoder.blocks[i].conv2.bias.zero_()
    logger.info("initialised from %s", directory)


# ----------------------------------------------------------------------------- evaluation
def _same_scene(a: Any, b: Any, *, box_tolerance: int = 1) -> bool:
    """Same background, same unknown-blob count, and a one-to-one matching of objects with
    equal shape/colour/size and every box coordinate within `box_tolerance` pixels."""
    if a.background != b.background or len(a.unknown) != len(b.unknown):
        return False
    if len(a.objects) != len(b.objects):
        return False
    unmatched = list(b.objects)
    for obj in a.objects:
        for i, other in enumerate(unmatched):
            if (obj.shape, obj.color, obj.size) == (other.shape, other.color, other.size) and all(
                abs(p - q) <= box_tolerance for p, q in zip(obj.box, other.box, strict=True)
            ):
                del unmatched[i]
                break
        else:
            return False
    return True


@torch.no_grad()
def evaluate_vq(
    tokenizer: VQImageTokenizer, n_scenes: int = 500, seed: int = 20240, batch_size: int = 100
) -> dict[str, float]:
    """Round-trip `n_scenes` fresh ShapesWorld renders and judge them with the detector.

    Args:
        tokenizer: The tokenizer (put in eval mode here).
        n_scenes: Number of scenes, drawn from `numpy.random.default_rng(seed)`.
        seed: Seed of the scene generator (keep it away from the training seed's stream).
        batch_size: Images per encode/decode call.

    Returns:
        `detector_exact`: fraction of reconstructions on which the detector finds the same
        scene as on the original render (same background, same objects with boxes
        within 1 px, same number of unknown blobs);
        `detector_on_originals`: the same test between the original render and its
        ground-truth scene (the detector's own accuracy, for reference);
        `pixel_exact`: fraction of images reconstructed bit-exactly (uint8);
        `pixel_accuracy`: fraction of pixels exactly right;
        `psnr`: over all pixels (100.0 when every pixel is exact);
        `max_abs_error`: largest uint8 error anywhere;
        `codes_used`: distinct codes over the evaluation set.
    """
    from lavida_agent.tools.shapes_world.detect import detect
    from lavida_agent.tools.shapes_world.render import render
    from lavida_agent.tools.shapes_world.sampler import sample_scene

    tokenizer.eval()
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n_scenes)]
    originals = np.stack([render(scene) for scene in scenes])  # (N, 64, 64, 3) uint8
    recons, codes_seen = [], set()
    for start in range(0, n_scenes, batch_size):
        pixels = images_to_tensor(originals[start : start + batch_size])
        codes = tokenizer.encode(pixels).codes  # (b, 16, 16)
        codes_seen.update(codes.unique().tolist())
        recons.append(tensor_to_images(tokenizer.decode(codes)))
    recon = np.concatenate(recons)  # (N, 64, 64, 3) uint8

    detector_exact = detector_ok = 0
    for scene, original, reconstruction in zip(scenes, originals, recon, strict=True):
        found_original = detect(original)
        detector_ok += _same_scene(found_original, _as_detection(scene))
        detector_exact += _same_scene(found_original, detect(reconstruction))

    error = recon.astype(np.int64) - originals.astype(np.int64)
    mse = float(np.mean(error.astype(np.float64) ** 2))
    return {
        "n_scenes": n_scenes,
        "detector_exact": detector_exact / n_scenes,
        "detector_on_originals": detector_ok / n_scenes,
        "pixel_exact": float(np.mean(np.all(error == 0, axis=(1, 2, 3)))),
        "pixel_accuracy": float(np.mean(np.all(error == 0, axis=-1))),
        "psnr": 100.0 if mse == 0 else float(10 * np.log10(255.0**2 / mse)),
        "max_abs_error": int(np.abs(error).max()),
        "codes_used": len(codes_seen),
    }


def edit_locality(tokenizer: VQImageTokenizer, n_edits: int = 200, seed: int = 20240,
                  batch_size: int = 100) -> dict[str, float]:  # fmt: skip
    """How local the codes are: over `n_edits` fresh object edits (ShapesWorld's edit
    grammar; background edits, which change every pixel, left out), the share of the codes
    *outside* the cells the edit touches (`training.touched_plan`'s boxes, `tasks.box_cells`)
    that differ between the source's encoding and the target's.

    The pixels there are identical, so a tokenizer whose codes see only their own
    neighbourhood scores 0. One whose encoder normalises over the whole image (GroupNorm)
    does not: the single-shot edit must then redraw codes far from the change, and region
    edits, which keep the source's codes there, decode them beside codes of another image.

    Returns:
        `codes_changed_outside_edit` (mean over edits) and `edits`.
    """
    from types import SimpleNamespace

    from lavida_agent.tools.shapes_world import language as lang
    from lavida_agent.tools.shapes_world.render import render
    from lavida_agent.tools.shapes_world.sampler import sample_scene

    from .tasks import box_cells
    from .training import touched_plan

    tokenizer.eval()
    rng = np.random.default_rng(seed)
    pairs, boxes = [], []
    while len(pairs) < n_edits:
        source = sample_scene(rng)
        _, _, target = lang.sample_edit(rng, source)
        touched = touched_plan(source, target)
        if touched:
            pairs.append((render(source), render(target)))
            boxes.append([box for _, box in touched])
    shares = []
    for start in range(0, n_edits, batch_size):
        chunk = pairs[start : start + batch_size]
        a = tokenizer.encode(images_to_tensor(np.stack([p for p, _ in chunk]))).codes
        b = tokenizer.encode(images_to_tensor(np.stack([q for _, q in chunk]))).codes
        changed = (a != b).reshape(len(chunk), -1, *a.shape[-2:]).any(1).cpu().numpy()  # (b, G, G)
        grid = SimpleNamespace(image_grid=changed.shape[-1], image_size=chunk[0][0].shape[0])
        for k, row in enumerate(changed):
            outside = ~box_cells(boxes[start + k], grid)
            shares.append(float(row[outside].mean()) if outside.any() else 0.0)
    return {"codes_changed_outside_edit": float(np.mean(shares)), "edits": n_edits}


class _SceneAsDetection:
    """Adapts a ground-truth `Scene` to the fields `_same_scene` reads."""

    def __init__(self, scene: Any):
        self.background = scene.background
        self.objects = scene.objects
        self.unknown = ()


def _as_detection(scene: Any) -> _SceneAsDetection:
    return _SceneAsDetection(scene)


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """The command line (`lavida-agent train vq`): train, export, evaluate; returns the final
    metrics (`python -m` prints them as JSON). Bad arguments exit with status 2."""
    defaults = VQConfig()
    parser = argparse.ArgumentParser(prog=prog, description="Train the ShapesWorld VQ image tokenizer.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    # run
    parser.add_argument("--out", required=True, help="output folder (checkpoints, logs)")
    parser.add_argument("--steps", type=int, default=3000, help="total optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of init, data and restarts")
    parser.add_argument("--log-every", type=int, default=50, help="steps between log records")
    parser.add_argument("--save-every", type=int, default=250, help="steps between checkpoints")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                        help="no progress bar (there is one only when stderr is a terminal)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--edge-loss-weight", type=float, default=0.0,
                        help="extra reconstruction weight on object outlines")  # fmt: skip
    parser.add_argument("--crowded", type=float, default=0.0,
                        help="share of crowded scenes (objects nearly touching) in each batch")  # fmt: skip
    # architecture
    parser.add_argument("--hidden-channels", type=int, default=defaults.hidden_channels)
    parser.add_argument("--num-res-blocks", type=int, default=defaults.num_res_blocks)
    parser.add_argument("--decoder-res-blocks", type=int, default=None,
                        help="decoder depth when it differs from the encoder's")  # fmt: skip
    parser.add_argument("--init-from", default=None, help="start from this saved tokenizer")
    parser.add_argument("--decoder-only", action="store_true",
                        help="freeze encoder and codebook (codes stay valid); needs --init-from")  # fmt: skip
    parser.add_argument("--latent-channels", type=int, default=defaults.latent_channels)
    parser.add_argument("--codebook-size", type=int, default=defaults.num_vq_embeddings)
    # evaluation / export
    parser.add_argument("--eval-scenes", type=int, default=0, help="evaluate N scenes at the end")
    parser.add_argument("--eval-seed", type=int, default=20240, help="seed of the eval scenes")
    parser.add_argument("--export", default=None, help="also save_pretrained (fp16) here")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decoder_only and not args.init_from:
        parser.error("--decoder-only needs --init-from (the frozen encoder and codebook)")
    config = VQConfig(
        hidden_channels=args.hidden_channels,
        num_res_blocks=args.num_res_blocks,
        decoder_res_blocks=args.decoder_res_blocks,
        latent_channels=args.latent_channels,
        num_vq_embeddings=args.codebook_size,
    )
    try:
        result = train_vq(
            config,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            out_dir=args.out,
            log_every=args.log_every,
            save_every=args.save_every,
            resume=not args.no_resume,
            progress=not args.no_progress and sys.stderr.isatty(),
            edge_loss_weight=args.edge_loss_weight,
            crowded=args.crowded,
            init_from=args.init_from,
            decoder_only=args.decoder_only,
        )
    except RunFolderError as exc:
        parser.error(str(exc))
    logger.info("final: %s", result)
    tokenizer = VQImageTokenizer.from_pretrained(Path(args.out) / "final")
    if args.export:
        tokenizer.save_pretrained(args.export, dtype=torch.float16)
        tokenizer = VQImageTokenizer.from_pretrained(args.export)  # evaluate what ships
    if args.eval_scenes:
        metrics = evaluate_vq(tokenizer, n_scenes=args.eval_scenes, seed=args.eval_seed)
        (Path(args.out) / EVAL_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
        logger.info("eval: %s", metrics)
        result["eval"] = metrics
    return result


if __name__ == "__main__":
    print(json.dumps(main(prog="python -m lavida_agent.model.training_vq")))  # noqa: T201
