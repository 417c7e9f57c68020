"""The catalogue writes (create, replace, merge-patch, delete) as rules on one packed record.

The owning shard calls `apply` with the record it holds at the moment the write comes out of
its inbox, so a condition (If-Match, If-None-Match, a client version) is checked against the
state the write actually lands on: of many writers racing with the same ETag exactly one
wins, without a lock. The front end has checked every field's type and range already
(productd.http.product_input); what is left here needs the stored state.
"""

from __future__ import annotations

from productd.store.record import pack_fields, unpack, unpack_fields

# Write operations, as the Write message carries them.
CREATE, PUT, PATCH, DELETE = 0, 1, 2, 3
# Outcomes: the first item of a write's reply; the second is the outcome's value.
OK = 0  # the new packed record (None after a delete)
CREATED = 1  # the new packed record
NOT_FOUND = 2  # None
EXISTS = 3  # the revision of the product that is there
PRECONDITION_FAILED = 4  # the current revision, or None when there is no product
STALE = 5  # the stored version, which the write's version does not exceed
INVALID = 6  # a message naming what is wrong
FAILED = 7  # (from the shard) a message: the write was applied but could not be committed

# A condition: None, ANY ("*") or a tuple of revisions the current one must be among.
ANY = "*"


def apply(
    current: bytes | None,
    op: int,
    fields: dict | None,
    if_match: str | tuple | None,
    if_none_match: str | None,
    now_ns: int,
    revision: int,
) -> tuple[int, object]:
    """(outcome, value); for OK and CREATED the value is the record to store (None: delete it)."""
    if if_match is not None and (current is None or (if_match != ANY and unpack_fields(current)[5] not in if_match)):
        return PRECONDITION_FAILED, None if current is None else unpack_fields(current)[5]
    if if_none_match is not None and current is not None:
        return PRECONDITION_FAILED, unpack_fields(current)[5]
    if op == DELETE:
        return (NOT_FOUND, None) if current is None else (OK, None)
    if op == CREATE and current is not None:
        return EXISTS, unpack_fields(current)[5]
    if op == PATCH and current is None:
        return NOT_FOUND, None
    fields = fields or {}
    version = fields.get("version")
    if current is None:
        values = _from_fields(fields, {})
        created_at_ns = now_ns
    else:
        old = unpack(current)
        if version is not None and old.version is not None and version <= old.version:
            return STALE, old.version
        if version is None:
            version = old.version
        created_at_ns = old.created_at_ns
        values = _from_fields(fields, old._asdict() if op == PATCH else {})
    user_id, name = values["user_id"], values["name"]
    described = values["description"] is not None or bool(values["images"])
    if (user_id is None) != (name is None) or (described and user_id is None):
        return INVALID, "a catalogued product needs both user_id and name"
    # An image kept in the new list keeps its result (results are per URL); pack_fields drops the
    # results of URLs no longer shown, so a job of the old list can never show on the new one.
    results = None if current is None else unpack(current).image_results
    details = None if user_id is None else (user_id, name, values["description"], tuple(values["images"]), results)
    record = pack_fields(values["price"], values["stock"], version, now_ns, created_at_ns, revision, details)
    return (CREATED if current is None else OK), record


def _from_fields(fields: dict, base: dict) -> dict:
    """A PUT (empty base) or a merge patch (base: the stored product): None clears a field."""
    values = {}
    for name in ("price", "stock", "user_id", "name", "description"):
        values[name] = fields[name] if name in fields else base.get(name)
    images = fields["images"] if "images" in fields else base.get("images")
    values["images"] = images or ()
    return values
