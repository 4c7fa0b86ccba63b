"""The command-line tools, run as a user runs them (subprocesses), on tiny real data."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from densead.train import load_checkpoint

REPO = Path(__file__).resolve().parents[1]

TINY_MODEL = {"in_channels": 1, "n_scales": 2, "n_steps": 1, "hidden": 8, "n_bins": 17}
DIGITS = {"source": "sklearn_digits", "channels": 1, "size": 8}


def run_tool(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )
    if ok and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def tiny_experiment(out: Path, steps: int = 2) -> dict:
    train = {"steps": steps, "batch_size": 16, "checkpoint_every": 1}
    return {
        "output_dir": str(out),
        "model": TINY_MODEL,
        "general": {**DIGITS, "exclude_classes": [0], "stop": 200, "rotations": True},
        "in_dist": {**DIGITS, "exclude_classes": [0], "stop": 200},
        "in_dist_test": {**DIGITS, "exclude_classes": [0], "start": 1700},
        "anomalies": {"digit_0": {**DIGITS, "classes": [0], "start": 1500}},
        "general_train": train,
        "in_dist_train": train,
        "outlier_train": train,
        "n_heatmaps": 2,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two-step models through tools/train_flow.py: a general one and one finetuned from it."""
    root = tmp_path_factory.mktemp("train")
    cfg = {
        "output_dir": str(root / "general"),
        "data": {**DIGITS, "augment": "translate"},
        "model": TINY_MODEL,
    }
    cfg["train"] = {"steps": 2, "batch_size": 16}
    (root / "general.yaml").write_text(yaml.safe_dump(cfg))
    out = run_tool("tools/train_flow.py", str(root / "general.yaml"), "--no-progress")
    general = root / "general" / "checkpoint.pt"
    assert str(general.resolve()) in out.stdout
    bpd = load_checkpoint(general)["history"][-1][1]
    assert f"step 2: {bpd:.3f} bits/dim on its training batch\n" in out.stdout  # also with --no-progress
    run_tool(
        "tools/train_flow.py",
        str(root / "general.yaml"),
        "--set",
        f"output_dir={root / 'in'}",
        "--set",
        "data.exclude_classes=[0]",
        "--set",
        f"train.init_from={general}",
        "--no-progress",
    )
    return {"root": root, "general": general, "in": root / "in" / "checkpoint.pt"}


def test_train_flow_rejects_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), "data": DIGITS, "trian": {}}))
    proc = run_tool("tools/train_flow.py", str(path), ok=False)
    assert proc.returncode != 0 and "bad.yaml" in proc.stderr and "'trian'" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_training_tools_end_bad_input_with_one_line_and_keep_checkpoints(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    config = trained["root"] / "general.yaml"
    before = trained["general"].read_bytes()
    noimages = tmp_path / "noimages.npz"
    np.savez(noimages, x=np.zeros(3))
    cases = [
        (["--set", "train.lr=-1"], r"general\.yaml: train\.lr: must be > 0, got -1"),
        (
            [
                "--set",
                f"output_dir={tmp_path / 'o'}",
                "--set",
                "data.source=npz",
                "--set",
                "data.path=nope.npz",
            ],
            r"nope\.npz",
        ),
        (
            [],
            r"general/checkpoint\.pt exists: continue it with --resume, train anew over it with --overwrite",
        ),
        (
            ["--resume", "--set", "train.seed=3"],
            r"cannot resume: .*train\.seed \(0 in the checkpoint, 3 now\)",
        ),
        (
            [
                "--set",
                f"output_dir={tmp_path / 'o2'}",
                "--set",
                "data.source=npz",
                "--set",
                f"data.path={noimages}",
            ],
            r"noimages\.npz: no 'images' array \(found: x\)$",  # a KeyError's message, not its repr
        ),
        (
            ["--set", f"output_dir={tmp_path / 'o3'}", "--set", "train.device=cuda:99"],
            r"train\.device: 'cuda:99', but this machine's CUDA devices: ",
        ),
        (["--resume", "--overwrite"], r"--resume continues the checkpoint, --overwrite replaces it"),
    ]
    for flags, message in cases:
        proc = run_tool("tools/train_flow.py", str(config), "--no-progress", *flags, ok=False)
        assert proc.returncode == 2, (flags, proc.stderr)
        assert re.match(rf"train_flow\.py: error: .*{message}", proc.stderr.splitlines()[-1]), proc.stderr
        assert "Traceback" not in proc.stderr
    assert trained["general"].read_bytes() == before
    # DENSEAD_TRACEBACK=1: the traceback, for a bug report (0: none).
    cmd = [sys.executable, "tools/train_flow.py", str(config), "--set", "train.lr=-1"]
    for value, code in (("1", 1), ("0", 2)):
        env = {**os.environ, "DENSEAD_TRACEBACK": value}
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600, check=False
        )
        assert proc.returncode == code and ("Traceback" in proc.stderr) == (value == "1"), proc.stderr


