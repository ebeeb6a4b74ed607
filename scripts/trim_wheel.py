"""Rewrite a wheel without the files that training never imports (standard library only).

    python scripts/trim_wheel.py IN.whl OUT.whl --drop studio/ --drop unsloth_cli/
    python scripts/trim_wheel.py IN.whl OUT.whl --drop-glob 'bitsandbytes/libbitsandbytes_*.so' \
        --keep-glob 'bitsandbytes/libbitsandbytes_cuda130.so' --keep-glob 'bitsandbytes/libbitsandbytes_cpu.so'

A path is dropped when it starts with a ``--drop`` prefix or matches a
``--drop-glob`` pattern, unless it matches a ``--keep-glob`` pattern. The
dropped files' lines leave ``*.dist-info/RECORD``; the remaining lines keep
their hashes, so pip installs the result like the original. The output keeps
the input's file name (same name and version). Prints what was dropped.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import tempfile
import zipfile


def trim(src: str, dst: str, drop: list[str], drop_glob: list[str], keep_glob: list[str]) -> tuple[int, int]:
    """Write ``dst`` from ``src`` without the dropped paths; returns (files dropped, bytes dropped)."""

    def dropped(name: str) -> bool:
        if any(fnmatch.fnmatch(name, g) for g in keep_glob):
            return False
        return any(name.startswith(p) for p in drop) or any(fnmatch.fnmatch(name, g) for g in drop_glob)

    n_dropped = bytes_dropped = 0
    out_dir = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(suffix=".whl", dir=out_dir)
    os.close(fd)
    try:
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            names = zin.namelist()
            records = [n for n in names if n.endswith(".dist-info/RECORD")]
            if len(records) != 1:
                raise SystemExit(f"trim_wheel: {src} has {len(records)} RECORD files, expected 1")
            gone = {n for n in names if dropped(n) and n != records[0]}
            for info in zin.infolist():
                if info.filename in gone:
                    n_dropped += 1
                    bytes_dropped += info.file_size
                    continue
                data = zin.read(info.filename)
                if info.filename == records[0]:
                    lines = data.decode().splitlines()
                    kept = [ln for ln in lines if ln.split(",", 1)[0] not in gone]
                    data = ("\n".join(kept) + "\n").encode()
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n_dropped, bytes_dropped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="input wheel")
    p.add_argument("dst", help="output wheel (may be the same path)")
    p.add_argument("--drop", action="append", default=[], help="drop paths starting with this prefix")
    p.add_argument("--drop-glob", action="append", default=[], help="drop paths matching this fnmatch pattern")
    p.add_argument("--keep-glob", action="append", default=[], help="never drop paths matching this pattern")
    args = p.parse_args(argv)
    if not (args.drop or args.drop_glob):
        print("trim_wheel: nothing to drop; pass --drop or --drop-glob", file=sys.stderr)
        return 2
    n, size = trim(args.src, args.dst, args.drop, args.drop_glob, args.keep_glob)
    print(f"trim_wheel: {os.path.basename(args.src)}: dropped {n} files ({size / 1e6:.1f} MB uncompressed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
