"""The `moe-fusion` command: argument parsing and printing only; the work lives in the Python API."""

from __future__ import annotations

import functools
import io
import sys
from dataclasses import replace
from pathlib import Path

import click

from moe_fusion import __version__
from moe_fusion.catalogue import CatalogueError
from moe_fusion.checking import FUSED_EXPERTS_MODES, MODES, check
from moe_fusion.convert import WEIGHT_FORMATS
from moe_fusion.explain import explain as explained
from moe_fusion.explain import text as explanation_text
from moe_fusion.explain import to_json as explanation_json
from moe_fusion.fusing import fuse
from moe_fusion.host import NoSpaceError
from moe_fusion.io import InputError, check_output, check_space, first_line, load, save
from moe_fusion.lower import DEFAULT_TARGET, TARGETS, CpuFacts, lower

BAD_INPUT = 2
NOT_EQUIVALENT = 1


def one_line_errors(command):
    """Bad input: one line on stderr and exit 2; anything unexpected: one line and exit 1. No tracebacks."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (InputError, CatalogueError, NoSpaceError) as error:  # NoSpaceError: a full disk, said up front
            click.echo(f"moe-fusion: {error}", err=True)
            sys.exit(BAD_INPUT)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as error:  # the promise to users is one line, never a traceback
            click.echo(f"moe-fusion: internal error: {type(error).__name__}: {first_line(error)}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moe-fusion")
def main() -> None:
    """Find, fuse, verify and lower Mixture-of-Experts layers in OpenVINO models."""


patterns_option = click.option(
    "--patterns",
    "patterns",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Folder of extra pattern modules (repeatable).",
)


@main.command("fuse")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Fused model (.xml or folder).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON report here.")
@patterns_option
@click.option("--no-verify", is_flag=True, help="Skip the per-block numerical proof.")
@click.option("--force", is_flag=True, help="Overwrite an existing OUTPUT.")
@click.option("--in-place", is_flag=True, help="Allow OUTPUT to be INPUT.")
@click.option("--lower", "lower_target", type=click.Choice(TARGETS), is_flag=False, flag_value=DEFAULT_TARGET,
              help=f"Then lower to native ops for TARGET (alone: {DEFAULT_TARGET}, chosen for this CPU).")
@one_line_errors
def fuse_command(input_path, output, report_path, patterns, no_verify, force, in_place, lower_target) -> None:
    """Rewrite every MoE block of INPUT (IR .xml, .onnx or optimum-intel folder) into FusedExperts."""
    if not input_path.is_dir() and output.suffix != ".xml":
        raise InputError(f"{output}: OUTPUT for a model file must be an IR .xml path")
    check_output(input_path, output, force=force, in_place=in_place)
    check_space(input_path, output)  # scratch (stacked weights) and output: refuse now, not after the work
    model = load(input_path)
    # a bar (and the proof's cost up front) on a terminal only: piped or logged, click would print its label
    # after the table
    with click.progressbar(length=1, label="fusing", file=sys.stderr if sys.stderr.isatty() else io.StringIO()) as bar:

        def progress(done: int, total: int) -> None:
            if done == 0 and total and not no_verify and sys.stderr.isatty():
                click.echo(
                    f"proving {total} MoE block{'s' * (total != 1)} before rewriting: each runs beside its "
                    "replacement in two worker processes, on weights mapped from the model's files (memory: "
                    "one layer at most, measured 0.5-2 GB at real layer shapes; time: about 5x reading and "
                    "saving the model for f16 weights, 10-15x for int4)",
                    err=True,
                )
            bar.length = max(total, 1)
            bar.update(done - bar.pos)

        report = fuse(model, patterns=patterns, verify=not no_verify, progress=progress)
    if lower_target:
        click.echo(lower(model, lower_target).summary())
    save(model, input_path, output)
    _print(report, report_path)
    fused = len(report.fused)
    click.echo(
        f"{fused} block{'s' * (fused != 1)} fused, {len(report.skipped)} skipped -> {output}"
        if report.blocks
        else f"no MoE blocks found in {input_path}; wrote it unchanged -> {output}"
    )


@main.command("lower")
@click.argument("input_path", metavar="FUSED", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Lowered model (.xml or folder).")
@click.option("--target", type=click.Choice(TARGETS), default=DEFAULT_TARGET, show_default=True,
              help="auto: chosen for this CPU (cpu with AMX and bf16; else hybrid, per-expert for int8/int4 "
                   "weights; recorded in the model's rt_info); hybrid: per-expert prompts, GatherMatmul decode; "
                   "cpu: GatherMatmul-friendly tiled form, grouped where it would not fire.")
@click.option("--precision", type=click.Choice(["bf16", "f32"]), default=None,
              help="The inference precision the model will run at (default: this CPU's); hybrid stores its "
                   "decode weights in it. Give f32 to verify the result with `check` at f32.")
@click.option("--force", is_flag=True, help="Overwrite an existing OUTPUT.")
@click.option("--in-place", is_flag=True, help="Allow OUTPUT to be FUSED.")
@one_line_errors
def lower_command(input_path, output, target, precision, force, in_place) -> None:
    """Replace every FusedExperts of FUSED by native OpenVINO ops: the result runs without moe-fusion."""
    if not input_path.is_dir() and output.suffix != ".xml":
        raise InputError(f"{output}: OUTPUT for a model file must be an IR .xml path")
    check_output(input_path, output, force=force, in_place=in_place)
    check_space(input_path, output, scratch=False)
    model = load(input_path)
    cpu = CpuFacts.detect()
    report = lower(model, target, cpu=replace(cpu, precision=precision) if precision else cpu)
    save(model, input_path, output)
    click.echo(f"{report.summary()} -> {output}")


@main.command("convert")
@click.argument("hf_dir", metavar="HF_MODEL_DIR", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--weight-format", type=click.Choice(WEIGHT_FORMATS), default="fp32", show_default=True,
              help="Weights of the written model (int8/int4: NNCF; int4-sym: symmetric int4, as optimum-cli's "
                   "--sym, faster decode on CPUs without AMX).")
@click.option("--lower", "lower_target", type=click.Choice(TARGETS), default=DEFAULT_TARGET, show_default=True,
              help="Lower FusedExperts to native ops for TARGET.")
@click.option("--no-lower", is_flag=True, help="Keep FusedExperts (the folder then needs moe-fusion to run).")
@click.option("--force", is_flag=True, help="Overwrite an existing OUTPUT.")
@one_line_errors
def convert_command(hf_dir, output, weight_format, lower_target, no_lower, force) -> None:
    """Convert a Hugging Face MoE model folder into a stateful, fused, proven folder openvino-genai runs."""
    from moe_fusion.convert import convert
    from moe_fusion.convert.pipeline import ConversionError

    try:
        report = convert(hf_dir, output, weight_format=weight_format, lower=None if no_lower else lower_target,
                         force=force, progress=lambda message: click.echo(message, err=True))
    except ConversionError as error:
        click.echo(f"moe-fusion: {error}", err=True)
        sys.exit(NOT_EQUIVALENT)
    if report.fuse is not None and report.fuse.blocks:
        click.echo(report.fuse.table())
    for note in report.compression:
        click.echo(note)
    click.echo(report.summary())


@main.command("inspect")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@patterns_option
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@click.option("--explain", is_flag=True, help="For each near miss: the first failing condition, the node where "
              "matching stopped, and how far each family's pattern got from its router.")
@one_line_errors
def inspect_command(input_path, patterns, as_json, explain) -> None:
    """List the MoE blocks INPUT has, which would fuse and why the others would not. Writes nothing."""
    if explain:
        report, explanations = explained(load(input_path), patterns)
        if as_json:
            click.echo(explanation_json(report, explanations))
        elif report.blocks:
            click.echo(explanation_text(report, explanations))
        else:
            click.echo(f"no MoE blocks found in {input_path}: no router-like TopK either, nothing to explain")
        return
    report = fuse(load(input_path), patterns=patterns, dry_run=True)
    if as_json:
        click.echo(report.to_json())
    elif report.blocks:
        click.echo(report.table())
        _warn_broken(report)
    else:
        click.echo(f"no MoE blocks found in {input_path}")


@main.command("check")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("fused", type=click.Path(path_type=Path))
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option("--tokens", default="1,16,64", show_default=True, help="Prompt lengths, comma-separated.")
@click.option("--steps", default=3, show_default=True, help="Decode steps after each prefill (stateful models).")
@click.option("--seed", default=0, show_default=True, help="Seed of the generated inputs.")
@click.option("--atol", type=float, help="Absolute tolerance (default: by the original's weight type).")
@click.option("--rtol", type=float, help="Tolerance relative to each output's scale (default: by weight type).")
@click.option("--device", default="CPU", show_default=True, help="OpenVINO device running both models.")
@click.option("--precision", default="f32", show_default=True, help="INFERENCE_PRECISION_HINT: f32, f16 or bf16.")
@click.option("--mode", type=click.Choice(MODES), default="whole", show_default=True,
              help="whole: each whole model, one after the other; layers: segment by segment at the MoE blocks, "
              "one layer in memory at a time (for models larger than memory).")
@click.option("--fused-experts", type=click.Choice(FUSED_EXPERTS_MODES), default="auto", show_default=True,
              help="run FusedExperts as it is, or lower a copy to native per-expert ops first; auto lowers those "
              "with int8/int4 weights.")
@click.option("--in-process", is_flag=True, help="Run both models in this process (no child process per side).")
@click.option("-v", "--verbose", is_flag=True, help="Print every output at every step.")
@one_line_errors
def check_command(original, fused, json_path, tokens, steps, seed, atol, rtol, device, precision, mode, fused_experts,
                  in_process, verbose) -> None:
    """Run ORIGINAL, then FUSED, on the same inputs; exit 0 if equivalent, 1 if not, 2 on bad input."""
    try:
        counts = [int(t) for t in tokens.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--tokens {tokens!r}: expected comma-separated token counts, e.g. 1,16,64") from None
    report = check(
        original, fused, tokens=counts, steps=steps, seed=seed, atol=atol, rtol=rtol, device=device,
        precision=precision, mode=mode, fused_experts=fused_experts, isolate=not in_process,
        progress=sys.stderr.isatty(),
    )
    if json_path:
        json_path.write_text(report.to_json())
    if verbose:
        click.echo(report.table())
    if not report.equivalent:
        click.echo(f"moe-fusion: NOT equivalent: {report.reason}", err=True)
        sys.exit(NOT_EQUIVALENT)
    click.echo(report.summary())


def _print(report, report_path: Path | None) -> None:
    if report.blocks:
        click.echo(report.table())
    if report_path:
        report_path.write_text(report.to_json())
    _warn_broken(report)


def _warn_broken(report) -> None:
    broken = sum(1 for b in report.blocks if b.broken_export)
    if broken:
        click.echo(f"moe-fusion: {broken} block{'s' * (broken != 1)} of this model come from a broken export (its "
                   "outputs are wrong, not merely unfused): see the reasons above and docs/converting.md", err=True)
