"""The MindSpore version matrix: for each MindSpore release, a fresh venv with bit_zoo from this checkout
and that release, then a fixed smoke set (selected tests of tests/), and one table: release x check, with times.

    python scripts/compat.py                     # every release the package index serves for this Python
    python scripts/compat.py --versions 2.7.0    # the releases named
    python scripts/compat.py --oldest            # the oldest supported release the index serves (.ci/run)

Each check is a pytest run of named tests in that venv, from a temporary directory (graph-mode compiles
write ./rank_0 and friends there). A release below bit_zoo's supported range shows "refused" when
`import bit_zoo` stops with bit_zoo's one-line message. Exit status 1 when any check failed.
About 1.8 GB of disk per venv (MindSpore, torch for the parity reference); removed afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import ast
import csv
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The independent reference for the parity test: the CPU build of torch (see .ci/run).
REFERENCE = ["torch==2.13.0", "torchvision==0.28.0", "timm"]
# mindspore 2.x's first eager op fails under numpy 2; torch and timm would pull numpy 2 in.
NUMPY = "numpy<2"
HEAVY = ["-m", "heavy or not heavy"]


@dataclass(frozen=True)
class Check:
    name: str
    what: str
    args: list[str]  # pytest arguments (tests relative to the checkout) after the options
    timeout: int = 1800


CHECKS = [
    Check("import", "import bit_zoo, the range, the workarounds; every name built, forward at 32 px up to R101x1",
          ["tests/test_ms_compat.py", "tests/test_models.py::test_structure_and_parameter_count",
           "tests/test_models.py::test_forward_at_a_tiny_size", *HEAVY, "-k", "not forward or (bit_m and (r50 or r101x1))"]),
    Check("parity", "R50x1 logits against timm (native and unfold convolutions)",
          ["tests/test_parity.py::test_logits_match_timm", "-m", "parity", "-k", "r50x1 and not onednn"]),
    Check("kernels", "the CPU kernels build, pass their self-check and are used",
          ["tests/test_cpu_kernels.py"]),
    Check("resume", "quickstart step 1, 54 steps: SIGKILL, --resume auto, bit-identical",
          ["tests/test_resume_exact.py::test_sigkill_mid_epoch_then_resume_is_bit_identical", *HEAVY]),
    Check("validate", "validate.py: checkpoints, upstream .npz and mindcv .ckpt, accuracy",
          ["tests/test_validate.py"]),
    Check("msrun", "2-process msrun --join True training equals one process",
          ["tests/test_train.py::test_two_processes_match_single_process", *HEAVY, "-k", "msrun"]),
    Check("onnx", "ONNX export run in onnxruntime (dynamic batch and size)",
          ["tests/test_onnx.py", "-k", "onnx_dynamic or export_form"]),
    Check("mindcv", "mindcv.create_model of bit_zoo names",
          ["tests/test_registry.py::test_mindcv_registry_accepts_bit_zoo_names"]),
]  # fmt: skip


@dataclass
class Cell:
    status: str  # "ok", "FAIL", "refused", "-"
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Row:
    version: str
    cells: dict[str, Cell] = field(default_factory=dict)


def supported_range() -> tuple[str, str]:
    """bit_zoo's supported MindSpore range as _ms_compat states it (read without importing MindSpore)."""
    tree = ast.parse((ROOT / "bit_zoo" / "_ms_compat.py").read_text())
    values = {
        t.id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name) and t.id in ("MINDSPORE_MIN", "MINDSPORE_BELOW")
    }
    return values["MINDSPORE_MIN"], values["MINDSPORE_BELOW"]


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def index_versions(python: str) -> list[str]:
    """The MindSpore releases the configured package index serves for this interpreter, oldest first."""
    out = subprocess.run([python, "-m", "pip", "index", "versions", "mindspore"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"Available versions:\s*(.+)", out)
    if not found:
        raise SystemExit(f"compat: could not read the releases from `pip index versions mindspore`:\n{out}")
    return sorted({v.strip() for v in found.group(1).split(",") if re.fullmatch(r"[\d.]+", v.strip())}, key=_key)


def _run(cmd: list[str], *, cwd: Path, env: dict, timeout: int, log) -> tuple[int, float, str]:
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        code, out = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        code, out = -1, f"{partial}\ntimed out after {timeout} s"
    log.write(f"$ {' '.join(cmd)}\n{out}\n")
    log.flush()
    return code, time.monotonic() - start, out


def make_venv(venv: Path, version: str, *, reuse: bool, env: dict, log) -> Cell:
    if reuse and (venv / "bin" / "python").exists():
        return Cell("reused", 0.0, "a venv made earlier")
    shutil.rmtree(venv, ignore_errors=True)
    start = time.monotonic()
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "-q", "-e", f"{ROOT}[test]", f"mindspore=={version}", NUMPY],
        [str(venv / "bin" / "pip"), "install", "-q", *REFERENCE, NUMPY],
    ]
    for cmd in steps:
        code, _, out = _run(cmd, cwd=ROOT, env=env, timeout=3600, log=log)
        if code != 0:
            return Cell("FAIL", time.monotonic() - start, out.strip().splitlines()[-1] if out.strip() else f"exit {code}")
    return Cell("ok", time.monotonic() - start)


