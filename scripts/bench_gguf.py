"""GGUF files side by side in llama.cpp: size, bits per linear weight, llama-perplexity, llama-bench.

    python scripts/bench_gguf.py --llama-bin /work/exp/llamacpp/build/bin --work /work/exp/llamacpp/work \
        --llama-src /work/exp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp \
        --presets Q3_K_S,Q3_K_M,Q4_K_S,Q4_K_M,Q8_0 [--ours a.gguf,b.gguf] --repeats 3 [--append]

Installs nothing. Building llama.cpp (CPU; its sources ship in the llama-cpp-python sdist; one job, ~15 min):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DGGML_BMI2=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
    nice cmake --build build -j 1 --target llama-quantize llama-imatrix llama-perplexity llama-bench

(AVX2 without -march=native, so the same binaries run on the AVX2-only and the AVX-512 hosts; static.)

Procedure; every product is cached in --work and reused when present (written to a temporary name first):
1. F32 GGUF: `convert_hf_to_gguf.py MODEL --outtype f32` from --llama-src, run by --convert-python (it
   imports `sentencepiece` even for a BPE tokenizer without tokenizer.model: give it a python that has it).
2. Texts, from hawqtool.data's split of `wiki` by token position with the model's tokenizer: calib.txt =
   the decoded calibration slice (first 60% of the tokens), eval.txt = the decoded 40 × 512 tokens that
   hawqtool's evaluation scores (the first 40 windows of the last 20%; they re-tokenize to the same ids).
3. `llama-imatrix -f calib.txt -c 512 --chunks N` (the first N × 512 calibration tokens), then
   `llama-quantize --imatrix` for every preset (Q8_0/F16/BF16 without imatrix).
4. For every file (F32, presets, --ours): tensor types and sizes read with gguf.GGUFReader. Bits per linear
   weight = 8 × bytes of the 2-D blk.*.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}.weight
   tensors / their parameters (token_embd excluded); file bits/param = 8 × file size (metadata and
   tokenizer included) / all parameters. `llama-perplexity -f eval.txt -c 512 -b 512` (it scores only the
   second half of each 512-token chunk: 255 predictions × 40 chunks; ± is its standard error), once per file
   (cached in ppl.json by path, size, mtime). `llama-bench -p 128 -n 32 -r 5` run --repeats times,
   interleaved (A, B, C, A, B, C, ...); the table gives the median (range) of the runs' mean tok/s.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import cpu_name, load_now, record  # noqa: E402

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
BUILD = ("cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF "
         "-DLLAMA_OPENSSL=OFF && cmake --build build -j 1 --target " + " ".join(TOOLS) + " (see this script's docstring)")
LINEAR = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
PLAIN = {"Q8_0", "F16", "BF16", "F32"}  # quantized without an importance matrix
CTX = 512
EVAL_WINDOWS = 40


def gguf_stats(path: Path) -> dict:
    """Sizes and types of a GGUF file's tensors: linear bytes/params, all params, file bytes, type counts."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    lin_bytes = lin_params = params = 0
    types: Counter[str] = Counter()
    embd = "-"
    for t in r.tensors:
        params += int(t.n_elements)
        if LINEAR.match(t.name) and len(t.shape) == 2:
            lin_bytes += int(t.n_bytes)
            lin_params += int(t.n_elements)
            types[t.tensor_type.name] += 1
        elif t.name == "token_embd.weight":
            embd = t.tensor_type.name
    return dict(linear_bytes=lin_bytes, linear_params=lin_params, params=params, file_bytes=path.stat().st_size,
                linear_types=dict(types), embd_type=embd)


def bits_per_linear_weight(stats: dict) -> float:
    """8 × bytes of the linear weight tensors / their parameter count."""
    return 8 * stats["linear_bytes"] / stats["linear_params"]


def file_bits_per_param(stats: dict) -> float:
    """8 × the whole file's bytes / every parameter the file stores."""
    return 8 * stats["file_bytes"] / stats["params"]


