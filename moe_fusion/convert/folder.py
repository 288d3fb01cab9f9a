"""The deployable folder: model, tokenizer models, configs and the fuse report, written atomically.

Everything but the model is gathered in a small temporary folder first; moe_fusion.io.save then writes the
model beside copies of those files into a temporary next to OUT and renames it into place, so an interrupted
run leaves either no OUT or the old one, never a partial folder.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import openvino as ov

from moe_fusion.io import InputError, first_line, save

# Tokenizer files transformers reads back (copied as they are when present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")
CONFIG_FILES = ("config.json", "generation_config.json")
REPORT_FILE = "moe_fusion_report.json"


def check_out(source: Path, out: Path, *, force: bool) -> None:
    """Refuse OUT where it would replace or sit inside the source folder, or exists without `force`."""
    source, target = source.resolve(), out.resolve()
    if target == source or target in source.parents:
        raise InputError(f"{out}: output would replace the input folder {source}")
    if source in target.parents:
        raise InputError(f"{out}: output lies inside the input folder {source}; choose a path outside it")
    if target.exists() and not force:
        raise InputError(f"{out}: already exists; pass --force to overwrite it")
    if target.exists() and not target.is_dir():
        raise InputError(f"{out}: exists and is not a folder")


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def tokenizer_models(folder: Path) -> tuple[ov.Model, ov.Model] | None:
    """openvino-tokenizers' tokenizer and detokenizer of the folder's tokenizer, or None when it has none."""
    if not has_tokenizer(folder):
        return None
    try:
        from openvino_tokenizers import convert_tokenizer
        from transformers import AutoTokenizer
    except ImportError as error:
        raise InputError(f"converting the tokenizer needs {error.name}: pip install openvino-tokenizers") from None
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        tokenizer, detokenizer = convert_tokenizer(hf_tokenizer, with_detokenizer=True)
    except Exception as error:  # one line for the user, whatever the tokenizer library raised
        raise InputError(f"{folder}: the tokenizer does not convert: {type(error).__name__}: "
                         f"{first_line(error)}") from None
    return tokenizer, detokenizer


def write(model: ov.Model, source: Path, out: Path, *, report_json: str, generation_config: Any = None,
          tokenizers: tuple[ov.Model, ov.Model] | None = None) -> Path:
    """Write the folder OUT (atomically) from the converted `model` and the source folder's small files."""
    with tempfile.TemporaryDirectory(prefix="moe-fusion-convert-") as scratch:
        extra = Path(scratch)
        for name in CONFIG_FILES + TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, extra / name)
        if not (extra / "generation_config.json").exists() and generation_config is not None:
            generation_config.save_pretrained(extra)
        if tokenizers is not None:
            ov.save_model(tokenizers[0], extra / "openvino_tokenizer.xml")
            ov.save_model(tokenizers[1], extra / "openvino_detokenizer.xml")
        (extra / REPORT_FILE).write_text(report_json)
        return save(model, extra, out)
