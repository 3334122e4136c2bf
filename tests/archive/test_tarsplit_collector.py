"""The tar-split collector: the native one does exactly what the fallback (its spec) does,
call for call: the same lines from each batch, hash input, caps errors and `unusable`."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aufs import _fallback
from aufs.errors import DiffError
from conftest import NATIVE

chunks = st.binary(max_size=40) | st.binary(min_size=200, max_size=800)
names = st.sampled_from(["a", "./a", "/a/", "a/", "b", "./b/c", "caf\udce9", "日本", "./日本/",
                         "\U0001f600", "/\U0001f600", "./", "/", ""])
calls = st.lists(st.one_of(
    st.tuples(st.just("consume"), chunks),
    st.tuples(st.just("consume_trailing"), chunks),
    st.tuples(st.just("begin_file"), names, st.integers(0, 1 << 40),
              st.sampled_from([False, False, False, True]), chunks),
    st.tuples(st.just("end_file"), chunks),
    st.tuples(st.just("end_segment")),
    st.tuples(st.just("take")),
), max_size=40)


def run(impl: ModuleType, script: list[tuple[Any, ...]], max_entry: int,
        max_total: int) -> list[object]:
    """What each call returned or raised, the hash input and batch_ready calls, the state."""
    seen: list[bytes] = []
    events: list[object] = []

    class Collector(impl.TarSplitCollector):  # type: ignore[name-defined, misc]
        def batch_ready(self) -> None:
            events.append(("batch", impl.tarsplit_lines(*self.take())))

    collector = Collector(max_entry, max_total, lambda piece: seen.append(bytes(piece)))
    for name, *arguments in script:
        if name in ("consume", "consume_trailing", "end_file"):
            arguments = [memoryview(arguments[0])]  # as the reader hands them: views
        elif name == "begin_file":
            arguments[3] = memoryview(arguments[3])
        try:
            result = getattr(collector, name)(*arguments)
            events.append(impl.tarsplit_lines(*result) if name == "take" else result)
        except DiffError as error:
            events.append(("error", str(error)))
            break
    position = collector.position
    events.append((b"".join(seen), position, impl.tarsplit_lines(*collector.take()),
                   collector.position, collector.raw_bytes, collector.unusable))
    return events


@pytest.mark.skipif(NATIVE is None, reason="the native extension was not built")
@settings(max_examples=400, deadline=None)
@given(script=calls, max_entry=st.sampled_from([0, 500, 1 << 20, 1 << 20]),
       max_total=st.sampled_from([1000, 5000, 1 << 20, 1 << 20]))
def test_native_collector_matches_the_fallback(script: list[tuple[Any, ...]], max_entry: int,
                                               max_total: int) -> None:
    assert run(NATIVE, script, max_entry, max_total) == run(_fallback, script, max_entry,
                                                            max_total)


def test_the_collector_records_members_and_segments(impl: ModuleType) -> None:
    collector = impl.TarSplitCollector(1 << 20, 1 << 20)
    collector.begin_file("./a", 3, False, b"H" * 512)
    collector.consume(b"ab")
    collector.end_file(memoryview(b"c"))
    collector.begin_file("b", 0, False, b"P" * 509 + b"H" * 512)
    collector.end_file()
    collector.consume(bytes(1024))
    collector.end_segment()
    expected = [b"H" * 512, ("./a", 3, impl.crc64_iso(0, b"abc")), b"P" * 509 + b"H" * 512,
                ("b", 0, 0), bytes(1024)]
    assert collector.raw_bytes == 512 + 1021 + 1024 and collector.unusable is None
    batch, position = collector.take()
    assert (len(batch), position) == (5, 0)
    assert impl.tarsplit_lines(batch, 7) == _fallback.tarsplit_lines(expected, 7)
    assert collector.position == 5
    batch, position = collector.take()
    assert (len(batch), position, impl.tarsplit_lines(batch, 5)) == (0, 5, b"")


def test_the_collector_keeps_the_caps(impl: ModuleType) -> None:
    collector = impl.TarSplitCollector(1024, 1500)
    with pytest.raises(DiffError, match="in one place"):
        collector.begin_file("a", 0, False, bytes(1025))
    collector = impl.TarSplitCollector(1024, 1500)
    collector.begin_file("a", 0, False, bytes(1000))
    with pytest.raises(DiffError, match="in the archive"):
        collector.begin_file("b", 0, False, bytes(1000))


def test_duplicates_sparse_members_and_trailing_data_make_it_unusable(impl: ModuleType
                                                                       ) -> None:
    for first, second in (("a", "./a"), ("/a/", "a"), ("./d/", "d")):
        collector = impl.TarSplitCollector(1 << 20, 1 << 20)
        collector.begin_file(first, 0, False, b"h")
        assert collector.unusable is None
        collector.begin_file(second, 0, False, b"h")
        assert collector.unusable == f"{second!r} is in the archive twice"
    collector = impl.TarSplitCollector(1 << 20, 1 << 20)
    collector.begin_file("s", 10, True, b"h")
    assert collector.unusable == "'s' is a sparse file"
    collector = impl.TarSplitCollector(100, 1 << 20)
    collector.consume_trailing(bytes(50))
    assert collector.unusable is None
    collector.consume_trailing(bytes(51))
    assert collector.unusable is not None and "after the end" in collector.unusable
    collector.end_segment()
    assert len(collector.take()[0]) == 0  # what was gathered of it is dropped


def test_thousands_of_names_then_one_again(impl: ModuleType) -> None:
    # the native set grows as it fills: every name stays in it
    collector = impl.TarSplitCollector(1 << 20, 1 << 30)
    for index in range(5000):
        collector.begin_file(f"./d{index % 7}/f{index}\u00e9" * (1 + index % 3), 0, False)
    assert collector.unusable is None
    again = "/d4/f4\u00e9./d4/f4\u00e9/"  # the 5th name, written another way
    collector.begin_file(again, 0, False)
    assert collector.unusable == f"{again!r} is in the archive twice"


def test_batch_ready_is_called_once_enough_has_gathered(impl: ModuleType) -> None:
    batches = []

    class Collector(impl.TarSplitCollector):  # type: ignore[name-defined, misc]
        def batch_ready(self) -> None:
            batches.append(self.take())

    collector = Collector(1 << 20, 1 << 30)
    for index in range(_fallback.TARSPLIT_BATCH_ITEMS // 2):
        collector.begin_file(f"f{index}", 0, False, b"h")
        collector.end_file()
    assert [len(batch) for batch, _ in batches] == [_fallback.TARSPLIT_BATCH_ITEMS]
    collector.begin_file("big", 0, False, bytes(_fallback.TARSPLIT_BATCH_BYTES))
    collector.end_file()
    assert [(len(batch), position) for batch, position in batches] == [
        (_fallback.TARSPLIT_BATCH_ITEMS, 0), (2, _fallback.TARSPLIT_BATCH_ITEMS)]
