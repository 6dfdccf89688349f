"""`lavida-agent model`: inspect the Elastic-MoT model.

- `model info [PATH] [--preset NAME] [--json]`: parameter counts per branch and the
  architecture of a checkpoint folder (a `LavidaPipeline` folder with `pipeline_index.json`,
  or a transformer folder with `config.json`) or of a named preset (`tiny`, `shapes`,
  `lavida-o`). With neither, the embedded weights folder. The model is built on the meta
  device, so no weights are read and `--preset lavida-o` (10.4B parameters) needs no memory.

Errors (an unknown preset, a folder that is not a checkpoint) print one `Error: ...` line on
stderr and exit with status 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

__all__ = ["model", "model_info"]

# Architecture keys reported under "config" (the token ids are reported too, grouped).
_ARCH_KEYS = (
    "hidden_size", "num_layers", "joint_layers", "num_heads", "head_dim", "intermediate_size",
    "gen_hidden_size", "gen_intermediate_size", "vocab_size", "codebook_size", "image_grid",
    "compression", "positions_per_image", "image_size", "vision_patch_size", "vision_hidden_size",
    "vision_layers", "vision_heads", "vision_tokens_per_image", "rope_theta", "attention_mode",
)  # fmt: skip
_TOKEN_KEYS = (
    "mask_token_id", "pad_token_id", "eos_token_id", "img_gen_token_id", "img_src_token_id",
    "img_enc_token_id", "loc_token_offset", "num_loc_tokens",
)  # fmt: skip


def _load_config(path: Path | None, preset: str | None) -> tuple[Any, str]:
    """The `LavidaConfig` of a preset or a checkpoint folder, and a description of it."""
    from lavida_agent.model.configuration_lavida import PRESETS, LavidaConfig

    if preset is not None:
        if preset not in PRESETS:
            raise click.ClickException(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        return LavidaConfig(**PRESETS[preset]), f"preset {preset}"
    assert path is not None
    if not path.is_dir():
        raise click.ClickException(f"{path} is not a folder (expected a checkpoint folder)")
    folder = path
    index = path / "pipeline_index.json"
    if index.is_file():
        try:
            folder = path / json.loads(index.read_text())["transformer"]
        except (ValueError, KeyError, TypeError) as e:
            raise click.ClickException(f"{index} is not a valid pipeline index ({e})") from None
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise click.ClickException(
            f"{path} is not a checkpoint: no pipeline_index.json or config.json in it"
            if folder == path else f"{path}: pipeline_index.json points to {folder}, which has no config.json"
        )  # fmt: skip
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as e:
        raise click.ClickException(f"{config_file} is not valid JSON ({e})") from None
    if raw.get("model_type") != LavidaConfig.model_type:
        raise click.ClickException(
            f"{config_file} describes a {raw.get('model_type')!r} model, not a "
            f"{LavidaConfig.model_type!r} transformer"
        )
    try:
        return LavidaConfig.from_pretrained(folder), str(folder)
    except (ValueError, OSError, TypeError) as e:
        raise click.ClickException(f"cannot read {config_file}: {e}") from None


def model_info(path: str | Path | None = None, preset: str | None = None) -> dict[str, Any]:
    """Parameter counts and architecture of a checkpoint folder or a preset (meta device).

    `params` holds `count_parameters` (`und`, `gen`, `gen_heads`, `vision`, `shared`,
    `total`) plus what each kind of task activates: `active_understanding` (text tasks: und
    + vision encoder) and `active_generation` (text-to-image with elastic activation: gen
    branch and heads, every und parameter of the joint layers and the text embedding, and
    the rows of the shared output projection that gen positions use in the split layers).
    """
    import torch

    from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion, count_parameters

    if path is not None and preset is not None:
        raise click.ClickException("give a checkpoint PATH or --preset, not both")
    if path is None and preset is None:
        from lavida_agent.model.pipeline_lavida import default_weights_path

        path = default_weights_path()
        if not (path / "pipeline_index.json").is_file():
            raise click.ClickException(
                f"no embedded weights at {path}: pass a checkpoint PATH or --preset NAME"
            )
    config, source = _load_config(None if path is None else Path(path), preset)
    with torch.device("meta"):
        net = LavidaForMaskedDiffusion(config)
    params = count_parameters(net)
    joint_und = 0
    for name, p in net.named_parameters():
        if name.startswith("layers.") and "_gen" not in name and int(name.split(".")[1]) < config.joint_layers:
            joint_und += p.numel()
    split_layers = config.num_layers - config.joint_layers
    params["active_understanding"] = params["und"] + params["vision"]
    params["active_generation"] = (
        params["gen"] + params["gen_heads"] + joint_und + net.embed_tokens.weight.numel()
        + split_layers * config.gen_hidden_size * config.hidden_size + config.gen_hidden_size
    )  # fmt: skip
    cfg = {k: getattr(config, k) for k in _ARCH_KEYS}
    cfg["token_ids"] = {k: getattr(config, k) for k in _TOKEN_KEYS}
    return {"source": source, "params": params, "config": cfg}


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


@click.group("model")
def model() -> None:
    """Inspect the Elastic-MoT model (parameter counts, architecture)."""


@model.command("info")
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option("--preset", default=None, help="a named config (tiny, shapes, lavida-o) instead of PATH")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def info(ctx: click.Context, path: Path | None, preset: str | None, as_json: bool) -> None:
    """Parameter counts per branch and the architecture of a checkpoint or preset.

    PATH is a LavidaPipeline folder (pipeline_index.json) or a transformer folder
    (config.json); without PATH or --preset, the global `--model` or the embedded weights.
    """
    if path is None and preset is None:
        given = (ctx.find_root().obj or {}).get("model")
        path = Path(given) if given else None
    result = model_info(path, preset)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    p, c = result["params"], result["config"]
    click.echo(f"{result['source']}")
    click.echo(
        f"  und {c['hidden_size']} wide, gen {c['gen_hidden_size']} wide, {c['num_layers']} layers "
        f"({c['joint_layers']} joint), {c['num_heads']} heads, vocab {c['vocab_size']}, "
        f"{c['codebook_size']} codes, {c['positions_per_image']} positions per image"
    )
    for key in ("und", "gen", "gen_heads", "vision", "shared", "total", "active_understanding", "active_generation"):
        click.echo(f"  {key:<21} {_human(p[key]):>9}  ({p[key]:,})")