def test_sigterm_runs_the_cleanups(tmp_path: Path) -> None:
    """A tool killed with SIGTERM leaves no temporary file (here one of atomic_path's)."""
    script = (
        "import os, signal, sys, time\n"
        "from densead.cli import stop_on_sigterm\n"
        "from densead.io import atomic_path\n"
        "stop_on_sigterm()\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(60)\n"
    )
    proc = run_tool("-c", script, str(tmp_path / "out.csv"), ok=False)
    assert proc.returncode == 143, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_stop_while_the_temporary_file_is_being_prepared_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import densead.io

    def stop() -> int:  # a SIGTERM between mkstemp and the first write
        raise SystemExit(143)

    monkeypatch.setattr(densead.io, "_umask", stop)
    with pytest.raises(SystemExit), densead.io.atomic_path(tmp_path / "out.csv"):
        raise AssertionError("not reached")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_is_one_line_and_the_sigterm_handler_is_the_tools_only_while_it_works(tmp_path: Path) -> None:
    script = (
        "import argparse, os, signal, sys\n"
        "from densead.cli import tool_errors\n"
        "parser = argparse.ArgumentParser(prog='tool')\n"
        "before = signal.getsignal(signal.SIGTERM)\n"
        "try:\n"
        "    with tool_errors(parser):\n"
        "        assert signal.getsignal(signal.SIGTERM) is not before\n"
        "        if sys.argv[1] == 'interrupt':\n"
        "            raise KeyboardInterrupt\n"
        "finally:\n"
        "    assert signal.getsignal(signal.SIGTERM) is before, 'handler left installed'\n"
        "print('done')\n"
    )
    proc = run_tool("-c", script, "interrupt", ok=False)
    assert proc.returncode == 130 and proc.stderr == "tool: interrupted\n", proc.stderr
    proc = run_tool("-c", script, "work")
    assert proc.stdout == "done\n" and proc.stderr == ""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_ctrl_c_while_a_tool_imports_is_one_line(tmp_path: Path) -> None:
    """Ctrl-C during a tool's imports (torch takes seconds): ``<tool>.py: interrupted``, status 130,
    no traceback. Sent once torch's libraries are being mapped, i.e. inside the imports. The tool
    starts with SIGINT's default action: a test run in the background inherits it ignored, and
    Python then leaves it ignored."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, "tools/train_flow.py", "--help"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "the tool ended before torch loaded"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "train_flow.py: interrupted\n" and out == "", err


STDLIB = (*sys.stdlib_module_names, "__future__")


def test_every_tool_imports_torch_under_quiet_interrupt() -> None:
    """Before ``with quiet_interrupt():`` a tool imports the standard library and densead.cli (which
    imports only the standard library) and nothing else; the block holds the other imports."""
    import ast

    for tool in sorted((REPO / "tools").glob("*.py")):
        tree = ast.parse(tool.read_text())
        before = []
        for node in tree.body:
            if isinstance(node, ast.Import):
                before += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                before.append(node.module or "")
            elif not isinstance(node, ast.Expr):  # the docstring
                break
        outside = [m for m in before if m.split(".")[0] not in STDLIB and m != "densead.cli"]
        assert "densead.cli" in before and not outside, (tool.name, outside)
        guarded = [
            node
            for node in tree.body
            if isinstance(node, ast.With) and ast.unparse(node.items[0].context_expr) == "quiet_interrupt()"
        ]
        assert len(guarded) == 1 and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in guarded[0].body)
        later = [
            n
            for n in tree.body[tree.body.index(guarded[0]) + 1 :]
            if isinstance(n, (ast.Import, ast.ImportFrom))
        ]
        assert not later, (tool.name, "imports after the quiet_interrupt block")


def test_signals_that_come_during_a_cleanup_act_after_it(tmp_path: Path) -> None:
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from densead.cli import stop_on_sigterm\n"
        "from densead.io import signals_deferred\n"
        "stop_on_sigterm()\n"
        "with signals_deferred():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    for i in range(200):  # many bytecodes: a handler that could run would run here\n"
        "        Path(sys.argv[1], str(i)).write_text('x')\n"
        "    Path(sys.argv[1], 'cleaned').write_text('all of it')\n"
        "print('not reached')\n"
    )
    proc = run_tool("-c", script, str(tmp_path), ok=False)
    assert proc.returncode == 143 and "not reached" not in proc.stdout, proc.stderr
    assert (tmp_path / "cleaned").is_file()


def test_outputs_are_checked_before_the_work(tmp_path: Path) -> None:
    from densead.io import check_output_dir

    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"^output_dir: .*afile exists and is not a folder"):
        check_output_dir(tmp_path / "afile")
    with pytest.raises(
        ValueError, match=r"^--out: cannot create .*afile/sub/deeper: .*afile is not a folder"
    ):
        check_output_dir(tmp_path / "afile" / "sub" / "deeper", "--out")
    (tmp_path / "run" / "checkpoint.pt").mkdir(parents=True)  # found before training, not after
    with pytest.raises(
        ValueError, match=r"^output_dir: .*run/checkpoint\.pt is a folder; the run writes a file"
    ):
        check_output_dir(tmp_path / "run", files=("checkpoint.pt", "config.yaml"))
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")  # a link to nothing: no folder either
    with pytest.raises(ValueError, match=r"cannot create .*dangling/run: .*dangling is not a folder"):
        check_output_dir(tmp_path / "dangling" / "run")
    assert check_output_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # checked, not created
    # A trainer refuses before it reads data or trains (the config's data file does not exist).
    config = tmp_path / "run.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'afile'}\ndata: {{source: npz, path: {tmp_path / 'none.npz'}}}\n"
        "model: {in_channels: 1, n_scales: 2, n_steps: 1, hidden: 8}\ntrain: {steps: 1}\n"
    )
    proc = run_tool("tools/train_flow.py", str(config), ok=False)
    assert (
        proc.returncode == 2
        and "output_dir: " in proc.stderr
        and "afile exists and is not a folder" in proc.stderr
    )


def test_a_checkpoint_that_is_a_folder_or_no_torch_file_is_named_as_such(tmp_path: Path) -> None:
    from densead.train import load_checkpoint

    with pytest.raises(FileNotFoundError, match=r"^checkpoint .* is a folder, not a file$"):
        load_checkpoint(tmp_path)
    (tmp_path / "run.yaml").write_text("output_dir: runs/x\n")
    with pytest.raises(
        ValueError, match=r"run\.yaml: not a readable densead checkpoint \(not a file torch\.save"
    ):
        load_checkpoint(tmp_path / "run.yaml")


def test_score_images_typicality_against_the_training_images_mean(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for name, digit in (("ones", 1), ("twos", 2)):
        keep = digits.target == digit
        np.savez(tmp_path / f"{name}.npz", images=digits.images[keep][:20].astype(np.uint8))

    def score(name: str, *extra: str, ok: bool = True) -> subprocess.CompletedProcess:
        args = ["--checkpoint", str(trained["in"]), "--input", str(tmp_path / f"{name}.npz")]
        out = ["--out", str(tmp_path / f"{name}.csv"), "--no-progress", *extra]
        return run_tool("tools/score_images.py", *args, *out, ok=ok)

    def column(name: str, key: str) -> np.ndarray:
        with (tmp_path / f"{name}.csv").open() as f:
            return np.array([float(r[key]) for r in csv.DictReader(f)])

    score("twos", "--detector", "raw")  # b̄ by hand: the mean bits/dim of the "training" twos
    mean_bpd = float(np.mean(column("twos", "raw") / (64 * math.log(2))))
    proc = score("ones", "--detector", "raw,typicality", "--typical-set", str(tmp_path / "twos.npz"))
    assert f"typicality: mean bits/dim {mean_bpd:.4f} on 20 images" in proc.stdout
    expected = np.abs(column("ones", "raw") / (64 * math.log(2)) - mean_bpd)
    np.testing.assert_allclose(column("ones", "typicality"), expected, rtol=0, atol=1e-5)
    score("ones", "--detector", "typicality", "--typical-bpd", repr(mean_bpd))
    np.testing.assert_allclose(column("ones", "typicality"), expected, rtol=0, atol=1e-5)
    for extra, message in (
        (["--detector", "typicality"], "needs --typical-set (the model's training images) or --typical-bpd"),
        (
            ["--detector", "raw", "--typical-bpd", "3"],
            "--typical-set / --typical-bpd are for --detector typicality",
        ),
        (
            ["--detector", "typicality", "--typical-bpd", "nan"],
            "--typical-bpd must be a finite number, got nan",
        ),
        (["--detector", "typicality", "--typical-set", str(tmp_path / "no.npz")], "--typical-set not found"),
    ):
        proc = score("ones", *extra, ok=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_score_images_and_evaluate(trained: dict[str, Path], tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    heat = tmp_path / "new" / "heat"  # its folder is made too
    for name, keep, shown in (("ones", digits.target == 1, "0"), ("zeros", digits.target == 0, "7")):
        imgs = digits.images[keep][:20].astype(np.uint8)
        np.savez(tmp_path / f"{name}.npz", images=imgs, labels=digits.target[keep][:20])
        run_tool(
            "tools/score_images.py",
            "--checkpoint", str(trained["in"]),
            "--general", str(trained["general"]),
            "--detector", "raw,ratio,last_scale,complexity,complexity_loco",
            "--input", str(tmp_path / f"{name}.npz"),
            "--out", str(tmp_path / f"{name}.csv"),
            "--heatmaps", str(heat),
            "--n-heatmaps", shown,
            "--no-progress",
        )  # fmt: skip
        pngs = sorted(heat.glob("*.png"))  # complexity has no heat map (raw's, shifted); loco has
        assert len(pngs) == (20 if shown == "0" else int(shown)) * 4, name
    with (tmp_path / "ones.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and {"raw", "ratio", "last_scale", "set", "name"} <= set(rows[0])
    assert all(np.isfinite(float(r["ratio"])) for r in rows)
    # complexity = log p_png − log p_in: below raw (−log p_in) by the PNG file's length in nats
    assert all(8 * 60 * math.log(2) < float(r["raw"]) - float(r["complexity"]) for r in rows)
    # complexity_loco = log p_loco − log p_in: below raw by the per-pixel coder's length in nats,
    # of the images as the model saw them (an npz is 8-bit: quantized to the model's 17 levels)
    from densead.config import DataConfig
    from densead.data.images import load_image_set
    from densead.detectors.complexity import code_length

    ones = load_image_set(DataConfig(source="npz", path=str(tmp_path / "ones.npz"), channels=1, size=8), 17)
    loco_nats = (code_length(ones.images, "loco") * math.log(2)).tolist()
    gaps = [float(r["raw"]) - float(r["complexity_loco"]) for r in rows]
    assert gaps == pytest.approx(loco_nats, rel=1e-5, abs=1e-3)
    # The second run replaced the first's folder whole: its 7 images' maps and its record only.
    assert sorted(p.name for p in heat.iterdir()) == sorted(["heatmaps.json", *(p.name for p in pngs)])
    record = json.loads((heat / "heatmaps.json").read_text())
    assert (record["set"], record["images"], record["images_shown"]) == ("zeros", 20, 7)
    assert record["detectors"] == ["raw", "ratio", "last_scale", "complexity_loco"]
    assert cv2.imread(str(pngs[0])) is not None
    assert not [p for p in (tmp_path / "new").iterdir() if p.name != "heat"]  # no staging folder left
    # A folder of other files is refused before any scoring: nothing in it is mixed or removed.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    proc = run_tool(
        "tools/score_images.py", "--checkpoint", str(trained["in"]), "--input", str(tmp_path / "ones.npz"),
        "--out", str(tmp_path / "mine.csv"), "--heatmaps", str(mine), ok=False,
    )  # fmt: skip
    assert (
        proc.returncode == 2 and f"--heatmaps: {mine} holds files that no heat-map run wrote" in proc.stderr
    )
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and not (tmp_path / "mine.csv").exists()
    proc = run_tool(
        "tools/score_images.py", "--checkpoint", str(trained["in"]), "--input", str(tmp_path / "ones.npz"),
        "--out", str(heat / "sub" / "s.csv"), "--heatmaps", str(heat), ok=False,
    )  # fmt: skip
    assert (
        proc.returncode == 2
        and f"holds {heat / 'sub' / 's.csv'}, which the heat maps would replace" in proc.stderr
    )
    assert not (heat / "sub").exists()
    proc = run_tool(
        "tools/evaluate.py", str(tmp_path / "ones.csv"), str(tmp_path / "zeros.csv"),
        "--in-set", "ones", "--out", str(tmp_path / "eval"),
    )  # fmt: skip
    assert "AUROC" in proc.stdout and "zeros" in proc.stdout
    for name in ("metrics.csv", "metrics.md", "roc_raw.png", "hist_ratio.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0, name


def test_score_images_bad_input_writes_nothing(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    proc = run_tool(
        "tools/score_images.py", "--checkpoint", str(trained["in"]), "--input", str(tmp_path / "nope.npz"),
        "--out", str(out), ok=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "nope.npz" in proc.stderr and not out.exists()
    np.savez(tmp_path / "rgb.npz", images=np.zeros((3, 8, 8, 2), dtype=np.uint8))
    proc = run_tool(
        "tools/score_images.py", "--checkpoint", str(trained["in"]), "--input", str(tmp_path / "rgb.npz"),
        "--out", str(out), ok=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "rgb.npz" in proc.stderr and "(3, 8, 8, 2)" in proc.stderr
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((8, 8), np.uint8))
    (folder / "b.png").write_bytes(b"\x89PNG broken")
    proc = run_tool(
        "tools/score_images.py", "--checkpoint", str(trained["in"]), "--input", str(folder),
        "--out", str(out), "--heatmaps", str(tmp_path / "heat"), ok=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "b.png" in proc.stderr
    assert not out.exists() and not (tmp_path / "heat").exists()
    assert not list(tmp_path.glob(".*tmp*")) and not list(tmp_path.glob(".partial-*"))
    proc = run_tool(
        "tools/score_images.py", "--checkpoint", str(trained["in"]), "--detector", "ratio",
        "--input", str(folder), "--out", str(out), ok=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "--general" in proc.stderr


def test_run_experiment_report_and_resume(tmp_path: Path) -> None:
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_experiment(tmp_path / "straight", steps=4)))
    proc = run_tool("tools/run_experiment.py", str(cfg_path), "--no-progress")
    out = tmp_path / "straight"
    assert "Diff†" in proc.stdout and str(out.resolve()) in proc.stdout
    for name in (
        "report.md",
        "scores.csv",
        "metrics.csv",
        "roc_ratio.png",
        "hist_raw.png",
        "scale_shares.png",
    ):
        assert (out / name).stat().st_size > 0, name
    for stage in ("general", "in_dist", "in_dist_outlier", "general_outlier"):
        assert (out / stage / "checkpoint.pt").is_file(), stage
    # 2 images × raw, last scale, Diff, Diff†, complexity (LOCO) and typicality (the file coders'
    # complexity: raw's map, shifted)
    assert len(list((out / "heatmaps" / "digit_0").glob("*.png"))) == 2 * 6
    assert len(list((out / "heatmaps" / "digit_0").glob("*_complexity_loco.png"))) == 2

    # The report's numbers, intervals and paired differences are recomputed from scores.csv by
    # tools/evaluate.py exactly (the report's command line says how).
    report = (out / "report.md").read_text()
    assert "`--bootstrap 1000 --compare raw` the intervals" in report
    run_tool(
        "tools/evaluate.py",
        str(out / "scores.csv"),
        "--in-set",
        "in_dist_test",
        "--bootstrap",
        "1000",
        "--compare",
        "raw",
        "--out",
        str(tmp_path / "ev"),
    )
    for name in ("metrics.csv", "differences.csv"):
        assert (tmp_path / "ev" / name).read_text() == (out / name).read_text(), name
    tables, differences = (tmp_path / "ev" / "metrics.md").read_text().split("\n\n**AUROC %, detector")
    assert tables in report and "**AUROC %, detector" + differences in report
    assert "| Diff† | " in differences and "[" in tables

    # Killed in the middle of the in-distribution stage, then the same command: identical scores.
    resumed = tmp_path / "resumed"
    cfg_path.write_text(yaml.safe_dump(tiny_experiment(resumed, steps=4)))
    cmd = [sys.executable, "tools/run_experiment.py", str(cfg_path), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while (
        not (resumed / "in_dist" / "checkpoint.pt").exists()
        and proc.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (resumed / "report.md").exists(), "the run finished before it could be interrupted"
    assert load_checkpoint(resumed / "in_dist" / "checkpoint.pt")["step"] < 4
    run_tool(*cmd[1:])
    assert (resumed / "scores.csv").read_text() == (out / "scores.csv").read_text()


def test_flow_throughput_benchmark_prints_its_table() -> None:
    """The benchmark script runs (tiny Glow, one timed step per row) and its table is consistent:
    recomputation keeps less for the backward pass than the plain path, bf16 keeps about half,
    and the CUDA-graphs row says why it is skipped on a CPU."""
    result = run_tool(
        "benchmarks/flow_throughput.py",
        *("--small", "--batch-sizes", "2", "--iters", "1", "--no-dense"),
        *("--levers", "plain", "bf16", "recompute", "cudagraphs"),
    )
    lines = [line.split("|") for line in result.stdout.splitlines() if line.startswith("|")]
    rows = {cells[1].strip(): cells[2:-1] for cells in lines}
    saved = {lever: float(rows[lever][5]) for lever in ("plain", "bf16", "recompute")}
    assert saved["recompute"] < 0.2 * saved["plain"], saved
    assert 0.4 * saved["plain"] < saved["bf16"] < 0.7 * saved["plain"], saved
    assert rows["plain"][7].strip() == "1.00×"
    assert "needs a CUDA device" in rows["cudagraphs"][0]


def test_bits_per_dim_trajectory_and_step_profile_run(shared_data: Path) -> None:
    """--bpd-every prints a trajectory row per checkpoint and, at the last step, the lever's own
    evaluation path too (the plain path: the same number), and another --seed another trajectory;
    profile_step.py prints its table, with the host's dispatched operators counted on a CPU: fewer
    for the fused path than the plain one."""
    result = run_tool(
        "benchmarks/flow_throughput.py",
        *("--small", "--batch-sizes", "4", "--levers", "plain", "--bpd-steps", "4", "--bpd-every", "2"),
        *("--cifar", str(shared_data / "cifar10_test.npz")),
    )
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| plain")]
    assert [int(r[2]) for r in rows] == [2, 4]
    first, last = (float(r[3]) for r in rows)
    assert 5.0 < last < first < 9.0, "test bits/dim of a fresh small Glow, falling"
    assert rows[0][5].strip() == "—" and float(rows[1][5]) == pytest.approx(last, abs=1e-4)
    other_seed = run_tool(
        "benchmarks/flow_throughput.py",
        *("--small", "--batch-sizes", "4", "--levers", "plain", "--bpd-steps", "2", "--bpd-every", "2"),
        *("--seed", "1", "--cifar", str(shared_data / "cifar10_test.npz")),
    )
    row = next(line.split("|")[1:-1] for line in other_seed.stdout.splitlines() if line.startswith("| plain"))
    assert row[0].strip() == "plain, seed 1" and int(row[2]) == 2
    assert float(row[3]) != pytest.approx(first, abs=1e-4), "another initialization and other batches"
    profile = run_tool(
        "benchmarks/profile_step.py", "--small", "--batch", "2", "--steps", "1", "--levers", "plain", "fused"
    )
    rows = {
        line.split("|")[1].strip(): line.split("|")
        for line in profile.stdout.splitlines()
        if line.startswith(("| plain |", "| fused |"))
    }
    assert int(rows["plain"][5]) > 1000, "ATen operators dispatched per step of a 12-step Glow"
    # the fused path builds every scale's 1×1 weights in one batched computation
    assert int(rows["fused"][6]) < int(rows["plain"][6]), "backend operators per eager step"
    # scalar reads counted apart: one per parameter (Adamax's step counters) and the norm check
    assert int(rows["fused"][7]) == int(rows["plain"][7]) > 12
