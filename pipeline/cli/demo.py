"""``tf-export demo``: a tiny model trained, exported, published and its labels moved, each step shown."""

from __future__ import annotations

import os
import sys

from tf_export_pipeline.cli.exports import run_line
from tf_export_pipeline.cli.output import EXIT_OK, emit, table
from tf_export_pipeline.config import load_config
from tf_export_pipeline.demo import SERVING, train, write_config
from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.records import public, to_json
from tf_export_pipeline.serving import ServingControl
from tf_export_pipeline.stages import run_once, status


def cmd_demo(args, _cfg) -> int:
    workdir = os.path.abspath(args.workdir)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    train_dir = os.path.join(workdir, "train")
    say(f"[1/7] training a tiny Keras model in {workdir}/train (2 checkpoints)")
    train(train_dir, steps=20, checkpoint_every=10)
    config_path = write_config(workdir, serving=SERVING)
    say(f"[2/7] wrote config {config_path} (serving: labels in {SERVING['model_config_file']})")
    cfg = load_config(config_path)
    serving = cfg.serving
    assert serving is not None, "the demo's config has a serving: section"
    control = ServingControl.from_config(cfg)
    steps: list[dict] = []

    def labelled(record: dict) -> dict:
        if record.get("serving_error"):
            raise PipelineError(f"published, but its serving label was not set: {record['serving_error']}")
        return record

    def show(what: str) -> None:
        """The labels and the model config file as TF Serving reads it, after a step."""
        view = control.view()
        with open(serving.model_config_file, encoding="utf-8") as fh:
            text = fh.read()
        steps.append({"step": what, "labels": view["labels"], "versions": view["versions"], "file": text})
        labels = ", ".join(f"{k}={v}" for k, v in sorted(view["labels"].items())) or "none"
        say(f"      labels: {labels}; listed: {view['versions']}; {serving.model_config_file}:")
        say("\n".join("        " + line for line in text.rstrip().splitlines()))

    first = labelled(to_json(run_once(cfg)))
    say(f"[3/7] first run:  {run_line(first)}")
    if (first.get("labels") or {}).get("stable") == first.get("version"):
        say("      labelled canary, and stable: no version was stable yet")
    show("publish")
    second = to_json(run_once(cfg))
    say(f"[4/7] second run: {run_line(second)}")
    say("[5/7] training 10 more steps, then a third run:")
    train(train_dir, steps=10, checkpoint_every=10)
    third = labelled(to_json(run_once(cfg)))
    stable = (third.get("labels") or {}).get("stable")
    say(f"      {run_line(third)}\n      labelled canary; stable stays {stable}")
    show("publish as canary")
    control.promote(third["version"], label="stable")
    say(f"[6/7] tf-export promote {third['version']}: stable -> {third['version']}")
    show("promote")
    back = control.rollback()
    say(f"[7/7] tf-export rollback: stable -> {back['labels_after'].get('stable')} (the previous stable)")
    show("rollback")

    st = status(cfg)
    labels = steps[-1]["labels"]
    result = {"workdir": workdir, "config": config_path, "runs": [public(first), public(second), public(third)],
              "status": st, "model_config_file": serving.model_config_file, "serving": steps}
    if args.json:
        emit(args, result, "")
    else:
        rows = [[v["version"], v["step"], v["checkpoint"],
                 ", ".join(sorted(k for k, n in labels.items() if n == v["version"]))] for v in st["versions"]]
        print("\n" + table(rows, ["VERSION", "STEP", "CHECKPOINT", "LABELS"]))
        print(f"\nExport base (the model's base_path in the model config file): {cfg.export_base}")
        for root, _dirs, files in sorted(os.walk(cfg.export_base)):
            depth = root[len(cfg.export_base):].count(os.sep)
            if depth > 2 or "/_exports/" in root + "/":
                continue
            print("  " * depth + (os.path.basename(root) or root) + "/")
            for f in sorted(files):
                print("  " * (depth + 1) + f)
        print(f"\nServe the labels: tensorflow_model_server --rest_api_port=8501 "
              f"--model_config_file={serving.model_config_file} --model_config_file_poll_wait_seconds=60")
        print(f"  with serving.reload_seconds: 60 in {config_path} (the demo moves labels at once: no server "
              f"reads its file); clients POST /v1/models/{serving.model_name}/labels/stable:predict "
              f"(or labels/canary)")
        print(f"\nTry: tf-export status --config {config_path}")
        print(f"     tf-export labels --config {config_path}")
        print(f"     tf-export history --config {config_path}")
    return EXIT_OK
