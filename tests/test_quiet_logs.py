"""What a stage writes to stderr (an Airflow task's log): its own lines and TensorFlow's real
warnings, not TensorFlow's start-up chatter at level error (oneDNN, CUDA probes on a CPU machine).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

from tests.conftest import REPO, make_workspace

# absl's prefix for error and fatal lines (E1123 12:00:00.000 ... or E0000 00:00:... before absl is set up).
ERROR_LINE = re.compile(r"^[EF]\d{4} ", re.MULTILINE)

STAGES = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline import stages
    cfg = load_config(sys.argv[1])
    staged = stages.stage_export(cfg, None)
    validated = stages.stage_validate(cfg, staged)
    published = stages.stage_publish(cfg, validated)
    print(published.status, published.version)
""")


def test_stage_logs_carry_no_tensorflow_startup_errors(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}  # as a task starts: nothing set
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", STAGES, str(ws.config)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[0] == "published"
    assert not ERROR_LINE.search(proc.stderr), proc.stderr
    for chatter in ("cuInit", "oneDNN custom operations", "Could not find cuda drivers"):
        assert chatter not in proc.stderr, proc.stderr


def test_quiet_import_keeps_what_is_not_startup_chatter(tmp_path):
    # A stand-in for TensorFlow whose import writes one chatter line and one real warning to fd 2.
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(textwrap.dedent("""
        import os
        os.write(2, b"E0000 00:00:1 1 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\\n")
        os.write(2, b"W0000 00:00:1 1 some_op.cc:7] a real warning about the model\\n")
        class _T:
            def __add__(self, other):
                return self
        def constant(value):
            return _T()
    """))
    script = "from tf_export_pipeline.quiet_tf import import_tensorflow_quietly as q; q(); print('imported')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(REPO)])}
    env.pop("TF_EXPORT_VERBOSE", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "imported", proc.stderr
    assert "a real warning about the model" in proc.stderr
    assert "cuInit" not in proc.stderr


def test_first_op_is_filtered_when_tensorflow_was_imported_before(tmp_path):
    # A model factory (or the parent a process was forked from) imported TensorFlow first: the CUDA
    # probe runs at the first op, and it still runs under the filter.
    script = textwrap.dedent("""
        import os
        import tensorflow
        pid = os.fork()
        if pid == 0:
            from tf_export_pipeline.quiet_tf import import_tensorflow_quietly
            tf = import_tensorflow_quietly()
            print(int(tf.constant(2) * 3), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP") and k != "TF_EXPORT_VERBOSE"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "6", proc.stderr
    assert "cuInit" not in proc.stderr and not ERROR_LINE.search(proc.stderr), proc.stderr
