"""Seeds the docker-compose demo: trains the demo model's checkpoints and copies them into fake-gcs-server.

Runs once before Airflow starts (service `demo-data`, as AIRFLOW_UID: `airflow-init` has
handed /data to that user): the checkpoints land in /data/demo/train
(deploy/configs/demo.yaml) and in gs://tf-export-demo/train (deploy/configs/demo_gcs.yaml).
Nothing is done twice on a restart.
"""

from __future__ import annotations

import glob
import os

TRAIN = "/data/demo/train"
BUCKET = "tf-export-demo"
GCS_ENDPOINT = os.environ.get("DEMO_GCS_ENDPOINT", "http://fake-gcs:4443")


def main() -> None:
    from tf_export_pipeline.demo import train

    if not glob.glob(os.path.join(TRAIN, "*.index")):
        print("training the demo model into", TRAIN, flush=True)
        train(TRAIN, steps=30, checkpoint_every=10)

    import gcsfs

    fs = gcsfs.GCSFileSystem(endpoint_url=GCS_ENDPOINT, token="anon", project="demo")
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    if not fs.exists(f"{BUCKET}/train/checkpoint"):
        # data shards first, then the indexes, then the state file: the order a training job writes them
        names = sorted(os.listdir(TRAIN), key=lambda n: (n == "checkpoint", n.endswith(".index"), n))
        for name in names:
            fs.put_file(os.path.join(TRAIN, name), f"{BUCKET}/train/{name}")
        print(f"copied {len(names)} files to gs://{BUCKET}/train", flush=True)


if __name__ == "__main__":
    main()