def run_release(version: str, venv: Path, *, checks: list[Check], reuse: bool, log) -> Row:
    row = Row(version)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONPATH=str(ROOT))  # train.py and validate.py live at the root
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # msrun of this venv
    row.cells["install"] = make_venv(venv, version, reuse=reuse, env=env, log=log)
    if row.cells["install"].status not in ("ok", "reused"):
        return row
    python = str(venv / "bin" / "python")
    with tempfile.TemporaryDirectory(prefix=f"bit_zoo_compat_{version}_") as work:
        code, _, out = _run([python, "-c", "import bit_zoo"], cwd=Path(work), env=env, timeout=300, log=log)
        if code != 0:
            last = out.strip().splitlines()[-1] if out.strip() else f"exit {code}"
            status = "refused" if "bit_zoo supports MindSpore" in last else "FAIL"
            for check in checks:
                row.cells[check.name] = Cell(status, 0.0, last)
            return row
        for check in checks:
            cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml")]
            cmd += [a if a.startswith("-") or not a.startswith("tests/") else str(ROOT / a) for a in check.args]
            code, seconds, out = _run(cmd, cwd=Path(work), env=env, timeout=check.timeout, log=log)
            summary = out.strip().splitlines()[-1] if out.strip() else f"exit {code}"
            # a check that selected nothing (exit 5) or skipped everything has not passed
            ok = code == 0 and " passed" in summary and "skipped" not in summary
            row.cells[check.name] = Cell("ok" if ok else "FAIL", seconds, summary)
            print(f"compat: {version} {check.name}: {row.cells[check.name].status} {seconds:.0f} s ({summary})", flush=True)
    return row


def _fmt(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    if cell.status in ("refused", "reused"):
        return cell.status
    return f"{cell.status} {cell.seconds:.0f} s"


def table(rows: list[Row], checks: list[Check]) -> str:
    names = ["install", *[c.name for c in checks]]
    lines = ["| MindSpore | " + " | ".join(names) + " | checks total |", "|---" * (len(names) + 2) + "|"]
    for row in rows:
        total = sum(row.cells[c.name].seconds for c in checks if c.name in row.cells)
        lines.append(f"| {row.version} | " + " | ".join(_fmt(row.cells.get(n)) for n in names) + f" | {total / 60:.1f} min |")
    return "\n".join(lines)


def table_from_csv(path: Path) -> str:
    """The table of a results file, the latest row of each release and check, releases oldest first."""
    rows: dict[str, Row] = {}
    dates: set[str] = set()
    with open(path, newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            row = rows.setdefault(rec["mindspore"], Row(rec["mindspore"]))
            row.cells[rec["check"]] = Cell(rec["status"], float(rec["seconds"]))
            dates.add(rec["date"])
    ordered = [rows[v] for v in sorted(rows, key=_key)]
    return f"{table(ordered, CHECKS)}\n\n{', '.join(sorted(dates))}; '-': not run"


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "?")
    return f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, {platform.system()} {platform.machine()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--versions", nargs="+", help="MindSpore releases (default: every release the index serves)")
    pick.add_argument("--oldest", action="store_true", help="only the oldest supported release the index serves")
    parser.add_argument("--checks", nargs="+", choices=[c.name for c in CHECKS], help="a subset of the smoke set")
    parser.add_argument("--venv_root", type=Path, help="where the venvs go (default: a temporary directory)")
    parser.add_argument("--reuse", action="store_true", help="reuse a venv already under --venv_root")
    parser.add_argument("--keep", action="store_true", help="keep the venvs")
    parser.add_argument("--log", type=Path, help="every command and its output (default: compat.log in --venv_root)")
    parser.add_argument("--csv", type=Path, help="also write the cells as CSV rows (date, machine, release, check, status, seconds)")
    parser.add_argument("--table_from", type=Path, help="print the table of a CSV written by --csv (the latest row per cell); run nothing")
    args = parser.parse_args(argv)
    if args.table_from:
        print(table_from_csv(args.table_from))
        return 0

    low, below = supported_range()
    versions = args.versions or index_versions(sys.executable)
    if args.oldest:
        versions = [min((v for v in versions if _key(low) <= _key(v) < _key(below)), key=_key)]
    checks = [c for c in CHECKS if not args.checks or c.name in args.checks]
    root = args.venv_root or Path(tempfile.mkdtemp(prefix="bit_zoo_compat_"))
    root.mkdir(parents=True, exist_ok=True)
    log_path = args.log or root / "compat.log"
    print(f"compat: MindSpore {', '.join(versions)}; supported range >={low},<{below}; venvs in {root}; log {log_path}", flush=True)
    rows = []
    with open(log_path, "a", encoding="utf-8") as log:
        for version in versions:
            venv = root / f"ms-{version}"
            rows.append(run_release(version, venv, checks=checks, reuse=args.reuse, log=log))
            if not args.keep:
                shutil.rmtree(venv, ignore_errors=True)
    if not args.keep and args.venv_root is None:
        print(f"compat: log kept in {log_path}")
    print(f"\nbit_zoo smoke set per MindSpore release, {date.today().isoformat()}, {machine()}\n")
    print(table(rows, checks))
    for row in rows:
        for name, cell in row.cells.items():
            if cell.status not in ("ok", "reused"):
                print(f"{row.version} {name}: {cell.status}: {cell.detail}")
    if args.csv:
        new = not args.csv.exists()
        with open(args.csv, "a", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["date", "machine", "mindspore", "check", "status", "seconds", "command"])
            for row in rows:
                for name, cell in row.cells.items():
                    cmd = f"python scripts/compat.py --versions {row.version} --checks {name}" if name != "install" else ""
                    w.writerow([date.today().isoformat(), machine(), row.version, name, cell.status, f"{cell.seconds:.0f}", cmd])
    in_range = [r for r in rows if _key(low) <= _key(r.version) < _key(below)]
    failed = [r for r in rows if any(c.status == "FAIL" for c in r.cells.values())]
    refused_in_range = [r for r in in_range if any(c.status == "refused" for c in r.cells.values())]
    return 1 if failed or refused_in_range else 0


if __name__ == "__main__":
    sys.exit(main())
