"""``drifted(desired, live)``: has an object the operator owns moved away from what it rendered?

Pure. The reconciler applies its objects with server-side apply, so it owns exactly the fields it
renders: the API server may add defaults (``clusterIP``, ``terminationMessagePath``, a revision
annotation) and other managers may add fields of their own, and neither is drift. Drift is a
rendered field whose live value differs, or a live object that is gone. Lists of objects that all
carry a ``name`` (containers, env, ports, volumes) are matched by name, as server-side apply
merges them; other lists must match element by element. Quantities under ``resources`` compare
by value (the API server writes ``0.5`` back as ``500m``).
"""

from decimal import Decimal
from typing import Any

from kubernetes.utils import parse_quantity

Obj = dict[str, Any]
COMPARED = ("metadata", "spec")  # status and the API server's own metadata never count


def drifted(desired: Obj, live: Obj | None) -> bool:
    """True when ``live`` is missing or differs from ``desired`` in a field ``desired`` sets."""
    if live is None:
        return True
    meta = {k: desired["metadata"][k] for k in ("labels", "annotations", "ownerReferences")
            if k in desired["metadata"]}  # fmt: skip
    wanted = {"metadata": meta, "spec": desired.get("spec", {})}
    return not _covers(wanted, {k: live.get(k) for k in COMPARED}, quantities=False)


def _covers(wanted: Any, live: Any, quantities: bool) -> bool:
    """Does ``live`` hold every field of ``wanted`` with the same value?"""
    if isinstance(wanted, dict):
        if not isinstance(live, dict):
            return False
        return all(
            key in live and _covers(value, live[key], quantities or key == "resources")
            for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        if not isinstance(live, list):
            return False
        if wanted and all(isinstance(w, dict) and "name" in w for w in wanted):
            by_name = {item.get("name"): item for item in live if isinstance(item, dict)}
            return all(
                w["name"] in by_name and _covers(w, by_name[w["name"]], quantities) for w in wanted
            )
        return len(wanted) == len(live) and all(
            _covers(w, v, quantities) for w, v in zip(wanted, live, strict=True)
        )
    if quantities and isinstance(wanted, str) and isinstance(live, str) and wanted != live:
        return _quantity(wanted) is not None and _quantity(wanted) == _quantity(live)
    return bool(wanted == live)


def _quantity(text: str) -> Decimal | None:
    try:
        return Decimal(parse_quantity(text))
    except ValueError:
        return None
