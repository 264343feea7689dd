"""``dev`` command group: generate tiny GGUF models for tests and demos."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from llamarouter.devtools.tinymodel import (
    DEFAULT_SHAPE,
    FTYPES,
    ModelShape,
    make_demo_models,
    parse_size,
    shape_for_size,
    write_draft_model,
    write_mmproj,
    write_model,
)

dev = click.Group("dev", help="Developer tools: generate tiny, real GGUF models (random weights).")


def _size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    if size <= 0:
        raise click.BadParameter("size must be positive", ctx=ctx, param=param)
    return size


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def _report(paths: list[Path]) -> None:
    for p in paths:
        click.echo(f"{p}\t{_human(p.stat().st_size)}")


@dev.command("make-model")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output .gguf file (for --split, shards are named OUT-0000i-of-0000N.gguf).")
@click.option("--size", callback=_size_option,
              help="Target file size, e.g. 300KB, 5MB, 1GiB; picks the dimensions.")
@click.option("--n-embd", type=click.IntRange(min=1), help=f"Embedding width (default {DEFAULT_SHAPE.n_embd}).")
@click.option("--n-layer", type=click.IntRange(min=1), help=f"Layers (default {DEFAULT_SHAPE.n_layer}).")
@click.option("--n-head", type=click.IntRange(min=1), help=f"Attention heads (default {DEFAULT_SHAPE.n_head}).")
@click.option("--n-head-kv", type=click.IntRange(min=1), help="KV heads (default: --n-head).")
@click.option("--n-ff", type=click.IntRange(min=1), help=f"Feed-forward width (default {DEFAULT_SHAPE.n_ff}).")
@click.option("--ctx", type=click.IntRange(min=1), help=f"Training context length (default {DEFAULT_SHAPE.n_ctx_train}).")
@click.option("--ftype", type=click.Choice(FTYPES), default="f32", show_default=True)
@click.option("--seed", type=click.IntRange(min=0), help="Random seed (default 0; 1 for --draft).")
@click.option("--split", "n_shards", type=click.IntRange(min=1), help="Write a split model with this many shards.")
@click.option("--name", help="general.name (default: file stem).")
@click.option("--mmproj", is_flag=True,
              help="Write a vision projector instead; --n-embd is then the text model's width (default 64).")
@click.option("--draft", is_flag=True, help="Write the small draft model (for --model-draft).")
def make_model(out: Path, size: int | None, n_embd: int | None, n_layer: int | None, n_head: int | None,
               n_head_kv: int | None, n_ff: int | None, ctx: int | None, ftype: str, seed: int | None,
               n_shards: int | None, name: str | None, mmproj: bool, draft: bool) -> None:
    """Write a random-weight llama GGUF model that llama-server can load."""
    dims = dict(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff)
    given_dims = [f"--{k.replace('_', '-')}" for k, v in dims.items() if v is not None]
    if mmproj and draft:
        raise click.UsageError("--mmproj and --draft are mutually exclusive")
    try:
        if mmproj:
            extra = given_dims[:] if given_dims != ["--n-embd"] else []
            if size is not None or n_shards is not None or ctx is not None or name is not None or ftype != "f32" or extra:
                raise click.UsageError("--mmproj only accepts --out, --seed and --n-embd")
            _report([write_mmproj(out, seed=seed or 0, n_embd_text=n_embd or DEFAULT_SHAPE.n_embd)])
            return
        if draft:
            if size is not None or given_dims or n_shards is not None or ctx is not None or name is not None:
                raise click.UsageError("--draft only accepts --out, --seed and --ftype")
            _report([write_draft_model(out, seed=1 if seed is None else seed, ftype=ftype)])
            return
        if size is not None:
            if given_dims:
                raise click.UsageError(f"--size cannot be combined with {', '.join(given_dims)}")
            shape = shape_for_size(size, ftype=ftype)
        else:
            head = n_head or DEFAULT_SHAPE.n_head
            shape = ModelShape(
                n_embd=n_embd or DEFAULT_SHAPE.n_embd,
                n_layer=n_layer or DEFAULT_SHAPE.n_layer,
                n_head=head,
                n_head_kv=n_head_kv or (head if n_head else DEFAULT_SHAPE.n_head_kv),
                n_ff=n_ff or DEFAULT_SHAPE.n_ff,
            )
        if ctx is not None:
            shape = replace(shape, n_ctx_train=ctx)
        paths = write_model(out, shape, ftype=ftype, seed=seed or 0, name=name, n_shards=n_shards)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _report(paths)


@dev.command("make-demo")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def make_demo(directory: Path) -> None:
    """Fill DIRECTORY with a few small models (idempotent)."""
    _report(make_demo_models(directory))
