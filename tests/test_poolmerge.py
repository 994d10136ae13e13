"""The pool's merge of a keys document read from the store with the one a box held
(``accounts/_poolkeys.merge``), as pure code: what it keeps of the box's (revocations,
rotations, keys the store lost) and what it never does (make a key usable that the box knows
revoked or replaced, undo the store's own changes, write twice)."""

from __future__ import annotations

import datetime as dt

import attrs
from hypothesis import given
from hypothesis import strategies as st

from trio_bridge.accounts._keys import SecretEntry, _parse_iso
from trio_bridge.accounts._poolkeys import merge

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC).timestamp()


def iso(offset: float) -> str:
    """NOW + ``offset`` seconds, as the keys file writes times."""
    t = dt.datetime.fromtimestamp(NOW + offset, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def entry(name: str, ident: str, **kw: str) -> SecretEntry:
    return SecretEntry(name=name, id=ident, sha256=ident * 8, created=iso(-86400), **kw)


def by_id(*entries: SecretEntry) -> dict[str, SecretEntry]:
    return {e.id: e for e in entries}


def test_a_rotation_the_store_lost_is_restored_the_old_secret_ending_as_it_did() -> None:
    """The store holds alice's old key unreplaced (its document predates the rotation: a
    box that missed the rotation wrote it back after a restart); a box that saw the
    rotation marks the old one replaced again, ending when it did, and puts the new one
    back."""
    old = entry("alice", "old00001")
    new = entry("alice", "new00001")
    rotated = attrs.evolve(old, replaced=iso(-60), expires=iso(-60))  # grace 0, a minute ago
    out, lacking = merge(by_id(old), by_id(rotated, new), fresh=True, now=NOW)
    assert lacking is not None
    assert (lacking.replaced, lacking.added, lacking.revoked) == ((old.id,), (new.id,), ())
    assert out[old.id] == rotated and not out[old.id].usable(NOW)
    assert out[new.id] == new
    # a grace still running ends when it did, not later (the store's entry had no end)
    graced = attrs.evolve(old, replaced=iso(-60), expires=iso(3600))
    out, _ = merge(by_id(old), by_id(graced, new), fresh=True, now=NOW)
    assert out[old.id].expires == iso(3600) and out[old.id].usable(NOW)
    # nor later than the store's own end, if that is sooner
    ending = attrs.evolve(old, expires=iso(600))
    out, _ = merge(by_id(ending), by_id(graced, new), fresh=True, now=NOW)
    assert out[old.id].expires == iso(600)


def test_a_box_away_too_long_marks_the_old_secret_but_brings_back_nothing() -> None:
    """Not fresh (the box's document is older than revocations are kept): marking a key
    replaced only takes use away, so it is done; the new key is not put back."""
    old, new = entry("alice", "old00001"), entry("alice", "new00001")
    rotated = attrs.evolve(old, replaced=iso(-60), expires=iso(-60))
    out, lacking = merge(by_id(old), by_id(rotated, new), fresh=False, now=NOW)
    assert lacking is not None and lacking.added == () and new.id not in out
    assert not out[old.id].usable(NOW)


def test_a_rotations_old_secret_ends_at_the_soonest_end_either_side_knows() -> None:
    """A replaced secret can only end sooner (`keys set` refuses a later end): where both
    hold it replaced, the sooner end wins, whichever side holds it; one the store dropped
    does not come back (dropped by hand or by an older version: ended either way)."""
    old, new = entry("alice", "old00001"), entry("alice", "new00001")
    soon = attrs.evolve(old, replaced=iso(-60), expires=iso(60))
    late = attrs.evolve(old, replaced=iso(-60), expires=iso(7200))
    assert merge(by_id(soon, new), by_id(late, new), fresh=True, now=NOW) == (
        by_id(soon, new),
        None,
    )
    out, lacking = merge(by_id(late, new), by_id(soon, new), fresh=True, now=NOW)
    assert out[old.id] == soon and lacking is not None and lacking.replaced == (old.id,)
    ours = by_id(soon, new)
    assert merge(by_id(new), ours, fresh=True, now=NOW) == (by_id(new), None)


def test_a_later_rotation_is_not_undone_by_the_order_the_boxes_come_back() -> None:
    """After a store restarted empty: Y missed both rotations of alice and is back first,
    X saw the first (1 h grace), W both (the second, grace 0 after a leak, ended A and B a
    minute ago). Whatever the order X and W come back in, A and B stay ended and C works
    (outside review: A lived its hour again when X came back before W)."""
    a, b, c = entry("alice", "aaaaaaaa"), entry("alice", "bbbbbbbb"), entry("alice", "cccccccc")
    y = by_id(a)
    x = by_id(attrs.evolve(a, replaced=iso(-3600), expires=iso(3600)), b)
    w = by_id(
        attrs.evolve(a, replaced=iso(-3600), expires=iso(-60)),
        attrs.evolve(b, replaced=iso(-60), expires=iso(-60)),
        c,
    )
    for order in ((x, w), (w, x)):
        out = y
        for box in order:
            out = merge(out, box, fresh=True, now=NOW)[0]
        assert all(merge(out, box, fresh=True, now=NOW)[1] is None for box in (x, w))
        assert not out[a.id].usable(NOW)
        assert b.id not in out or not out[b.id].usable(NOW)
        assert out[c.id].usable(NOW)


NAMES = st.sampled_from(["alice", "bob"])
TIMES = st.sampled_from(["", iso(-7200), iso(-60), iso(60), iso(7200)])


@st.composite
def documents(draw: st.DrawFn) -> dict[str, SecretEntry]:
    """Entries over a few ids, names and times: revoked, replaced, expired or not."""
    ids = draw(st.lists(st.sampled_from([f"id{i:06d}" for i in range(6)]), unique=True))
    return by_id(
        *(
            entry(
                draw(NAMES),
                i,
                expires=draw(TIMES),
                revoked=draw(st.sampled_from(["", iso(-3600)])),
                replaced=draw(st.sampled_from(["", iso(-3600)])),
            )
            for i in ids
        )
    )


@given(documents(), documents(), st.booleans())
def test_merge_takes_no_use_the_box_knows_ended_and_writes_once(
    theirs: dict[str, SecretEntry], ours: dict[str, SecretEntry], fresh: bool
) -> None:
    out, lacking = merge(theirs, ours, fresh=fresh, now=NOW)
    assert (lacking is None) == (out == theirs)
    for i, e in out.items():
        mine, store = ours.get(i), theirs.get(i)
        if mine is not None and mine.revoked:
            assert e.revoked  # revoked stays revoked
        if mine is not None and mine.replaced:
            assert e.replaced or e.revoked  # replaced stays replaced (or revoked) ...
            if store is not None and not e.revoked:  # ... ending no later than either said
                for end in (mine.expires, store.expires):
                    assert not end or (e.expires and _parse_iso(e.expires) <= _parse_iso(end))
        if store is None:  # taken from the box: revoked, or usable by a fresh box
            assert e == mine or (mine is not None and e.revoked)
            assert e.revoked or (fresh and e.usable(NOW))
        elif e != store:  # changed from the store's: only ever less usable
            assert not (e.usable(NOW) and not store.usable(NOW))
    # what a box writes back, merged again with what it knew, lacks nothing: it writes once
    assert merge(out, ours, fresh=fresh, now=NOW)[1] is None
