"""A file tree in memory, written out as a gzip-compressed cpio archive.

Linux unpacks an initramfs in the "newc" cpio format: for each entry a
110-byte ASCII header of hexadecimal fields, the NUL-terminated name and the
data, with name and data each padded to a multiple of 4 bytes. The archive ends
with an entry named ``TRAILER!!!``. Entries get owner root, a fixed mtime of 0
and the modes given here, so the same inputs give the same archive.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """A file, directory or symbolic link of the tree."""

    mode: int
    source: Path | None = None
    data: bytes | None = None
    target: str | None = None

    def content(self) -> bytes:
        if self.target is not None:
            return self.target.encode()
        if self.source is not None:
            return self.source.read_bytes()
        return self.data or b""


class FileTree:
    """Files of the guest's root file system, keyed by absolute path."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {"/": Entry(stat.S_IFDIR | 0o755)}

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        parent = str(Path(path).parent)
        if parent not in self.entries:
            self.add_dir(parent)
        self.entries.setdefault(path, Entry(stat.S_IFDIR | mode))

    def add_file(self, path: str, source: Path, mode: int | None = None) -> None:
        if mode is None:
            mode = stat.S_IMODE(source.stat().st_mode)
        self._add(path, Entry(stat.S_IFREG | mode, source=source))

    def add_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(path, Entry(stat.S_IFREG | mode, data=data))

    def add_symlink(self, path: str, target: str) -> None:
        self._add(path, Entry(stat.S_IFLNK | 0o777, target=target))

    def has(self, path: str) -> bool:
        return path in self.entries

    def size(self) -> int:
        """Return the bytes of file content in the tree."""
        return sum(
            entry.source.stat().st_size if entry.source else len(entry.data or b"")
            for entry in self.entries.values()
            if stat.S_ISREG(entry.mode)
        )

    def _add(self, path: str, entry: Entry) -> None:
        self.add_dir(str(Path(path).parent))
        self.entries[path] = entry

    def write_cpio_gz(self, output: Path, compresslevel: int = 6) -> None:
        with gzip.GzipFile(output, "wb", compresslevel=compresslevel, mtime=0) as file:
            for inode, path in enumerate(sorted(self.entries), start=1):
                name = "." if path == "/" else path.lstrip("/")
                entry = self.entries[path]
                _write_entry(file, name, entry.mode, entry.content(), inode)
            _write_entry(file, TRAILER, 0, b"", 0)


def _write_entry(
    file: BinaryIO, name: str, mode: int, content: bytes, inode: int
) -> None:
    encoded = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = [inode, mode, 0, 0, nlink, 0, len(content), 0, 0, 0, 0, len(encoded), 0]
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    file.write(header + encoded + _padding(len(header) + len(encoded)))
    file.write(content + _padding(len(content)))


def _padding(length: int) -> bytes:
    return b"\0" * (-length % 4)
