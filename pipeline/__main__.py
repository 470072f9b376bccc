import sys

from tf_export_pipeline.cli import main

sys.exit(main())
