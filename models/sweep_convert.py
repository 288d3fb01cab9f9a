"""Every MoE `*ForCausalLM` of the installed transformers through `moe-fusion convert`, one tiny random model each.

    python models/sweep_convert.py [--only mixtral,gpt_oss] [--jsonl out.jsonl] [--markdown table.md]

Per architecture (found in transformers' modeling code: a `*ForCausalLM` whose experts go through
`use_experts_implementation`, or that defines Experts/SparseMoe/MoE/Router modules), in a child process of its
own (a crash or a hang costs that row only):

1. a tiny config from the config class's defaults (hidden 64, 4 heads / 2 KV heads, 4 experts top-2, vocab
   256, one layer of each kind in `layer_types`, a sliding window of 4 where the architecture has one, so the
   8-token prompt crosses it), random weights with routers re-drawn at std 0.5 (random init leaves them
   nearly uniform), saved as a Hugging Face folder;
2. transformers' greedy tokens (8-token prompt, 6 new tokens);
3. `moe_fusion.convert.convert(folder, out)` (f32, lowered `auto`): converts? stateful (states)? MoE blocks
   fused / MoE layers;
4. openvino-genai `LLMPipeline(out, "CPU")` at f32, with the default PagedAttention backend and with
   `ATTENTION_BACKEND="SDPA"`: the same greedy tokens as transformers?

Token equality is exact: the conversion's proof already bounds the logits (<= its tolerance of their scale);
a differing token would need a near-tie in these random models, or a real error (a dropped mask moves logits
by > 1e-1).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPT, NEW_TOKENS, NO_TOKEN = 8, 6, 1 << 30

SHRINK = {  # config attribute -> tiny value, applied where the attribute exists and is an int
    "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 128, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 32, "vocab_size": 256, "num_local_experts": 4, "num_experts": 4,
    "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2, "moe_k": 2, "moe_topk": 2,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "n_group": 2, "topk_group": 1, "max_position_embeddings": 512, "first_k_dense_replace": 0,
    "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "mamba_n_heads": 4, "mamba_head_dim": 16, "mamba_d_state": 8,
    "ssm_state_size": 8, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4, "sliding_window": 4,
    "attention_chunk_size": 4,
}


def moe_architectures() -> list[tuple[str, str]]:
    """(model_type folder, `*ForCausalLM` class) of every MoE causal LM in the installed transformers."""
    import transformers

    found = []
    for folder in sorted((pathlib.Path(transformers.__file__).parent / "models").iterdir()):
        source = folder / f"modeling_{folder.name}.py"
        if not source.is_file():
            continue
        text = source.read_text()
        causal = re.findall(r"class (\w+ForCausalLM)\(", text)
        if causal and ("use_experts_implementation" in text
                       or re.search(r"class \w+(Experts|SparseMoe\w*|MoE\w*|Router\w*)\(", text)):
            found.append((folder.name, causal[0]))
    return found


def tiny_config(module: str, class_name: str):
    """The class and a tiny config: defaults shrunk; one layer of each kind; token ids inside the vocabulary."""
    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), class_name)
    config = cls.config_class()
    layers = getattr(config, "num_hidden_layers", 2)
    for key, value in SHRINK.items():
        current = getattr(config, key, None)
        if isinstance(current, int) and not isinstance(current, bool):
            setattr(config, key, value)
    keep: list[int] = []
    for key, value in vars(config).items():  # the first layer of each kind in the longest per-layer kinds list
        if key.endswith("types") and isinstance(value, list) and len(value) == layers:
            firsts = sorted({kind: i for i, kind in reversed(list(enumerate(value)))}.values())
            keep = firsts if len(firsts) > len(keep) else keep
    keep = keep if len(keep) >= 2 else [keep[0], keep[0] + 1] if keep else [0, 1]
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == layers:
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)
    config.tie_word_embeddings = False
    for key in ("head_dim", "num_experts_per_tok", "n_routed_experts", "moe_intermediate_size"):
        if key in vars(config) and getattr(config, key) is None:  # None defaults some configs derive later
            setattr(config, key, SHRINK[key])
    if getattr(config, "kv_lora_rank", None):  # MLA: a key per query head; RoPE on the rotary part of the head
        config.num_key_value_heads = config.num_attention_heads
        config.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        partial = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
        config.head_dim = int(config.qk_rope_head_dim / partial)  # Mistral 4 ropes half of head_dim
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(config, key, None), int) and getattr(config, key) >= config.vocab_size:
            setattr(config, key, 0)
    return cls, config


def make_folder(module: str, class_name: str, folder: pathlib.Path) -> list[int]:
    """Save the tiny random model to `folder`; transformers' greedy tokens for the sweep's prompt."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    cls, config = tiny_config(module, class_name)
    model = cls(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "router" in name or "gate.weight" in name:
                parameter.normal_(0, 0.5)
    model.save_pretrained(folder)
    # the tokens of the model as saved and loaded again: what convert sees (buffers that are not saved, or a
    # config that loads differently, show up here and not as a conversion error)
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(prompt_ids(config.vocab_size))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)  # no stop token: genai is told to ignore eos
    tokens = out[0, PROMPT:].tolist()
    (folder / "sweep_tokens.json").write_text(json.dumps({"prompt": np.asarray(ids).tolist(), "tokens": tokens}))
    return tokens


