"""Publishing: version numbers are claimed, not guessed; each checkpoint is published once.

Example::

    from tf_export_pipeline.publish import Publisher
    from tf_export_pipeline.storage import open_storage
    pub = Publisher(open_storage("/srv/models/m"))
    print(pub.versions(), pub.live_version())

The export base holds, besides the integer version directories TF Serving loads::

    _exports/claims/<version>        create-only: who owns a version number (publish.claims)
    _exports/ledger/<ledger-key>     create-only: checkpoint identity + config -> version (publish.ledger)
    _exports/leases/<staging name>   renewed while staging is in use (publish.staging)

:class:`Publisher` (``publish.publisher``) runs a publish in that order and
finishes committed ones; ``publish.manifest`` writes and checks each version's
manifest, ``publish.promotion`` turns staging into a version on each store,
``publish.versioning`` proposes numbers, and ``publish.storage_check`` refuses
a store whose create-only writes are not.
"""

from tf_export_pipeline.publish.claims import CLAIM_TTL_SECONDS
from tf_export_pipeline.publish.ledger import UNKNOWN
from tf_export_pipeline.publish.publisher import Publisher
from tf_export_pipeline.publish.staging import StagingGone
from tf_export_pipeline.publish.versioning import first_candidate, training_order

__all__ = ["CLAIM_TTL_SECONDS", "UNKNOWN", "Publisher", "StagingGone", "first_candidate", "training_order"]
