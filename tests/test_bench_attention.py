"""`pigeon bench attention` on the CPU: the quick run end to end (files, every summary key, checks,
statuses), the FLOP count by hand, the variants' masks for SDPA and Flex against pigeon's patterns,
the check catching a wrong answer, the Flex semantics (uncompiled), --resume, one-line errors."""
import json

import pytest
import torch

import pigeon.attention as pa
from pigeon.bench import attention as A
from pigeon.bench import attn_variants as V
from pigeon.bench.attn_check import Reference

from bench_cli import assert_files_written, one_error, quick_run, run_bench



def bench(*args):
    return run_bench("attention", *args)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return quick_run("attention", tmp_path_factory.mktemp("attention"))


def test_quick_run_writes_every_file_and_key(quick):
    code, stdout, stderr, out = quick
    assert_files_written(code, stderr, out)
    s = json.loads((out / "summary.json").read_text())
    for key in A.ISSUE_KEYS:
        assert key in s, key
        if s[key] is None:
            assert s[f"{key}_note"], key                                       # null, and why
    assert s["command"].startswith("pigeon bench attention --variants dense,causal,") and "--device cpu" in s["command"]
    for key in ("dense_fwd_vs_sdpa", "dense_fwdbwd_vs_sdpa", "s2_speedup_vs_dense"):      # SDPA runs on a CPU
        assert isinstance(s[key], float) and s[key] > 0, key
    for key in ("masked_fwd_vs_flex_min", "masked_fwdbwd_vs_flex_min", "topk_gqa_vs_flex_min"):
        assert s[key] is None and "n/a: compiled FlexAttention on a CPU" in s[f"{key}_note"]
    for key in A.GEMM_KEYS:
        assert s[key] is None and "pigeon bench gemm" in s[f"{key}_note"]
    assert s["cases_total"] == 18 and s["cases_check_failed"] == [] and s["peer_checks_failed"] == []
    assert s["plot"] == "tflops.png" or s["plot"].startswith("skipped: matplotlib")
    if s["plot"] == "tflops.png":
        assert (out / "tflops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "summary.md").read_text()
    assert all(f"| {k} |" in md for k in A.ISSUE_KEYS)


def test_quick_run_cases_are_checked_and_timed(quick):
    code, stdout, stderr, out = quick
    cases = json.loads((out / "cases.json").read_text())["cases"]
    assert {(c["variant"], c["mode"]) for c in cases} == {(v, m) for v in A.VARIANTS for m in A.MODES}
    for c in cases:
        assert c["check"] == "ok", c
        assert c["pigeon_status"] == "ok" and c["pigeon_ms"] > 0 and c["pigeon_tflops"] > 0
        assert c["pigeon_runs"].startswith("cpu: the reference semantics")
        assert "float64 reference" in c["check_what"]
        rows = {r["impl"]: r for r in c["impls"]}
        assert rows["flex"]["status"].startswith("n/a: compiled FlexAttention on a CPU")
        if c["variant"] == "softcap":
            assert rows["sdpa"]["status"].startswith("n/a: SDPA cannot") and c["vs_sdpa"] is None
        else:
            (sdpa,) = [r for r in c["impls"] if r["kind"] == "sdpa"]
            assert sdpa["status"] == "ok" and sdpa["check"] == "ok" and sdpa["backend"] == "cpu"
            assert sdpa["impl"] == ("sdpa:cpu" if c["variant"] in V.DENSE else "sdpa:cpu+mask")
            assert c["vs_sdpa"] == pytest.approx(sdpa["median_ms"] / c["pigeon_ms"])
            assert sdpa["tflops"] == pytest.approx(c["flops"] / (sdpa["median_ms"] * 1e-3) / 1e12)
    assert sum(line.startswith("[") for line in stderr.splitlines()) == 18
    assert "| variant | B | H/Hkv | S | D | dtype | mode |" in stdout
    assert stdout.count("| topk-g4 | 1 | 4/1 | 256 | 64 | bfloat16 |") == 2


def test_flops_by_hand(quick):
    cases = {(c["variant"], c["mode"]): c for c in json.loads((quick[3] / "cases.json").read_text())["cases"]}
    full = 4 * 1 * 4 * 256 * 256 * 64                        # 4 B H S^2 D
    assert cases["dense", "forward"]["flops"] == full
    assert cases["causal", "forward"]["flops"] == pytest.approx(full * 257 / 512)          # (S+1) / 2S
    assert cases["causal", "forward+backward"]["flops"] == pytest.approx(3.5 * full * 257 / 512)
    # documents of 128, 64, 32, 32 tokens, causal: sum n(n+1)/2 = 8256 + 2080 + 528 + 528
    assert cases["document", "forward"]["kept_fraction"] == pytest.approx(11392 / 256**2)
    # window 128 at S 256: the first 128 rows attend 1..128 keys, the others 128
    assert cases["window", "forward"]["kept_fraction"] == pytest.approx((128 * 129 / 2 + 128 * 128) / 256**2)
    # top-k: 2 key blocks of 128, at most half of them: 1 block per query block
    assert cases["topk-g2", "forward"]["kept_fraction"] == 0.5
    c = cases["causal", "forward"]
    assert c["pigeon_tflops"] == pytest.approx(c["flops"] / (c["pigeon_ms"] * 1e-3) / 1e12)


def _grid(B, H, S):
    b = torch.arange(B)[:, None, None, None]
    h = torch.arange(H)[None, :, None, None]
    q = torch.arange(S)[None, None, :, None]
    kv = torch.arange(S)[None, None, None, :]
    return b, h, q, kv


@pytest.mark.parametrize("variant", [v for v in V.VARIANTS if v not in ("dense", "softcap", "alibi", "document")])
def test_sdpa_and_flex_masks_are_pigeons_patterns(variant):
    B, H, S, W = 2, 8, 512, 200
    p = V.make_problem(variant, B, H, S, 64, torch.float32, "cpu", W)
    want = pa.dense_mask(p.pattern(), B, H, S, S).expand(B, H, S, S)
    if variant == "causal":
        assert p.sdpa_mask() is None                                      # is_causal=True instead
    else:
        assert torch.equal(p.sdpa_mask().expand(B, H, S, S), want)
        bias = p.sdpa_bias(torch.bfloat16)
        assert bias.shape[:2] == p.mask_heads() and torch.equal((bias == 0).expand(B, H, S, S), want)
        assert torch.equal(torch.isinf(bias) | (bias == 0), torch.ones_like(want[:bias.shape[0], :bias.shape[1]]))
    _, mask_mod, Bm, Hm = p.flex_mods()
    assert torch.equal(mask_mod(*_grid(B, H, S)).expand(B, H, S, S), want)
    assert want.float().mean().item() == pytest.approx(V.kept_fraction(variant, H, S, W))
    assert (Bm, Hm) == {"s2": (None, H), "topk-g2": (B, H), "topk-g4": (B, H)}.get(variant, (None, None))


def test_document_mask_and_alibi_bias():
    B, H, S = 2, 4, 512
    p = V.make_problem("document", B, H, S, 64, torch.float32, "cpu", 1)
    assert p.cu_seqlens.tolist() == [0, 256, 384, 448, 512, 768, 896, 960, 1024]
    m = p.sdpa_mask()[0, 0]
    _, mask_mod, _, _ = p.flex_mods()
    t = torch.arange(B * S)
    assert torch.equal(mask_mod(0, 0, t[:, None], t[None, :]), m)
    assert m.sum().item() / (B * S * S) == pytest.approx(V.kept_fraction("document", H, S, 1))
    assert torch.equal(p.sdpa_bias(torch.bfloat16)[0, 0] == 0, m)
    a = V.make_problem("alibi", 1, H, 64, 64, torch.float32, "cpu", 1)
    bias = a.sdpa_mask()[0]                                               # [H, S, S]
    torch.testing.assert_close(a.sdpa_bias(torch.float32)[0], bias)
    h = torch.arange(H)[:, None, None]
    q, kv = torch.arange(64)[:, None], torch.arange(64)[None, :]
    slope = 2.0 ** (-8.0 * (h + 1) / H)
    want = torch.where(kv <= q, slope * (kv - q), torch.tensor(float("-inf")))
    torch.testing.assert_close(bias, want)
    score = V.flex_alibi(H)(torch.zeros(()), 0, h, q, kv)
    torch.testing.assert_close(score, slope * (kv - q) * 1.0)


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_the_check_catches_a_wrong_answer(mode):
    p = V.make_problem("alibi", 1, 4, 384, 64, torch.bfloat16, "cpu", 1)
    ref = Reference(p, mode)
    assert ref.what.startswith("float64 reference of batch 0, query heads 0..1, query rows 128..383")

    def results(**kw):
        q, k, v = (t.detach().requires_grad_(mode != "forward") for t in (p.q, p.k, p.v))
        out = pa.attention(q, k, v, backend="reference", **{**p.pigeon_kwargs(), **kw})
        r = {"out": out.detach()}
        if mode != "forward":
            out.backward(ref.grad_out)
            r.update({"grad q": q.grad, "grad k": k.grad, "grad v": v.grad})
        return r
    assert ref.compare(results()) == "ok"
    wrong = ref.compare(results(score_mod=V.pigeon_alibi(8)))            # ALiBi's slopes of 8 heads
    assert wrong.startswith("FAILED: out:")
    assert ref.compare(results(pattern=None)).startswith("FAILED")              # not causal


def test_flex_semantics_uncompiled(tmp_path):
    """The Flex score_mods, packed layout, per-head and GQA block masks, run by flex_attention
    uncompiled, equal pigeon's reference on the check's slice (forward: the uncompiled form has no
    backward; the masks of the other variants are compared elementwise above)."""
    code, out, err = bench("--quick", "--device", "cpu", "--out", tmp_path, "--peers", "flex-eager", "--modes",
                           "forward", "--variants", "alibi,softcap,document,topk-g4", "--reps", "1")
    assert code == 0, err
    for c in json.loads((tmp_path / "cases.json").read_text())["cases"]:
        (row,) = [r for r in c["impls"] if r["impl"] == "flex-eager"]
        assert row["status"] == "ok" and row["check"] == "ok", (c["variant"], row)
        assert c["best_peer"] is None and c["vs_flex"] is None            # semantics only: not a timed peer


def test_resume_keeps_finished_cases(tmp_path):
    args = ("--quick", "--device", "cpu", "--out", tmp_path, "--variants", "causal", "--peers", "none", "--reps", "1")
    code, out, err = bench(*args, "--modes", "forward")
    assert code == 0, err
    first = json.loads((tmp_path / "cases.json").read_text())["cases"]
    code, out, err = bench(*args, "--resume")
    assert code == 0, err
    assert "1 cases from" in err and sum(line.startswith("[") for line in err.splitlines()) == 1
    cases = json.loads((tmp_path / "cases.json").read_text())["cases"]
    assert [c["mode"] for c in cases] == ["forward", "forward+backward"] and cases[0] == first[0]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["cases_total"] == 2 and len(s["commands"]) == 2
    (tmp_path / "cases.json").write_text("{not json")
    code, out, err = bench(*args, "--resume")
    assert code == 2
    one_error(err, "cases.json", "pigeon bench attention")


def test_timeout_is_recorded_and_longer_sequences_skipped(tmp_path):
    code, out, err = bench("--quick", "--device", "cpu", "--out", tmp_path, "--variants", "causal", "--modes",
                           "forward", "--seq-lens", "256,512", "--peers", "sdpa", "--timeout", "0.0001")
    assert code == 0, err
    short, long = json.loads((tmp_path / "cases.json").read_text())["cases"]
    assert short["pigeon_status"] == "timeout" and short["pigeon_ms"] is None and short["vs_sdpa"] is None
    assert long["pigeon_status"] == "skipped: timeout at S 256"
    assert [r["status"] for r in long["impls"] if r["kind"] == "sdpa"] in (["skipped: timeout at S 256"], ["ok"])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["dense_fwd_vs_sdpa"] is None and "pigeon: timeout (x1); skipped" in s["dense_fwd_vs_sdpa_note"]


@pytest.mark.parametrize("args,needles", [
    (("--variants", "flash"), ("--variants flash", "'flash'", "dense, causal")),
    (("--seq-lens", "100"), ("--seq-lens 100", "multiples of 128")),
    (("--seq-lens", "x"), ("--seq-lens x",)),
    (("--heads", "6"), ("--heads 6", "topk-g4", "multiple")),
    (("--head-dims", "32"), ("--head-dims 32", "(64, 128)")),
    (("--dtypes", "float32"), ("--dtypes", "'float32'")),
    (("--modes", "fwd"), ("--modes", "'fwd'")),
    (("--peers", "xformers"), ("--peers", "'xformers'")),
    (("--batch", "0"), ("--batch 0",)),
    (("--reps", "0"), ("--reps 0",)),
    (("--reps", "x"), ("--reps", "invalid int")),
    (("--timeout", "0"), ("--timeout",)),
    (("--budget", "-1"), ("--budget",)),
])
def test_bad_flags_are_one_line_errors(tmp_path, args, needles):
    code, out, err = bench("--quick", "--device", "cpu", "--out", tmp_path / "o", *args)
    assert code == 2
    one_error(err, *needles)
    assert not (tmp_path / "o").exists()


def test_unwritable_out_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out, err = bench("--quick", "--device", "cpu", "--out", blocker)
    assert code == 2
    one_error(err, f"--out {blocker}", "a file is in the way")


def test_summary_ratios_of_hand_made_cases(tmp_path):
    def case(variant, mode, pigeon, **peers):
        rows = [{"impl": "pigeon", "kind": "pigeon", "status": "ok", "median_ms": pigeon}]
        for name, v in peers.items():
            name = name.replace("_", ":")
            ok = isinstance(v, float)
            rows.append({"impl": name, "kind": "compile" if name == "flex" else "sdpa",
                         "status": "ok" if ok else v, "median_ms": v if ok else None})
        return A.finish_case({"variant": variant, "B": 1, "H": 4, "H_kv": 4, "S": 1024, "D": 64, "dtype": "bfloat16",
                              "mode": mode, "flops": 1e9, "kept_fraction": 1.0, "check": "ok", "impls": rows})
    cases = [case("dense", "forward", 2.0, sdpa_flash=1.0, sdpa_cudnn=0.5),      # vs SDPA: best backend 0.5 / 2
             case("causal", "forward", 1.0, sdpa_flash=0.9, flex=1.5),
             case("window", "forward", 1.0, sdpa_efficient=3.0, flex=2.6),
             case("s2", "forward", 0.25, flex="OOM")]
    assert cases[0]["sdpa_best"] == "sdpa:cudnn" and cases[0]["vs_sdpa"] == 0.25
    assert cases[0]["pigeon_tflops"] == pytest.approx(1e9 / 2e-3 / 1e12)
    cfg = A.make_config(quick=True, device="cpu", out="/nonexistent/attention")
    meta = {"gpu": "g", "commit": "c", "date": "d", "command": "x", "device": "cpu", "torch": "t"}
    s = A.build_summary({"meta": meta, "cases": cases}, cfg)
    assert s["dense_fwd_vs_sdpa"] == 0.25 and s["dense_fwd_vs_sdpa_case"].startswith("dense B1")
    assert s["masked_fwd_vs_flex_min"] == pytest.approx(2.6) and s["masked_fwd_vs_flex_min_case"].startswith("window")
    assert s["s2_speedup_vs_dense"] == pytest.approx(4.0) and "not reached" in s["s2_speedup_vs_dense_note"]
    assert s["dense_fwdbwd_vs_sdpa"] is None and "no dense / causal forward+backward case" in s["dense_fwdbwd_vs_sdpa_note"]
    assert s["failures_by_impl"] == {"flex": {"OOM": 1}}
    # the GEMM keys come from pigeon bench gemm's summary
    gemm = tmp_path / "gemm.json"
    gemm.write_text(json.dumps({"commit": "abc", "date": "d", "gemm_vs_cublas_min": 0.5, "gemm_vs_cublas_min_case": "x",
                                "fp8_vs_scaled_mm": None, "fp8_vs_scaled_mm_note": "no fp8"}))
    cfg.gemm_summary = str(gemm)
    s = A.build_summary({"meta": meta, "cases": cases}, cfg)
    assert s["gemm_vs_cublas_min"] == 0.5 and s["gemm_vs_cublas_min_case"] == "x" and "commit abc" in s["gemm_vs_cublas_min_note"]
    assert s["fp8_vs_scaled_mm"] is None and s["fp8_vs_scaled_mm_note"].endswith(": no fp8")
    assert s["grouped_vs_best_peer"] is None and "has no such key" in s["grouped_vs_best_peer_note"]


def test_cold_warm_compile_time_reports_a_failed_child_in_one_line(monkeypatch):
    """A child process that sees no CUDA device fails: the result says so instead of raising
    (the children inherit the environment, so hiding the GPUs makes this run on GPU machines too)."""
    from pigeon.bench.attn_compile import cold_warm
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    r = cold_warm("causal", 64, "bfloat16", timeout=120)
    assert r["error"].startswith("cold run failed: ") and "\n" not in r["error"]
