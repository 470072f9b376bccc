"""Folders on S3: keys named ``dir/`` that consoles and some servers (SeaweedFS) keep beside the objects.

Example::

    from tf_export_pipeline.storage.s3_folders import emptied_folders, is_folder_marker
    is_folder_marker({"Key": "m/17/"})  # -> True: not a file of the listing
    emptied_folders(["b/m/17/saved_model.pb", "b/m/17/variables/variables.index"])
    # -> ['b/m/17/variables', 'b/m/17']: deepest first, none above the removed tree

S3 has no directories, but such a server lists a folder whose objects were all
deleted as a prefix until the folder itself is deleted by its ``key/`` name;
left, an emptied version folder would still look like a version. Deleting
``key/`` removes only an empty folder, and on a plain S3 bucket, which has no
such key, the request changes nothing.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from typing import Any

from tf_export_pipeline.storage.bucket import split


def is_folder_marker(obj: dict[str, Any]) -> bool:
    """Whether a listed object (a ListObjectsV2 ``Contents`` item) stands for a folder, not a file."""
    return obj["Key"].endswith("/")


def emptied_folders(paths: Iterable[str]) -> list[str]:
    """The folders (``bucket/key``) a removal of ``paths`` may leave empty, deepest first, up to the deepest
    folder common to all of them (never the bucket)."""
    dirs = {posixpath.dirname(p.rstrip("/")) for p in paths}
    if not dirs:
        return []
    top = posixpath.commonpath(sorted(dirs)) if len(dirs) > 1 else next(iter(dirs))
    if not split(top)[1]:
        return []
    folders: set[str] = set()
    for d in dirs:
        while d.startswith(top) and split(d)[1]:
            folders.add(d)
            if d == top:
                break
            d = posixpath.dirname(d)
    return sorted(folders, key=lambda f: (-f.count("/"), f))
