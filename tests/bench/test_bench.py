"""The benchmark command in its default (short) mode and its measuring tools."""

import builtins
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from neft_kernels.bench import measure

from support import ROOT


def test_peak_bytes_counts_what_a_call_allocates_on_cpu():
    x = torch.ones(1 << 20)
    # the output, plus a few bytes for the wrapped scalar
    assert 4 << 20 <= measure.peak_bytes(lambda: x * 2, torch.device("cpu")) < (4 << 20) + 1024
    # a temporary freed inside the call still counts at its peak
    assert measure.peak_bytes(lambda: (x * 2 + 1).sum(), torch.device("cpu")) >= 8 << 20


def test_interleaved_times_and_summary():
    samples = measure.interleaved_times({"a": lambda: torch.ones(10), "b": lambda: torch.ones(1000)},
                                        torch.device("cpu"), reps=4, inner=2)
    assert {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4}
    stats = measure.summary(samples["a"])
    assert 0 < stats["p20_ms"] <= stats["median_ms"] <= stats["p80_ms"]


def test_host_breakdown_times_each_piece_of_an_eager_call():
    from neft_kernels.backends import available_backends, resolve
    from neft_kernels.bench import host

    records = host.breakdown(torch.device("cpu"), (2, 16, 64, 1000), reps=2, calls=5)
    pieces = {r["call"]: r["host_us"] for r in records}
    auto = f"noisy_embedding (auto: {resolve('auto', torch.device('cpu'))})"
    expected = {"F.embedding", auto, "NoisyEmbedding (train)", "checks + backend resolution",
                "seed: draw_seed", "seed: torch.randint().item()", "torch.empty (output)",
                "autograd.Function entry (C), no work"}
    if "cpu" in available_backends("cpu"):
        expected.add("cpu: forward_with_grad (C++)")
    if "triton" in available_backends("cpu"):  # the interpreter: the launchers' arguments are right
        expected |= {"triton: token_scales (1 launch)", "triton: fused_forward (1 launch)",
                     "triton: forward, mask (2 launches)"}
    assert set(pieces) == expected and all(us > 0 for us in pieces.values())
    assert host.breakdown_table(records).count("\n") == len(records)


@pytest.mark.slow
def test_default_benchmark_writes_json_csv_and_plot(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-m", "neft_kernels.bench", "--no-progress", "--device", "cpu",
         "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "r.png")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    records = json.loads((tmp_path / "r.json").read_text())
    impls = {(r["impl"], r["backend"]) for r in records}
    # the fused backend; the pure-PyTorch reference only where it is the one there is (or on request)
    ours = {("neft", "torch")} if os.environ.get("NEFT_KERNELS_BUILD_EXT") == "0" else {("neft", "cpu")}
    assert impls == {("embedding", "eager"), ("hf_hook", "eager"), ("hf_hook_compiled", "inductor"),
                     ("rand_like_compiled", "inductor")} | ours
    assert {r["pass"] for r in records} == {"forward", "backward", "forward_backward"}
    assert {r["dtype"] for r in records} == {"float32", "bfloat16"}
    assert {tuple(r["shape"]) for r in records} == {(2, 16, 64, 1000), (2, 512, 1024, 32000)}
    assert len(records) == len(impls) * 2 * 3 * 2
    assert all(r["host_us"] > 0 for r in records)
    for r in records:
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["pct_of_copy_bw"] > 0
        assert len(r["shape"]) == 4 and r["device"] == "cpu"
    fwd = {(r["impl"], r["dtype"]): r for r in records
           if r["pass"] == "forward" and r["backend"] != "torch" and r["tokens"] == 1024}
    for dtype in ("float32", "bfloat16"):
        # the floor allocates exactly its output; the hook two more B x L x d buffers
        assert fwd["embedding", dtype]["peak_bytes"] == fwd["embedding", dtype]["output_bytes"]
        assert fwd["hf_hook", dtype]["peak_bytes"] >= 3 * fwd["hf_hook", dtype]["output_bytes"]
        if ("neft", "cpu") in impls:  # the fused kernel: its output and O(tokens) bookkeeping only
            assert fwd["neft", dtype]["peak_bytes"] < 1.25 * fwd["neft", dtype]["output_bytes"]
            assert fwd["neft", dtype]["philox_floor_ms"] > 0
    with open(tmp_path / "r.csv") as f:
        assert len(list(csv.DictReader(f))) == len(records)
    assert (tmp_path / "r.png").stat().st_size > 10_000
    assert "rand_like_compiled" in res.stdout and "copy bandwidth" in res.stdout and "columns:" in res.stdout
    assert ("bare Philox stream" in res.stdout) == (("neft", "cpu") in impls)
    host = json.loads((tmp_path / "r-host.json").read_text())
    assert {r["call"] for r in host} >= {"F.embedding", "hf_hook", "neft, attention_mask", "neft, position_ids",
                                         "neft, both", "neft, cu_seqlens", "NoisyEmbedding (train), attention_mask"}
    assert all(r["host_us"] > 0 for r in host)
    steps = json.loads((tmp_path / "r-train-step.json").read_text())
    assert [r["variant"] for r in steps] == ["none", "hf_hook", "patch_model"]
    assert all(r["step_ms"] > 0 and r["peak_bytes"] > 0 for r in steps)
    assert steps[0]["vs_no_noise"] == 1.0  # each round's ratio against itself
    assert all(r["vs_no_noise_p20"] <= r["vs_no_noise"] <= r["vs_no_noise_p80"] for r in steps)
    assert "Training steps" in res.stdout and "Host time per eager forward call" in res.stdout
    assert f"written: {tmp_path / 'r.json'}" in res.stdout and str(tmp_path / "r-train-step.json") in res.stdout
    assert all(r["copy_gbps"] == max(r["copy_gbps_first"], r["copy_gbps_last"]) for r in records)
    if ("neft", "cpu") in impls:  # the C++ kernels' figures depend on the instruction set: it is said
        from neft_kernels._C_cpu import cpu_isa

        assert all(r["cpu_isa"] == cpu_isa() for r in records) and f"CPU kernels: {cpu_isa()}" in res.stdout


def test_cli_lists_its_choices_and_checks_plot_before_running(monkeypatch, capsys):
    from neft_kernels.backends import available_backends
    from neft_kernels.bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["--backend", "mps"])
    assert "invalid choice" in capsys.readouterr().err
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    # what cannot run here is a usage error before the run, not a traceback from inside it
    for argv, message in ((["--shape", "2,16,64"], "expected B,L,d,V (four positive integers), got '2,16,64'"),
                          (["--shape", "2,16,64,0"], "four positive integers"),
                          (["--backend", "triton", "--device", "cpu"], "--backend triton cannot run on cpu here")):
        if argv[1] == "triton" and "triton" in available_backends("cpu"):
            continue  # the interpreter runs it here
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["--device", "cuda"])
        assert "sees no CUDA GPU here" in capsys.readouterr().err
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit):
        main(["--plot", "r.png"])
    assert "pip install 'neft_kernels[bench]'" in capsys.readouterr().err