def prompt_ids(vocab: int) -> list[list[int]]:
    import numpy as np

    return np.random.default_rng(0).integers(3, vocab, (1, PROMPT)).tolist()


def genai_tokens(folder: pathlib.Path, prompt: list[list[int]], backend: str | None) -> list[int]:
    import numpy as np
    import openvino as ov
    import openvino_genai

    options = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
    if backend:
        options["ATTENTION_BACKEND"] = backend
    pipe = openvino_genai.LLMPipeline(str(folder), "CPU", **options)
    config = pipe.get_generation_config()
    config.max_new_tokens, config.do_sample, config.ignore_eos = NEW_TOKENS, False, True
    config.eos_token_id, config.stop_token_ids = NO_TOKEN, {NO_TOKEN}
    ids = np.array(prompt, dtype=np.int64)
    result = pipe.generate(openvino_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids))), config)
    return list(result.tokens[0])


def moe_layers(folder: pathlib.Path) -> int:
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    return int(text.get("num_hidden_layers", 0))


def one(module: str, class_name: str) -> dict:
    """One architecture's row (run in a child process)."""
    from moe_fusion.convert import convert
    from moe_fusion.io import InputError

    row: dict = {"arch": module, "class": class_name}
    with tempfile.TemporaryDirectory() as tmp:
        hf, out = pathlib.Path(tmp) / "hf", pathlib.Path(tmp) / "out"
        try:
            want = make_folder(module, class_name, hf)
        except Exception as error:
            # no tiny model: convert may still refuse the architecture from its config alone
            row["converts"] = f"no tiny model: {type(error).__name__}: {_line(error)}"
            try:
                tiny_config(module, class_name)[1].save_pretrained(hf)
                convert(hf, out)
            except InputError as refusal:
                if "weights do not load" not in str(refusal):
                    row["converts"] = f"refused: {_line(refusal).split(': ', 2)[-1]}"
            except Exception:
                pass
            return row
        started = time.perf_counter()
        try:
            report = convert(hf, out)
        except InputError as error:
            row["converts"] = f"refused: {_line(error).split(': ', 2)[-1]}"
            return row
        except Exception as error:
            row["converts"] = f"fails: {type(error).__name__}: {_line(error)}"
            return row
        row["seconds"] = round(time.perf_counter() - started, 1)
        row["converts"] = "yes"
        row["states"] = report.states
        row["fused"] = f"{len(report.fuse.fused)}/{len(report.fuse.fused) + len(report.fuse.skipped)}"
        row["skipped"] = sorted({b.reason for b in report.fuse.skipped})
        prompt = json.loads((hf / "sweep_tokens.json").read_text())["prompt"]
        for column, backend in (("genai", None), ("genai_sdpa", "SDPA")):
            try:
                got = genai_tokens(out, prompt, backend)
                row[column] = "equal" if got == want else f"differ: {got} vs {want}"
            except Exception as error:
                row[column] = f"fails: {type(error).__name__}: {_line(error)}"
    return row


def _line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[0] if lines else type(error).__name__)[:240]


def markdown(rows: list[dict]) -> str:
    head = ("| architecture | class | converts | stateful (states) | MoE blocks fused | genai tokens equal "
            "(PagedAttention) | genai tokens equal (SDPA) |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        converts = r.get("converts", "?")
        ok = converts == "yes"
        lines.append(f"| {r['arch']} | {r.get('class', '')} | {converts.replace('|', '/')} | "
                     f"{'yes (' + str(r['states']) + ')' if ok and r.get('states') else ('no' if ok else '-')} | "
                     f"{r.get('fused', '-')} | {r.get('genai', '-')} | {r.get('genai_sdpa', '-')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model_type folders")
    parser.add_argument("--jsonl", default="sweep_convert.jsonl")
    parser.add_argument("--markdown")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--table", nargs="+", metavar="JSONL",
                        help="only print the markdown table of these runs (a later row of an architecture wins)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        latest: dict[str, dict] = {}
        for path in args.table:
            for line in pathlib.Path(path).read_text().splitlines():
                row = json.loads(line)
                latest[row["arch"]] = row
        print(markdown([latest[k] for k in sorted(latest)]))
        return 0
    if args.child:
        print("ROW " + json.dumps(one(*args.child)), flush=True)
        return 0
    import transformers

    wanted = set(args.only.split(",")) if args.only else None
    rows = []
    with open(args.jsonl, "a") as sink:
        for module, class_name in moe_architectures():
            if wanted and module not in wanted:
                continue
            try:
                done = subprocess.run([sys.executable, __file__, "--child", module, class_name], cwd=ROOT,
                                      capture_output=True, text=True, timeout=args.timeout)
                found = [ln[4:] for ln in done.stdout.splitlines() if ln.startswith("ROW ")]
                last = (done.stderr.strip().splitlines() or [""])[-1][:200]
                row = json.loads(found[-1]) if found else {
                    "arch": module, "class": class_name, "converts": f"crashed (exit {done.returncode}): {last}"}
            except subprocess.TimeoutExpired:
                row = {"arch": module, "class": class_name, "converts": f"timed out after {args.timeout} s"}
            row["transformers"] = transformers.__version__
            rows.append(row)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(json.dumps(row)[:300], flush=True)
    if args.markdown:
        pathlib.Path(args.markdown).write_text(markdown(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
