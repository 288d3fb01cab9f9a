"""`convert`: Hugging Face folder -> trace -> stateful -> proof -> weights -> fuse -> lower -> folder.

Each stage is its own module; this one orders them and turns their failures into what the user sees:
InputError (exit 2, one line) for input that cannot be converted, ConversionError (exit 1, one line) when the
converted model is not proven equal to the torch model, so nothing is written.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moe_fusion.io import InputError, first_line

Progress = Callable[[str], None]


class ConversionError(RuntimeError):
    """The converted model differs from the torch model (or a stage produced a model that cannot run)."""


@dataclass
class ConvertReport:
    """What `convert` did; `fuse` is the fuse report (moe_fusion.report.Report)."""

    out: str
    architecture: str
    weight_format: str
    lower: str | None
    proof_worst: float = 0.0  # largest logit difference / scale, OpenVINO vs torch at f32
    proof_cases: list[str] = field(default_factory=list)
    states: int = 0
    compression: list[str] = field(default_factory=list)  # what the weight format did, and what it could not
    lowered: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    fuse: object = None

    def to_json(self) -> str:
        """The fuse report's JSON (as `fuse --report` writes it) with a `conversion` section added."""
        data = json.loads(self.fuse.to_json()) if self.fuse is not None else {"blocks": []}
        conversion = {k: v for k, v in asdict(self).items() if k != "fuse"}
        data["conversion"] = conversion
        return json.dumps(data, indent=2)

    def summary(self) -> str:
        fused = len(self.fuse.fused) if self.fuse else 0
        skipped = len(self.fuse.skipped) if self.fuse else 0
        return (f"{self.architecture}: converted (proof: logits within {self.proof_worst:.1e} of their scale), "
                f"{self.states} states, {fused} MoE blocks fused, {skipped} skipped, weights {self.weight_format}"
                f"{', lowered ' + self.lower if self.lower else ''} -> {self.out}")


def convert(hf_dir: str | Path, out: str | Path, *, weight_format: str = "fp32", lower: str | None = "auto",
            force: bool = False, progress: Progress | None = None) -> ConvertReport:
    """Convert the Hugging Face MoE folder `hf_dir` into the openvino-genai folder `out`.

    `weight_format`: fp32 | fp16 | int8 | int4 | int4-sym (NNCF for the last three; see weights.py). `lower`: a
    lowering target (moe_fusion.lower.TARGETS; "auto" by default) or None to keep FusedExperts (needs moe-fusion to
    run).
    Raises InputError on input that cannot be converted and ConversionError when the converted model is not
    proven equal to the torch model; OUT is then not written."""
    from moe_fusion.convert import WEIGHT_FORMATS

    say = progress or (lambda _message: None)
    source, out = Path(hf_dir), Path(out)
    if weight_format not in WEIGHT_FORMATS:
        raise InputError(f"--weight-format {weight_format}: expected one of {', '.join(WEIGHT_FORMATS)}")
    from moe_fusion.convert.source import check_source

    config = check_source(source)
    from moe_fusion.convert.folder import check_out

    check_out(source, out, force=force)
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as error:
        raise InputError(f'convert needs torch and transformers ({error.name} is missing): '
                         'pip install "moe-fusion[convert]"') from None
    import openvino as ov

    from moe_fusion.convert import folder, proof, stateful, trace
    from moe_fusion.convert import source as src
    from moe_fusion.io import read_model

    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 3)
        clock = now

    say("loading the model (f32)")
    model = src.load(source, config)
    report = ConvertReport(str(out), type(model).__name__, weight_format, lower, seconds=seconds)
    tokenizers = folder.tokenizer_models(source)
    lap("load")
    say("running the torch model on the proof's inputs (f32)")
    try:
        reference = proof.torch_reference(model)
    except Exception as error:  # transformers' own forward fails: nothing to convert, said in one line
        raise InputError(f"{source}: {model.config.model_type} does not run in transformers "
                         f"{transformers.__version__}: {type(error).__name__}: {_line(error)}") from None
    generation_config = getattr(model, "generation_config", None)
    lap("reference")
    say("tracing (batched_mm experts, KV cache as tensors)")
    try:
        ov_model, layout = trace.trace(model)
    except Exception as error:  # the trace's failure, said in one line, is the answer
        raise InputError(f"{source}: {model.config.model_type} does not trace: {type(error).__name__}: "
                         f"{_line(error)}") from None
    stateful.make_stateful(ov_model, layout.input_names(), layout.output_names())
    report.states = len(ov_model.get_sinks())
    # The traced model shares its weights with torch's: saved beside OUT and read back memory-mapped, neither
    # the torch model nor a second copy of its weights is held from here on. The proof compiles it in a
    # process of its own (proof.prove_saved), whose memory is returned when it ends.
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.traced.", dir=out.resolve().parent))
    try:
        ov.save_model(ov_model, staging / "traced.xml", compress_to_fp16=False)
        del model, ov_model
        gc.collect()
        lap("trace")
        say("proving the conversion against torch (f32)")
        try:
            verdict = proof.prove_saved(reference, str(staging / "traced.xml"))
        except RuntimeError as error:  # OpenVINO cannot compile or run the traced model (WorkerCrash included)
            raise ConversionError(f"the converted model does not run in OpenVINO: {first_line(error)}; "
                                  "nothing written") from None
        report.proof_worst, report.proof_cases = verdict.worst, verdict.cases
        if not verdict.ok:
            raise ConversionError(f"the converted model differs from torch: {verdict.reason}; nothing written")
        lap("proof")
        ov_model = read_model(staging / "traced.xml")
        _finish(ov_model, source, out, report, tokenizers, generation_config, lap, say)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.seconds = seconds
    return report


def _finish(ov_model, source: Path, out: Path, report: ConvertReport, tokenizers, generation_config, lap,
            say: Progress) -> None:
    """Weights, fuse, lower, write."""
    from moe_fusion.convert import folder, weights
    from moe_fusion.fusing import fuse
    from moe_fusion.lower import lower as lower_model

    weight_format, lower = report.weight_format, report.lower
    say(f"fusing MoE blocks and compressing weights ({weight_format})")
    fuse_report, notes = weights.fuse_and_compress(ov_model, weight_format, fuse)
    report.fuse, report.compression = fuse_report, notes
    lap("fuse")
    if lower:
        say(f"lowering FusedExperts ({lower})")
        lowered = lower_model(ov_model, lower)
        report.lowered = {k: str(v) for k, v in lowered.lowered.items()}
        lap("lower")
    say(f"writing {out}")
    folder.write(ov_model, source, out, report_json=report.to_json(), generation_config=generation_config,
                 tokenizers=tokenizers)
    lap("write")


def _line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "conversion rule" in ln or "Error" in ln] or lines[:1]
    return (useful[0] if useful else type(error).__name__)[:300]
