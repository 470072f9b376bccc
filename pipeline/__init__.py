"""tf-export-pipeline: checkpoints in, TensorFlow Serving versions out, never half-written.

The core library. It never imports Airflow, and imports TensorFlow only inside
the functions that need it.
"""

__version__ = "0.1.0"
