"""The `qigen bench` harness on tiny grids: it runs, results.json validates against its schema, the tables and
plots are written, and what it cannot do is said and skipped. Speeds are not checked here."""
import builtins
import io
import json
from pathlib import Path

import jsonschema
import pytest

from runtime import bandwidth
from perfmodel.host import detect
from qigen.bench import SCHEMA, BenchError, Progress, Task, summary
from qigen.bench.model import baselines
from qigen.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def validate(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    jsonschema.validate(results, json.loads(SCHEMA.read_text()))
    return results


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One results directory that both benchmarks write into."""
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "kernels", "--shape", "37x100,16x64", "--bits", "4,3", "--group", "32,row", "--batch", "1,3",
                 "--threads", "1,2", "--repeat", "2", "-o", str(out)]) == 0
    kernels = validate(out)
    assert main(["bench", "model", "--bits", "8", "--group", "row", "--method", "rtn", "--threads", "1", "--repeat", "1",
                 "--ctx", "32", "--max-windows", "1", "--tokens", "2", "--baselines", "torch-fp32", "-o", str(out)]) == 0
    return out, kernels


def test_kernels_grid_runs_and_validates(out):
    out, results = out
    k = results["kernels"]
    qigen = [r for r in k["records"] if r["impl"] == "qigen"]
    # shapes x threads x (bits x groups x batches + int8 activations: 4- and 3-bit g32 at both batches)
    assert len(qigen) == 2 * 2 * (2 * 2 * 2 + 2 * 2)
    assert {r["activations"] for r in qigen} == {"fp32", "int8"}
    assert {r["phase"] for r in qigen} == {"decode", "prefill"}
    # decode against the bandwidth probed around it, prefill against the run's measurement
    assert all(len(r["bandwidth_probes"]) == (2 if r["phase"] == "decode" else 0) for r in qigen)
    assert {"torch fp32", "torch int8 dynamic", "numpy fp32"} <= {r["impl"] for r in k["records"]}
    assert all(len(r["times_s"]) == 2 for r in k["records"])
    assert len(k["library"]["kernels"]) == 24 and all(m["chosen"] for m in k["library"]["kernels"])
    assert (out / "kernels.png").read_bytes().startswith(PNG)


def test_model_grid_runs_and_keeps_both_sections(out, capsys):
    out, _ = out
    results = validate(out)
    assert {"kernels", "model"} <= set(results)  # the model run kept the kernels section
    names = [r["name"] for r in results["model"]["records"]]
    assert names == ["q8 grow rtn fp32", "torch fp32"]
    assert not [r["error"] for r in results["model"]["records"] if "error" in r]
    q8 = results["model"]["records"][0]
    assert q8["perplexity"] > 1 and q8["speed"]["1"]["decode_tokens_per_s"] > 0 and 8 < q8["bits_per_weight"] < 9
    md = (out / "results.md").read_text()
    assert "## Kernels" in md and "## Model" in md and "q8 grow rtn fp32" in md
    assert (out / "model.png").read_bytes().startswith(PNG)
    assert not list((out / "models").iterdir())  # deleted unless --keep-models
    # the probes around each run leave alone the measurement the cost model reads (1 and all cores)
    assert set(bandwidth.stored(detect())) == {1, detect().cores}


def test_bench_refuses_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "kernels", "--bits", "5", "-o", str(tmp_path)])
    assert "5 bits is not one of 2, 3, 4, 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "kernels", "--group", "48", "-o", str(tmp_path)])
    assert "group 48 is not one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "model", "--method", "awq", "-o", str(tmp_path)])
    assert "method awq is not one of rtn, gptq" in capsys.readouterr().err
    with pytest.raises(BenchError, match="baseline vllm is unknown"):
        baselines(("vllm",), Path("m.gguf"))
    assert main(["bench", "model", "--bits", "8", "--ctx", "100000", "--baselines", "none", "-o", str(tmp_path)]) == 2
    assert "fewer than one --ctx window of 100000" in capsys.readouterr().err


def test_missing_baseline_is_skipped_with_the_reason(monkeypatch, capsys):
    real = builtins.__import__

    def no_llama(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    assert baselines(("torch-fp32", "llama.cpp"), Path("m.gguf")) == ["torch-fp32"]
    assert "skipped: the llama.cpp baseline" in capsys.readouterr().err
    assert baselines(("llama.cpp",), Path("hf-model-dir")) == []
    assert "needs a GGUF model" in capsys.readouterr().err


def test_progress_estimates_the_time_left():
    stream = io.StringIO()
    done = Progress([Task(f"task {i}", w, lambda i=i: i) for i, w in enumerate((1, 3, 1))], stream).run()
    lines = stream.getvalue().splitlines()
    assert done == [0, 1, 2]
    assert "estimating: task 0" in lines[0] and "left: task 1" in lines[1] and "20% 2/3" in lines[1]
    assert lines[-1].startswith("done: 3 measurements")


def test_summary_flags_noise():
    assert summary([1.0, 1.05, 1.02])["noisy"] is False
    s = summary([1.0, 1.5, 1.1])
    assert s["median"] == 1.1 and s["noisy"] and abs(s["spread"] - 0.5 / 1.1) < 1e-12


FAKE_TOOLS = {  # llama.cpp's tools as far as the bench reads them: their arguments, output and files
    "llama-quantize": 'cp "$2" "$3"',
    "llama-bench": """cat <<'JSON'
build: fake
[{"n_prompt": 100, "n_gen": 0, "samples_ts": [500.0, 520.0]}, {"n_prompt": 0, "n_gen": 2, "samples_ts": [90.0, 110.0]}]
JSON""",
    "llama-perplexity": 'echo "perplexity: calculating perplexity over 1 chunks, n_ctx=32" >&2; '
                        'echo "Final estimate: PPL = 12.3456 +/- 0.5" >&2',
}


def test_llama_cpp_baseline_takes_llama_benchs_numbers(tmp_path, monkeypatch):
    """With llama-bench named, the llama.cpp rows come from llama.cpp's own tools: llama-quantize makes each type,
    llama-bench gives the speeds (median of its repetitions), llama-perplexity the perplexity."""
    for name, body in FAKE_TOOLS.items():
        (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("QIGEN_LLAMA_BENCH", str(tmp_path / "llama-bench"))
    out = tmp_path / "out"
    assert main(["bench", "model", "--bits", "8", "--group", "row", "--method", "rtn", "--threads", "1", "--repeat",
                 "2", "--ctx", "32", "--max-windows", "1", "--tokens", "2", "--baselines", "llama.cpp",
                 "-o", str(out)]) == 0
    records = [r for r in validate(out)["model"]["records"] if r["kind"] == "llama.cpp"]
    assert len(records) == 5 and not [r["error"] for r in records if "error" in r]
    speed = records[0]["speed"]["1"]
    assert speed["tool"] == "llama-bench" and speed["prompt_tokens_per_s"] == 510.0
    assert speed["decode_tokens_per_s"] == 100.0 and speed["decode_runs"] == [90.0, 110.0]
    assert records[0]["perplexity"] == 12.3456 and records[0]["tokens_scored"] == 15
    monkeypatch.setenv("QIGEN_LLAMA_BENCH", str(tmp_path / "nowhere"))
    with pytest.raises(BenchError, match="QIGEN_LLAMA_BENCH=.*nowhere is no executable file"):
        baselines(("llama.cpp",), Path("model.gguf"))
