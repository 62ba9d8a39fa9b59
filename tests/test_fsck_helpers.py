"""Helpers for the fsck tests: build populated images, damage them, read them back."""

from __future__ import annotations

import os
import stat

from mkfs import make_filesystem
from pmfs.fs import FileSystem, MountOptions
from pmfs.layout import (BITMAP_BYTES, BITS_PER_BITMAP_BLOCK, BLOCK_SIZE, DIRENT, INODE_SIZE,
                         ROOT_INO, Inode, compute_geometry, decode_dirent, encode_bitmap_trailer,
                         encode_dirent, encode_root_entries, fs_seed)
from pmfs.pmem import MemoryImage
from pmfs.superblock import SuperblockManager

MIB = 1 << 20
READ_LIMIT = 16 * MIB


def content(tag: str, n: int) -> bytes:
    """Deterministic, distinct file content."""
    seed = tag.encode()
    out = bytearray()
    k = 0
    while len(out) < n:
        out += seed + b":" + str(k).encode() + b";"
        k += 1
    return bytes(out[:n])


def populate(fs: FileSystem) -> None:
    """A tree with every kind of object: files with content, directories,
    hard links, symlinks (inline and in a block), xattrs, a fifo, a
    multi-block directory and a file whose extent tree has index nodes."""
    a = fs.mkdir(ROOT_INO, b"a", 0o755)
    b = fs.mkdir(a.ino, b"b", 0o750)
    c = fs.mkdir(b.ino, b"c", 0o700)
    f1 = fs.create(ROOT_INO, b"f1", 0o644)
    fs.write(f1.ino, 0, content("f1", 3000))
    f2 = fs.create(a.ino, b"f2", 0o600)
    fs.write(f2.ino, 0, content("f2", 3 * BLOCK_SIZE))
    big = fs.create(b.ino, b"big", 0o644)
    fs.write(big.ino, 0, content("big", 50 * BLOCK_SIZE + 123))
    deep = fs.create(c.ino, b"deep", 0o644)
    fs.write(deep.ino, 0, content("deep", 5000))
    one = fs.create(ROOT_INO, b"one", 0o644)
    fs.write(one.ino, 0, content("one", BLOCK_SIZE))
    two = fs.create(ROOT_INO, b"two", 0o644)
    fs.write(two.ino, 0, content("two", BLOCK_SIZE))
    sparse = fs.create(ROOT_INO, b"sparse", 0o644)
    fs.write(sparse.ino, 300 * BLOCK_SIZE, b"tail of a sparse file")
    fs.link(f1.ino, a.ino, b"hardlink")
    fs.symlink(ROOT_INO, b"s1", b"a/f2")
    fs.symlink(a.ino, b"s2", b"/" + b"long-target/" * 30)
    fs.setxattr(f1.ino, b"user.colour", b"blue")
    fs.setxattr(a.ino, b"user.dir", b"attr on a directory")
    fs.mknod(ROOT_INO, b"fifo", stat.S_IFIFO | 0o644)
    many = fs.mkdir(ROOT_INO, b"many", 0o755)
    for i in range(150):
        m = fs.create(many.ino, b"file-with-a-longish-name-%03d" % i, 0o644)
        if i % 10 == 0:
            fs.write(m.ino, 0, content(f"m{i}", 100 + i))
    # two files written block by block in turn: many extents each (index nodes)
    x = fs.create(ROOT_INO, b"frag1", 0o644)
    y = fs.create(ROOT_INO, b"frag2", 0o644)
    for k in range(40):
        fs.write(x.ino, k * BLOCK_SIZE, content(f"x{k}", BLOCK_SIZE))
        fs.write(y.ino, k * BLOCK_SIZE, content(f"y{k}", BLOCK_SIZE))


def build_image(size: int = 8 * MIB) -> MemoryImage:
    img = MemoryImage(size)
    make_filesystem(img, compute_geometry(size))
    fs = FileSystem(img, MountOptions())
    populate(fs)
    fs.close()
    return img


def mount(img, readonly=False) -> FileSystem:
    return FileSystem(img, MountOptions(readonly=readonly))


def copy_of(img) -> MemoryImage:
    return MemoryImage(bytes(img.buf))


def walk(fs: FileSystem, ino: int = ROOT_INO, prefix: bytes = b"", out=None,
         errors: list | None = None) -> dict:
    """{path: description} of the whole tree; file contents read in full."""
    out = {} if out is None else out
    for name, cino in sorted(fs.listdir(ino).items()):
        path = prefix + b"/" + name
        try:
            inode = fs.getattr(cino)
            fmt = stat.S_IFMT(inode.mode)
            xattrs = tuple(sorted((k, fs.getxattr(cino, k)) for k in fs.listxattr(cino)))
            if fmt == stat.S_IFDIR:
                out[path] = ("dir", inode.mode, xattrs)
                walk(fs, cino, path, out, errors)
            elif fmt == stat.S_IFREG:
                # (a damaged size may be huge: a sparse file; read what an image holds)
                n = min(inode.size, READ_LIMIT)
                data = bytes(fs.read(cino, 0, n)) if n else b""
                out[path] = ("file", inode.mode, inode.size, data, xattrs)
            elif fmt == stat.S_IFLNK:
                out[path] = ("symlink", fs.readlink(cino), xattrs)
            else:
                out[path] = ("special", inode.mode, inode.rdev, xattrs)
        except OSError as e:
            if errors is None:
                raise
            errors.append((path, e))
    return out


