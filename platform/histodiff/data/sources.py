"""Listing tile sources: unlabeled folders/prefixes and one-folder-per-class labeled sets, checked.

Every source is checked (exists, readable, holds images, a sane class layout) and listed once,
sorted, before any Ray work starts: the listing is the ingest stage's input, by hash.
"""

from __future__ import annotations

import os
import posixpath

from histodiff.storage import Store, is_s3


class IngestError(ValueError):
    """A bad ingest input, reported with the URI and what to do."""


def _source_name(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) or uri




def _list_images(uri: str, what: str, store: Store, extensions: list[str]) -> list[str]:
    store.check_readable(uri)
    files = store.list_files(uri, extensions)
    if not files:
        raise IngestError(f"{what} {uri!r} holds no image files ({', '.join(extensions)}); "
                          "check the path, or set data.extensions")
    return files


def list_unlabeled(sources: list[str], store: Store, extensions: list[str]) -> list[tuple[str, str | None, str]]:
    """Return the sorted (uri, None, dataset) items of every unlabeled source."""
    items = []
    for source in sources:
        files = _list_images(source, "unlabeled source", store, extensions)
        items += [(f, None, _source_name(source)) for f in files]
    return sorted(items)


def list_labeled(source: str, store: Store, extensions: list[str]) -> list[tuple[str, str | None, str]]:
    """Return the sorted (uri, class, dataset) items of a one-folder-per-class source."""
    files = _list_images(source, "labeled source", store, extensions)
    # list_files returns "s3://" + path or a local absolute path under the resolved base
    base = store.resolve(source).path.rstrip("/")
    by_class: dict[str, list[str]] = {}
    for f in files:
        path = f[5:] if is_s3(f) else f
        rel = path[len(base) + 1 :].replace(os.sep, "/")
        if "/" not in rel:
            raise IngestError(f"labeled source {source!r} holds image files directly in it ({rel!r}); it needs "
                              "one folder per class (the NCT-CRC layout: <source>/<CLASS>/<tile>.tif)")
        by_class.setdefault(rel.split("/", 1)[0], []).append(f)
    folders = [d for d in store.list_dirs(source) if not d.startswith((".", "_"))]
    empty = sorted(set(folders) - set(by_class))
    if empty:
        raise IngestError(f"class folder(s) {empty} of labeled source {source!r} hold no image files "
                          f"({', '.join(extensions)}); add tiles or remove the folder(s)")
    name = _source_name(source)
    return sorted((f, label, name) for label, fs in by_class.items() for f in fs)
