"""What TF Serving serves under each ``serving.policy``, and which policy a store's promotion calls for.

Example::

    from tf_export_pipeline.serving.config_file import EntryState
    from tf_export_pipeline.serving.policy import served_version
    assert served_version([1, 2, 3], EntryState([1, 2], {"stable": 1}, "specific")) == 2
    assert served_version([1, 2, 3]) == 3       # the server watches the export base itself

Under ``policy: newest`` each publish lists its version alone once the version
is whole against its manifest's file list: TF Serving's ``latest``, except that
the server meets a version only through the file. Where a version folder is
listed from its first copied object (promotion ``object_move``), watching the
folders would let the server load a version still being copied.
"""

from __future__ import annotations

from collections.abc import Iterable

from tf_export_pipeline.publish.versioning import MAX_VERSION
from tf_export_pipeline.serving.config_file import EntryState


def newest_advice(promotion: str, serving) -> str | None:
    """Why ``serving.policy: newest`` should be set, or None: promotion ``object_move`` makes a version
    folder visible object by object, and TF Serving watching the folders may meet it partial."""
    if promotion != "object_move" or (serving is not None and serving.policy != "latest"):
        return None
    how, fix = (("without a serving: section", "add a serving: section with policy: newest") if serving is None
                else ("under serving.policy: latest", "set serving.policy: newest"))
    return (f"promotion is object_move here, so a version folder is listed from its first copied object and "
            f"TF Serving watching the export base {how} may load a version before it is whole; {fix} "
            f"(TF Serving started on its model config file) to serve each new version only once it is whole")


def served_version(whole: Iterable[int], state: EntryState | None = None) -> int | None:
    """The version TF Serving serves to a request that names none, as the model config file says.

    With a ``specific`` list the highest listed version that is whole; under
    ``latest`` (or ``all``) the highest whole version; with no entry none, as
    a server started on the file does not know the model. ``state`` None: the
    server watches the export base itself (``--model_base_path``), so the
    highest. A name beyond int64 is no version to TF Serving.
    """
    candidates = {v for v in whole if 0 <= v <= MAX_VERSION}
    if state is not None and state.policy == "none":
        return None
    if state is not None and state.policy == "specific":
        candidates &= set(state.listed)
    return max(candidates, default=None)
