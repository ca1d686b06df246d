"""A first end-to-end check: create, write, read back, remount."""

from conftest import Volume, requires_fuse


@requires_fuse
def test_write_read_remount(mounted: Volume) -> None:
    data = bytes(range(256)) * 1000
    mounted.path("f.bin").write_bytes(data)
    assert mounted.path("f.bin").read_bytes() == data
    mounted.remount()
    assert mounted.path("f.bin").read_bytes() == data
    assert data[:4096] not in mounted.backing_path("f.bin").read_bytes()
