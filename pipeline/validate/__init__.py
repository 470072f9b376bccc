"""The validation gate: a staged SavedModel is loaded in a fresh process, as TF Serving loads it, and checked.

Example::

    from tf_export_pipeline.validate import validate_saved_model
    report = validate_saved_model("/srv/models/m/temp-1732147260-ab12")
    print(report["ok"], report["loader"], [c["name"] for c in report["checks"]])

An in-process load can hide a missing file (the model's variables are already in
memory), so the load, the signature checks and the smoke inference run in a new
Python process (:mod:`tf_export_pipeline.validate.worker`); this module starts it and
reads its JSON report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from tf_export_pipeline.errors import ValidationError
from tf_export_pipeline.validate.contract import check_contract, diff_signatures, load_contract
from tf_export_pipeline.validate.signatures import signatures_of  # noqa: F401 - part of this package's surface

# How the worker loads the model, recorded in each report. "session" is TF Serving's path: the meta graph
# tagged "serve" imported into a Session, its restore and init ops run, each signature run by the tensor
# names of its SignatureDef. tf.saved_model.load is not used: it reads the TF2 object graph and accepts
# SavedModels TF Serving refuses (one with no "serve" meta graph, for one).
LOADER = "session"
_LOADER_DESCRIPTIONS = {LOADER: "as TF Serving: the 'serve' meta graph in a Session, signatures run by tensor name"}


def _worker_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env


class ValidationSession:
    """One validation process that loads each SavedModel in turn (for backfills).

    Each version is still loaded from disk by a process that never held the
    exporter's objects; only Python's start-up and the TensorFlow import are
    shared. The process is replaced after ``max_loads`` models, or when it dies
    or times out.
    """

    def __init__(self, max_loads: int = 50):
        self.max_loads = max_loads
        self._proc: subprocess.Popen[str] | None = None
        self._loads = 0
        self._ready = False
        self._references: dict[str, str] = {}
        self._reference_dir: str | None = None

    def local_reference(self, key: str, fetch) -> str:
        """A local copy of the reference version ``key`` (its URL), made by ``fetch(directory)`` the first
        time it is asked for and kept until :meth:`close`: a backfill on cloud storage downloads it once,
        and the worker, seeing the same path, keeps it loaded."""
        if key not in self._references:
            if self._reference_dir is None:
                self._reference_dir = tempfile.mkdtemp(prefix="tf-export-reference-")
            local = os.path.join(self._reference_dir, str(len(self._references)))
            fetch(local)
            self._references[key] = local
        return self._references[key]

    def start(self) -> ValidationSession:
        """Start the process without waiting for it, so its start-up overlaps other work."""
        if self._proc is None:
            self._proc = subprocess.Popen([sys.executable, "-m", "tf_export_pipeline.validate.worker", "--serve"],
                                          env=_worker_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True, bufsize=1)
            self._loads = 0
            self._ready = False
        return self

    def _ensure_ready(self, timeout: float) -> bool:
        """Wait (up to ``timeout``) for the process to have imported TensorFlow; False if it died or hung."""
        import threading

        if self._proc is None or self._proc.poll() is not None or self._loads >= self.max_loads:
            self.close()
            self.start()
        proc = self._proc
        assert proc is not None and proc.stdout is not None  # start() opened it, with a pipe for its output
        if not self._ready:
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            try:
                self._ready = bool(proc.stdout.readline().strip())
            finally:
                timer.cancel()
            if not self._ready:
                self.close()
        return self._ready

    def validate(self, path: str, *, samples=None, expected=None, rtol=1e-5, atol=1e-6, timeout=300,
                 timing: dict | None = None) -> dict:
        import threading

        started = time.monotonic()
        # The time limit covers the wait for the process to start, as it covers a fresh process's start-up.
        if not self._ensure_ready(timeout):
            if time.monotonic() - started >= timeout:
                return _failed(path, f"validation did not finish within {timeout:.0f} s")
            return _failed(path, "validation process died while starting (the TensorFlow import failed)")
        request = {"saved_model": path, "samples": samples, "expected": expected, "rtol": rtol, "atol": atol,
                   "timing": timing}
        proc = self._proc
        # _ensure_ready() returned True: the process is running, started with pipes for its input and output.
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        timer = threading.Timer(max(timeout - (time.monotonic() - started), 0.1), proc.kill)
        timer.start()
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        finally:
            timer.cancel()
        self._loads += 1
        if not line.strip():
            self.close()
            timed_out = time.monotonic() - started >= timeout
            return _failed(path, f"validation did not finish within {timeout:.0f} s" if timed_out
                           else "validation process died")
        report = json.loads(line)
        report["seconds"] = round(time.monotonic() - started, 3)
        return report

    def close(self) -> None:
        if self._reference_dir is not None:
            shutil.rmtree(self._reference_dir, ignore_errors=True)
            self._reference_dir = None
            self._references.clear()
        if self._proc is not None:
            try:
                if not self._ready:
                    self._proc.kill()  # still starting: it has validated nothing, and waiting would cost seconds
                assert self._proc.stdin is not None  # start() opened it with a pipe for its input
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def validate_saved_model(path: str, *, samples: str | None = None, expected: str | None = None,
                         rtol: float = 1e-5, atol: float = 1e-6, timeout: float = 300,
                         session: ValidationSession | None = None, timing: dict | None = None) -> dict:
    """Run the fresh-process checks on the SavedModel at ``path`` (a local directory).

    Returns the report; it has ``ok`` False and a ``reason`` when a check failed.
    With a ``session``, its long-lived validation process does the loading. With ``timing``
    (``{"reference": DIR or None, "rounds": N, "max_ratio": R or None}``), the report's ``latency``
    holds the model's latency, against the reference SavedModel at DIR when one is given
    (:mod:`tf_export_pipeline.validate.latency`).
    """
    if session is not None:
        return session.validate(path, samples=samples, expected=expected, rtol=rtol, atol=atol, timeout=timeout,
                                timing=timing)
    with tempfile.TemporaryDirectory(prefix="tf-export-validate-") as tmp:
        report_path = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "tf_export_pipeline.validate.worker", path, "--report", report_path,
               "--rtol", repr(rtol), "--atol", repr(atol)]
        if samples:
            cmd += ["--samples", samples]
        if expected:
            cmd += ["--expected", expected]
        if timing is not None:
            cmd += ["--timing", json.dumps(timing)]
        env = _worker_env()
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return _failed(path, f"validation did not finish within {timeout:.0f} s")
        if not os.path.exists(report_path):
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            return _failed(path, f"validation process died (exit {proc.returncode}: {tail[0][:200]})")
        with open(report_path, encoding="utf-8") as fh:
            report = json.load(fh)
        report["seconds"] = round(time.monotonic() - started, 3)
        return report


def check_signatures(report: dict, validation, live_signatures: dict | None = None,
                     live_version: int | str | None = None) -> dict:
    """The config's ``validation.contract`` (when set) and the diff against ``live_signatures`` added to
    ``report``, under ``validation.allow_breaking``. ``validation`` may be None (no config)."""
    contract = load_contract(validation.contract) if validation is not None and validation.contract else None
    return apply_signature_checks(report, contract=contract, live_signatures=live_signatures,
                                  live_version=live_version,
                                  allow_breaking=bool(validation is not None and validation.allow_breaking))


def apply_signature_checks(report: dict, *, contract: dict | None = None, live_signatures: dict | None = None,
                           live_version: int | str | None = None, allow_breaking: bool = False) -> dict:
    """Add the contract check and the diff against the live version to a worker report."""
    found = report.get("signatures")
    if found is None:
        return report
    checks = report.setdefault("checks", [])
    if contract is not None:
        problems = check_contract(contract, found)
        checks.append({"name": "signature_contract", "ok": not problems, "detail": "; ".join(problems)})
    if live_signatures is not None:
        diff = diff_signatures(live_signatures, found)
        diff["against"] = live_version
        report["diff"] = diff
        ok = allow_breaking or not diff["breaking"]
        detail = "; ".join(diff["breaking"]) if diff["breaking"] else ""
        if diff["breaking"] and allow_breaking:
            detail = "allowed by validation.allow_breaking: " + detail
        elif not diff["breaking"]:
            detail = "; ".join(diff["additions"] + diff["widened"]) or "no signature change"
        label = f"compatible_with_live_version_{live_version}" if live_version is not None else "compatible_with_live"
        checks.append({"name": label, "ok": ok, "detail": detail})
    reason = next((c["detail"] or c["name"] for c in checks if not c["ok"]), None)
    report["ok"] = reason is None
    if reason:
        report["reason"] = reason
    else:
        report.pop("reason", None)
    return report


def _failed(path: str, reason: str) -> dict:
    return {"ok": False, "saved_model": path, "loader": LOADER, "reason": reason,
            "checks": [{"name": "fresh_process_load", "ok": False, "detail": reason}]}


def require_ok(report: dict, path: str) -> None:
    """Raise :class:`ValidationError` with the report's reason when it failed."""
    if not report.get("ok"):
        raise ValidationError(f"validation failed: {report.get('reason', 'unknown reason')}: {path}")


