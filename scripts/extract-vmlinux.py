#!/usr/bin/env python3
"""Extract the uncompressed ELF vmlinux from a bzImage whose payload is LZ4 (legacy frame).

Firecracker boots only ELF kernels; Debian ships bzImages. The x86 boot protocol header says where the
compressed payload is (setup_sects at 0x1f1, payload_offset/payload_length at 0x248/0x24c); the kernel's
own build appends the uncompressed size as 4 trailing bytes, which the lz4 tool must not see.
"""
import struct
import subprocess
import sys

src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
setup_sects = data[0x1F1] or 4
payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
start = (setup_sects + 1) * 512 + payload_offset
payload = data[start : start + payload_length]
if payload[:4] != b"\x02\x21\x4c\x18":
    sys.exit(f"{src}: payload is not an LZ4 legacy frame (magic {payload[:4].hex()})")
out = subprocess.run(["lz4", "-dc"], input=payload[:-4], capture_output=True)
elf = out.stdout
if elf[:4] != b"\x7fELF":
    sys.exit(f"{src}: lz4 produced no ELF image: {out.stderr.decode(errors='replace')}")
open(dst, "wb").write(elf)