def snapshot(img) -> dict:
    """The tree of `img` as seen by a read-only mount of a private copy."""
    fs = mount(copy_of(img), readonly=True)
    try:
        return walk(fs)
    finally:
        fs.close()


def lookup_path(img, path: bytes) -> int:
    fs = mount(copy_of(img), readonly=True)
    ino = ROOT_INO
    for part in path.strip(b"/").split(b"/"):
        ino = fs.lookup(ino, part).ino
    fs.close()
    return ino


class Geo:
    """Offsets of the structures of an image."""

    def __init__(self, img):
        self.img = img
        self.sb = SuperblockManager(img).load()
        self.seed = fs_seed(self.sb.uuid)

    def inode_off(self, ino: int) -> int:
        return self.sb.itable_start * BLOCK_SIZE + ino * INODE_SIZE

    def inode(self, ino: int) -> Inode:
        return Inode.decode(ino, self.img.read(self.inode_off(ino), INODE_SIZE), self.seed,
                            verify=False)

    def put_inode(self, inode: Inode) -> None:
        self.img.write(self.inode_off(inode.ino), inode.encode(self.seed))

    def extents(self, ino: int):
        fs = mount(copy_of(self.img), readonly=True)
        ext = list(fs.tree(fs.iget(ino)).extents())
        nodes = list(fs.tree(fs.iget(ino)).node_blocks())
        fs.close()
        return ext, nodes

    def set_root_extents(self, ino: int, entries) -> None:
        inode = self.inode(ino)
        inode.root = encode_root_entries(entries)
        inode.count = len(entries)
        inode.depth = 0
        self.put_inode(inode)

    def set_bit(self, which: str, n: int, value: bool) -> None:
        start = self.sb.bbitmap_start if which == "b" else self.sb.ibitmap_start
        blk, bit = divmod(n, BITS_PER_BITMAP_BLOCK)
        off = (start + blk) * BLOCK_SIZE
        bits = bytearray(self.img.read(off, BITMAP_BYTES))
        if value:
            bits[bit >> 3] |= 1 << (bit & 7)
        else:
            bits[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF
        self.img.write(off, bytes(bits) + encode_bitmap_trailer(self.seed, start + blk, bits))

    def test_bit(self, which: str, n: int) -> bool:
        start = self.sb.bbitmap_start if which == "b" else self.sb.ibitmap_start
        blk, bit = divmod(n, BITS_PER_BITMAP_BLOCK)
        off = (start + blk) * BLOCK_SIZE
        return bool(self.img.read(off + (bit >> 3), 1)[0] >> (bit & 7) & 1)

    def dir_records(self, dir_ino: int):
        """[(image offset, dir pos, ino, rec_len, ftype, name)] of a directory."""
        out = []
        ext, _nodes = self.extents(dir_ino)
        for s, n, p in ext:
            for k in range(n):
                base = (s + k) * BLOCK_SIZE
                raw = bytes(self.img.read((p + k) * BLOCK_SIZE, BLOCK_SIZE))
                off = 0
                while off < BLOCK_SIZE:
                    ino, rl, ft, name = decode_dirent(self.seed, dir_ino, base + off, raw, off)
                    out.append(((p + k) * BLOCK_SIZE + off, base + off, ino, rl, ft, name))
                    off += rl
        return out

    def remove_entry(self, dir_ino: int, name: bytes) -> int:
        """Turn the record of `name` into a free record (valid checksum)."""
        for off, pos, ino, rl, _ft, nm in self.dir_records(dir_ino):
            if nm == name and ino:
                self.img.write(off, encode_dirent(self.seed, dir_ino, pos, 0, rl, 0, b""))
                return ino
        raise KeyError(name)

    def add_entry(self, dir_ino: int, name: bytes, ino: int, ftype: int) -> None:
        """Write a live record (valid checksum) into a free record that fits."""
        need = (DIRENT.size + len(name) + 7) // 8 * 8
        for off, pos, eino, rl, _ft, _nm in self.dir_records(dir_ino):
            if eino == 0 and rl >= need:
                rest = rl - need
                if rest >= DIRENT.size:  # split the free record, as the core does
                    self.img.write(off + need, encode_dirent(self.seed, dir_ino, pos + need,
                                                             0, rest, 0, b""))
                    rl = need
                self.img.write(off, encode_dirent(self.seed, dir_ino, pos, ino, rl, ftype,
                                                  name))
                return
        raise RuntimeError("no room")


def flip(img, off: int, bit: int = 0) -> None:
    b = img.read(off, 1)[0]
    img.write(off, bytes([b ^ (1 << bit)]))


def image_file(tmp_path, img, name="img") -> str:
    path = os.path.join(str(tmp_path), name)
    with open(path, "wb") as f:
        f.write(bytes(img.buf))
    return path


def read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()
