"""Docker's aufs mount data, byte for byte: golden vectors and native/fallback parity."""

from __future__ import annotations

import hashlib
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aufs import _fallback
from conftest import NATIVE

XINO = ",dio,xino=/dev/shm/aufs.xino"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def chain_126(root: str) -> tuple[str, list[str]]:
    """TestMountMoreThan42Layers: the top of 126 layers and its 125 parents, nearest first."""
    ids = [sha(str(i)) for i in range(1, 127)]
    rw = f"{root}/diff/{ids[-1]}"
    return rw, [f"{root}/diff/{layer}" for layer in reversed(ids[:-1])]


# ---- hand-checked vectors -------------------------------------------------------------------


def test_two_parents_no_label(impl: ModuleType) -> None:
    data = impl.aufs_mount_data("/r/diff/3", ["/r/diff/2", "/r/diff/1"], page_size=4096)
    assert data == ["br:/r/diff/3=rw:/r/diff/2=ro+wh:/r/diff/1=ro+wh,dio,xino=/dev/shm/aufs.xino"]


def test_base_layer_with_label_and_dirperm1(impl: ModuleType) -> None:
    data = impl.aufs_mount_data("/r/diff/1", [], "system_u:object_r:c1,c2", dirperm1=True,
                                page_size=4096)
    assert data == [
        'br:/r/diff/1=rw,dio,xino=/dev/shm/aufs.xino,dirperm1,context="system_u:object_r:c1,c2"'
    ]


# page 122: capacity 122 - 54 = 68 = len("br:/a=rw") 8 + 5 * len(":/l/xx=ro+wh") 12, so the
# fifth branch ends exactly on the boundary and is taken.
LAYERS = [f"/l/{n:02d}" for n in range(9)]


def test_page_ends_exactly_between_items(impl: ModuleType) -> None:
    data = impl.aufs_mount_data("/a", LAYERS, page_size=122)
    assert data == [
        "br:/a=rw:/l/00=ro+wh:/l/01=ro+wh:/l/02=ro+wh:/l/03=ro+wh:/l/04=ro+wh" + XINO,
        # remount capacity 68 holds three 19-byte "append:/l/xx=ro+wh," items (57), not four
        "append:/l/05=ro+wh,append:/l/06=ro+wh,append:/l/07=ro+wh,",
        "append:/l/08=ro+wh,",
    ]


def test_page_ends_inside_ro_wh_suffix(impl: ModuleType) -> None:
    # page 121: capacity 67 ends on the "w" of the fifth ":/l/04=ro+wh", which is left out.
    data = impl.aufs_mount_data("/a", LAYERS, page_size=121)
    assert data == [
        "br:/a=rw:/l/00=ro+wh:/l/01=ro+wh:/l/02=ro+wh:/l/03=ro+wh" + XINO,
        "append:/l/04=ro+wh,append:/l/05=ro+wh,append:/l/06=ro+wh,",
        "append:/l/07=ro+wh,append:/l/08=ro+wh,",
    ]


def test_remount_exact_fit_and_label_double_comma(impl: ModuleType) -> None:
    # label "x" (1 byte): capacity 134 - 1 - 54 = 79 holds five 12-byte branches after the
    # 8-byte rw (68; a sixth makes 80), then four 19-byte "append:" items (76) per remount.
    data = impl.aufs_mount_data("/a", LAYERS, "x", page_size=134)
    assert data == [
        'br:/a=rw:/l/00=ro+wh:/l/01=ro+wh:/l/02=ro+wh:/l/03=ro+wh:/l/04=ro+wh' + XINO
        + ',context="x"',
        'append:/l/05=ro+wh,append:/l/06=ro+wh,append:/l/07=ro+wh,append:/l/08=ro+wh,'
        ',context="x"',
    ]


def test_dirperm1_costs_nine_bytes(impl: ModuleType) -> None:
    # capacity 131 - 54 - 9 = 68: the same five branches as page 122 without dirperm1
    data = impl.aufs_mount_data("/a", LAYERS[:5], dirperm1=True, page_size=131)
    assert data == [
        "br:/a=rw:/l/00=ro+wh:/l/01=ro+wh:/l/02=ro+wh:/l/03=ro+wh:/l/04=ro+wh" + XINO
        + ",dirperm1"
    ]
    assert len(impl.aufs_mount_data("/a", LAYERS[:5], dirperm1=True, page_size=130)) == 2