def types_str(stats: dict) -> str:
    """Linear tensors' types by count, most common first, then the embedding's type."""
    lin = " ".join(f"{k}×{v}" for k, v in sorted(stats["linear_types"].items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{lin}; embd {stats['embd_type']}"


def parse_ppl(log: str) -> tuple[float, float, int]:
    """(ppl, ±, chunks) from llama-perplexity's output."""
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    c = re.search(r"calculating perplexity over (\d+) chunks", log)
    if not m or not c:
        raise RuntimeError("llama-perplexity printed no final estimate:\n" + log[-2000:])
    return float(m.group(1)), float(m.group(2)), int(c.group(1))


def parse_bench(out: str) -> tuple[float, float]:
    """(prompt tok/s, generation tok/s) from `llama-bench -o json`."""
    pp = tg = float("nan")
    for row in json.loads(out):
        if row["n_prompt"] > 0 and row["n_gen"] == 0:
            pp = float(row["avg_ts"])
        elif row["n_gen"] > 0 and row["n_prompt"] == 0:
            tg = float(row["avg_ts"])
    return pp, tg


def find_tools(bin_dir: Path) -> dict[str, Path]:
    """The llama.cpp tools in bin_dir; a missing one exits 1 with one line naming it and the build."""
    found = {}
    for name in TOOLS:
        p = bin_dir / name
        if not (p.is_file() and os.access(p, os.X_OK)):
            print(f"error: {name} not found in {bin_dir}; build it: {BUILD}", file=sys.stderr)
            sys.exit(1)
        found[name] = p
    return found


def run(cmd: list[str], log: Path | None = None) -> str:
    """Run a command, return stdout+stderr; a failure raises with the tail of its output."""
    t0 = time.perf_counter()
    print("$ " + " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    out = p.stdout + p.stderr
    if log is not None:
        log.write_text(out)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {p.returncode}:\n{out[-3000:]}")
    print(f"  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return out


def write_texts(work: Path, model_dir: Path) -> tuple[Path, Path]:
    """calib.txt (decoded calibration slice) and eval.txt (decoded 40 × 512 evaluation tokens)."""
    calib, ev = work / "calib.txt", work / "eval.txt"
    if calib.exists() and ev.exists():
        return calib, ev
    from transformers import AutoTokenizer

    import hawqtool  # noqa: F401  (declares torchvision's missing ops before transformers imports it)
    from hawqtool.data import CALIB_FRACTION, eval_windows, token_slice

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    for path, ids in ((calib, token_slice(tok, "wiki", CALIB_FRACTION).tokens.tolist()),
                      (ev, eval_windows(tok, "wiki", CTX, EVAL_WINDOWS).reshape(-1).tolist())):
        text = tok.decode(ids)
        if tok(text, add_special_tokens=False)["input_ids"] != ids:
            print(f"warning: {path.name} does not re-tokenize to the same ids", file=sys.stderr)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return calib, ev


def ensure_f32(args: argparse.Namespace, model_dir: Path) -> Path:
    """The model as an F32 GGUF (converted once)."""
    out = args.work / "model-f32.gguf"
    if out.exists():
        return out
    if args.llama_src is None or not (args.llama_src / "convert_hf_to_gguf.py").is_file():
        print(f"error: {out} is missing; pass --llama-src (the llama.cpp source folder with convert_hf_to_gguf.py)",
              file=sys.stderr)
        sys.exit(1)
    py = args.convert_python
    if subprocess.run([py, "-c", "import sentencepiece, transformers, torch"], capture_output=True).returncode:
        print(f"error: {py} cannot import sentencepiece/transformers/torch, which convert_hf_to_gguf.py needs; "
              f"pass --convert-python with one that can (e.g. a venv with `pip install sentencepiece`)", file=sys.stderr)
        sys.exit(1)
    tmp = out.with_suffix(".tmp")
    run([py, args.llama_src / "convert_hf_to_gguf.py", model_dir, "--outtype", "f32", "--outfile", tmp],
        args.work / "convert.log")
    os.replace(tmp, out)
    return out


def ensure_presets(args: argparse.Namespace, tools: dict[str, Path], f32: Path, calib: Path) -> list[Path]:
    """The imatrix (once) and one GGUF per preset."""
    imat = args.work / f"imatrix-c{CTX}-x{args.imatrix_chunks}.gguf"
    files = []
    for preset in args.presets:
        use_imat = preset.upper() not in PLAIN
        out = args.work / (f"model-{preset}-imat{args.imatrix_chunks}.gguf" if use_imat else f"model-{preset}.gguf")
        if not out.exists():
            if use_imat and not imat.exists():
                tmp = imat.with_suffix(".tmp.gguf")
                run([tools["llama-imatrix"], "-m", f32, "-f", calib, "-c", CTX, "--chunks", args.imatrix_chunks,
                     "-t", args.ppl_threads, "-o", tmp], args.work / "imatrix.log")
                os.replace(tmp, imat)
            tmp = out.with_suffix(".tmp.gguf")
            run([tools["llama-quantize"], *(["--imatrix", imat] if use_imat else []), f32, tmp, preset,
                 args.ppl_threads], args.work / f"quantize-{preset}.log")
            os.replace(tmp, out)
        files.append(out)
    return files


def perplexity(args: argparse.Namespace, tools: dict[str, Path], path: Path, ev: Path) -> tuple[float, float, int]:
    """llama-perplexity on eval.txt, cached in WORK/ppl.json by the file's path, size and mtime."""
    cache_file = args.work / "ppl.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|c{CTX}"
    if key not in cache:
        out = run([tools["llama-perplexity"], "-m", path, "-f", ev, "-c", CTX, "-b", CTX, "-t", args.ppl_threads],
                  args.work / f"ppl-{path.stem}.log")
        cache[key] = list(parse_ppl(out))
        cache_file.write_text(json.dumps(cache, indent=1))
    ppl, pm, chunks = cache[key]
    return ppl, pm, int(chunks)


def bench(args: argparse.Namespace, tools: dict[str, Path], files: list[Path]) -> dict[Path, tuple[list, list]]:
    """pp and tg tok/s of --repeats llama-bench runs per file, interleaved across the files."""
    runs: dict[Path, list[tuple[float, float]]] = {f: [] for f in files}
    for _ in range(args.repeats):
        for f in files:
            out = subprocess.run([str(tools["llama-bench"]), "-m", str(f), "-p", "128", "-n", "32", "-r", "5",
                                  "-t", str(args.threads), "-o", "json"], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"llama-bench failed on {f}:\n{out.stderr[-2000:]}")
            runs[f].append(parse_bench(out.stdout))
    return {f: ([r[0] for r in rs], [r[1] for r in rs]) for f, rs in runs.items()}


def speed_str(values: list[float]) -> str:
    """Median of the runs, with their range when there are several."""
    med = statistics.median(values)
    return f"{med:.1f}" if len(values) < 2 else f"{med:.1f} ({min(values):.1f}–{max(values):.1f})"


def machine_line(tools: dict[str, Path]) -> str:
    """CPU, its AVX flags, llama.cpp's build and the load."""
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = next((ln.split(":", 1)[1].split() for ln in flags.splitlines() if ln.startswith("Flags")), [])
    avx = " ".join(f for f in flags if f.startswith(("avx", "fma", "f16c")))
    ver = subprocess.run([str(tools["llama-perplexity"]), "--version"], capture_output=True, text=True)
    ver_s = next((ln.strip() for ln in (ver.stdout + ver.stderr).splitlines() if ln.startswith("version")), "?")
    return f"machine: {cpu_name()}, {os.cpu_count()} CPUs, flags {avx}; llama.cpp {ver_s}; load: {load_now()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bin", type=Path, required=True, help="folder with llama-quantize, -imatrix, ...")
    ap.add_argument("--work", type=Path, required=True, help="cache: F32 GGUF, texts, imatrix, preset files")
    ap.add_argument("--llama-src", type=Path, default=None, help="llama.cpp sources (convert_hf_to_gguf.py)")
    ap.add_argument("--convert-python", default=sys.executable, help="python that runs the converter")
    ap.add_argument("--model", type=Path, default=None, help="HF folder (default: hawqtool's embedded SmolLM2)")
    ap.add_argument("--ours", default="", help="our GGUF files, comma-separated")
    ap.add_argument("--presets", default="Q3_K_S,Q3_K_M,Q4_K_S,Q4_K_M", help="llama-quantize types, comma-separated")
    ap.add_argument("--imatrix-chunks", type=int, default=250, help="512-token calibration chunks for llama-imatrix")
    ap.add_argument("--threads", type=int, default=2, help="llama-bench threads")
    ap.add_argument("--ppl-threads", type=int, default=1, help="threads for llama-perplexity/-imatrix/-quantize")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved llama-bench runs per file (median)")
    ap.add_argument("--no-f32", action="store_true", help="leave the F32 GGUF out of the table")
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    tools = find_tools(args.llama_bin)
    ours = [Path(p).expanduser() for p in args.ours.split(",") if p.strip()]
    for p in ours:
        if not p.is_file():
            print(f"error: --ours file {p} does not exist", file=sys.stderr)
            sys.exit(1)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        from hawqtool.models import default_model_path
        args.model = default_model_path()
    f32 = ensure_f32(args, args.model)
    calib, ev = write_texts(args.work, args.model)
    files = ([] if args.no_f32 else [f32]) + ensure_presets(args, tools, f32, calib) + ours
    ppls = {f: perplexity(args, tools, f, ev) for f in files}
    speeds = bench(args, tools, files)
    table = ["| file | bits per linear weight | file bits/param | file bytes | linear tensor types; embedding "
             "| llama-perplexity ± (chunks) | pp128 tok/s | tg32 tok/s |", "|---|---|---|---|---|---|---|---|"]
    for f in files:
        s = gguf_stats(f)
        ppl, pm, chunks = ppls[f]
        pp, tg = speeds[f]
        table.append(f"| {f.name} | {bits_per_linear_weight(s):.3f} | {file_bits_per_param(s):.3f} | "
                     f"{s['file_bytes']:,} | {types_str(s)} | {ppl:.4f} ± {pm:.4f} ({chunks}) | {speed_str(pp)} | {speed_str(tg)} |")
    details = (f"{machine_line(tools)}  \nllama-bench -p 128 -n 32 -r 5 -t {args.threads}, median (min–max) of "
               f"{args.repeats} interleaved runs; llama-perplexity -c {CTX} -b {CTX} -t {args.ppl_threads} on eval.txt (hawqtool's "
               f"{EVAL_WINDOWS} × {CTX} evaluation tokens of `wiki`; the second half of each chunk scored, 255 "
               f"predictions each); imatrix from the first {args.imatrix_chunks} × {CTX} calibration tokens.")
    record("GGUF files in llama.cpp: size, perplexity, speed (SmolLM2-135M)", details, table, args.append)


if __name__ == "__main__":
    main()