def format_report(report: dict) -> str:
    """Human-readable report, in the spirit of ``saved_model_cli show --all``."""
    lines = [f"SavedModel: {report.get('saved_model')}", f"Result: {'PASS' if report.get('ok') else 'FAIL'}"]
    if not report.get("ok"):
        lines.append(f"Reason: {report.get('reason')}")
    if report.get("loader"):
        about = _LOADER_DESCRIPTIONS.get(report["loader"])
        lines.append(f"Loader: {report['loader']}" + (f" ({about})" if about else ""))
    for key, sig in sorted((report.get("signatures") or {}).items()):
        lines.append(f"\nsignature_def['{key}']:  method: {sig.get('method')}")
        for kind in ("inputs", "outputs"):
            lines.append(f"  {kind}:")
            for name, t in sorted(sig.get(kind, {}).items()):
                lines.append(f"    {name}: dtype={t['dtype']} shape={t['shape']}")
    lines.append("\nChecks:")
    for check in report.get("checks", []):
        mark = "ok  " if check.get("ok") else "FAIL"
        detail = f"  {check['detail']}" if check.get("detail") else ""
        lines.append(f"  [{mark}] {check['name']}{detail}")
    diff = report.get("diff")
    if diff:
        lines.append(f"\nAgainst version {diff.get('against')}:")
        for kind in ("breaking", "additions", "widened"):
            for item in diff.get(kind, []):
                lines.append(f"  {kind[:-1] if kind != 'breaking' else 'breaking'}: {item}")
        if not any(diff.get(k) for k in ("breaking", "additions", "widened")):
            lines.append("  no signature change")
    if "parity_max_abs_diff" in report:
        lines.append(f"\nParity with the checkpoint: max |diff| = {report['parity_max_abs_diff']:.3g}")
    lines += _latency_lines(report.get("performance") or {})
    if "seconds" in report:
        lines.append(f"\nValidated in {report['seconds']:.2f} s (fresh process)")
    return "\n".join(lines)


def _latency_lines(performance: dict) -> list[str]:
    """Median and p99 per batch size of the candidate and the reference, as measured by the gate."""
    candidate = (performance.get("candidate") or {}).get("latency_ms")
    if not candidate:
        return []
    reference = (performance.get("reference") or {}).get("latency_ms") or {}
    version = (performance.get("reference") or {}).get("version")
    lines = [f"\nLatency over {performance.get('rounds')} interleaved rounds (median / p99 ms):"]
    for label, figures in candidate.items():
        line = f"  {label.replace('_', ' of ')}: candidate {figures['median']:.3g} / {figures['p99']:.3g}"
        if label in reference:
            ratio = (performance.get("latency_ratios") or {}).get(label)
            line += (f", version {version} {reference[label]['median']:.3g} / {reference[label]['p99']:.3g}"
                     + (f", ratio {ratio:.2f}" if ratio is not None else ""))
        lines.append(line)
    return lines