@pytest.mark.parametrize("root", ["/var/lib/docker/aufs", "/tmp/aufs-tests/aufs"])
@pytest.mark.parametrize("dirperm1", [False, True])
def test_126_layer_chain_is_40_38_38_9(impl: ModuleType, root: str, dirperm1: bool) -> None:
    rw, ro = chain_126(root)
    data = impl.aufs_mount_data(rw, ro, dirperm1=dirperm1, page_size=4096)
    assert [d.count("=ro+wh") for d in data] == [40, 38, 38, 9]
    first = f"br:{rw}=rw" + "".join(f":{p}=ro+wh" for p in ro[:40]) + XINO
    first += ",dirperm1" if dirperm1 else ""
    assert data[0] == first
    assert len(data[0]) == (4013 if dirperm1 else 4004)
    assert data[1] == "".join(f"append:{p}=ro+wh," for p in ro[40:78])
    assert len(data[1]) == 38 * 104 == 3952
    assert data[2] == "".join(f"append:{p}=ro+wh," for p in ro[78:116])
    assert data[3] == "".join(f"append:{p}=ro+wh," for p in ro[116:])


def test_matching_path_length_chain(impl: ModuleType) -> None:
    # TestMountMoreThan42LayersMatchingPathLength's root gives 105-byte ro items after a
    # 104-byte rw: 104 + 37 * 105 = 3989 <= 4042 < 4094. Remount items are 112 bytes:
    # 36 * 112 = 4032 <= 4042 < 4144. So 37 + 36 + 36 + 16 = 125.
    rw, ro = chain_126("/tmp/aufs-tests/0000000/aufs")
    data = impl.aufs_mount_data(rw, ro, page_size=4096)
    assert [d.count("=ro+wh") for d in data] == [37, 36, 36, 16]
    assert len(data[0]) == 3989 + len(XINO)
    assert len(data[1]) == 36 * 112


def test_default_page_size_is_the_machines(impl: ModuleType) -> None:
    import os

    rw, ro = chain_126("/var/lib/docker/aufs")
    assert impl.aufs_mount_data(rw, ro) == impl.aufs_mount_data(
        rw, ro, page_size=os.sysconf("SC_PAGE_SIZE"))


# ---- bad input: a clear ValueError, never a silently wrong string ---------------------------


@pytest.mark.parametrize(
    ("rw", "layers", "label", "page_size"),
    [
        ("/a:b", [], "", 4096),
        ("/a", ["/ok", "/x,y"], "", 4096),
        ("/a", ["/x=y"], "", 4096),
        ("/a", [], 'bad"label', 4096),
        ("/a", [], "bad\\label", 4096),
        ("/a", [], "new\nline", 4096),
        ("/a", [], "", 54),
        ("/a", [], "", 0),
        ("/a", [], "", -5),
        ("/" + "x" * 5000, [], "", 4096),
        ("/a", ["/" + "y" * 5000], "", 4096),
        ("/a\0b", [], "", 4096),
        ("/a", ["/b\0"], "", 4096),
    ],
)
def test_bad_input_raises_value_error(
    impl: ModuleType, rw: str, layers: list[str], label: str, page_size: int
) -> None:
    with pytest.raises(ValueError):
        impl.aufs_mount_data(rw, layers, label, page_size=page_size)


def test_error_names_the_problem(impl: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"'/x,y'.*separators"):
        impl.aufs_mount_data("/a", ["/x,y"])
    with pytest.raises(ValueError, match="does not fit in one mount page"):
        impl.aufs_mount_data("/a", ["/" + "y" * 5000])


# ---- native == fallback, and every string fits in a page -------------------------------------

path_text = st.text(
    alphabet=st.sampled_from("abcdef0123456789/._-:,=é"), min_size=1, max_size=120
).map(lambda text: "/" + text)
label_text = st.one_of(
    st.just(""),
    st.text(alphabet=st.sampled_from('abc:_,0123" \\\t'), max_size=40),
)


def outcome(impl: ModuleType, *args: object, **kwargs: object) -> object:
    try:
        return impl.aufs_mount_data(*args, **kwargs)
    except Exception as error:
        return type(error)


@pytest.mark.skipif(NATIVE is None, reason="the native extension was not built")
@settings(max_examples=400, deadline=None)
@given(
    rw=path_text,
    layers=st.lists(path_text, max_size=60),
    label=label_text,
    dirperm1=st.booleans(),
    page_size=st.one_of(st.integers(min_value=1, max_value=1200), st.just(4096)),
)
def test_native_matches_fallback(
    rw: str, layers: list[str], label: str, dirperm1: bool, page_size: int
) -> None:
    assert NATIVE is not None
    native = outcome(NATIVE, rw, layers, label, dirperm1=dirperm1, page_size=page_size)
    fallback = outcome(_fallback, rw, layers, label, dirperm1=dirperm1, page_size=page_size)
    assert native == fallback
    if isinstance(native, list):
        for data in native:
            assert len(data.encode()) < page_size  # the kernel copies one page, NUL included
        carried = "".join(native).count("=ro+wh")
        assert carried == len(layers)  # no branch is dropped
