"""The ctypes mirror (moegen/_abi.py) against runtime/moe.h: a probe program is
generated from the Python field lists, compiled against a copy of moe.h alone
(no other include path: the public header stands alone) and run; every size,
field offset and enumeration value must agree."""

import ctypes
import os
import shutil
import subprocess

import pytest

from moegen import _abi


def _probe_source():
    out = ['#include <stddef.h>', '#include <stdio.h>', '#include "moe.h"', 'int main(void)', '{']
    for cls, tag in _abi.STRUCTS.items():
        out.append('printf("size %s %%zu\\n", sizeof(struct %s));' % (tag, tag))
        out.append('printf("align %s %%zu\\n", _Alignof(struct %s));' % (tag, tag))
        for f in cls._fields_:
            name = f[0]
            out.append('printf("off %s.%s %%zu\\n", offsetof(struct %s, %s));' %
                       (tag, name, tag, name))
            out.append('printf("fsize %s.%s %%zu\\n", sizeof(((struct %s *)0)->%s));' %
                       (tag, name, tag, name))
    for prefix, names, count in _abi.ENUMS:
        for n in names:
            out.append('printf("enum %s%s %%d\\n", (int)%s%s);' % (prefix, n.upper(), prefix,
                                                                   n.upper()))
        if count:
            out.append('printf("enum %s %%d\\n", (int)%s);' % (count, count))
    out.append('printf("enum sizeof %zu\\n", sizeof(enum moe_status));')
    out.append('printf("const MOE_ABI_VERSION %d\\n", (int)MOE_ABI_VERSION);')
    out += ['return 0;', '}']
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def probe(tmp_path_factory, repo):
    d = tmp_path_factory.mktemp("abi")
    inc = d / "inc"
    inc.mkdir()
    shutil.copy(repo / "runtime" / "moe.h", inc / "moe.h")  # moe.h and nothing beside it
    src = d / "probe.c"
    exe = d / "probe"
    src.write_text(_probe_source())
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-std=c11", "-pedantic", "-Wall", "-Werror", "-I", str(inc), str(src),
                    "-o", str(exe)], check=True)
    lines = subprocess.run([str(exe)], check=True, stdout=subprocess.PIPE,
                           text=True).stdout.splitlines()
    res = {"size": {}, "align": {}, "off": {}, "fsize": {}, "enum": {}, "const": {}}
    for ln in lines:
        kind, key, value = ln.split()
        res[kind][key] = int(value)
    return res


@pytest.mark.parametrize("cls", list(_abi.STRUCTS), ids=lambda c: _abi.STRUCTS[c])
def test_struct_layout(probe, cls):
    tag = _abi.STRUCTS[cls]
    assert ctypes.sizeof(cls) == probe["size"][tag], "sizeof(struct %s)" % tag
    assert ctypes.alignment(cls) == probe["align"][tag], "_Alignof(struct %s)" % tag
    for f in cls._fields_:
        name = f[0]
        key = "%s.%s" % (tag, name)
        assert getattr(cls, name).offset == probe["off"][key], "offsetof " + key
        assert getattr(cls, name).size == probe["fsize"][key], "sizeof " + key


def test_fields_cover_struct(probe):
    # No C field missing from the mirror: the last field ends where the
    # struct's padding starts.
    for cls, tag in _abi.STRUCTS.items():
        last = cls._fields_[-1][0]
        end = getattr(cls, last).offset + getattr(cls, last).size
        pad = probe["size"][tag] - end
        assert 0 <= pad < probe["align"][tag], "struct %s has a field after %s" % (tag, last)


@pytest.mark.parametrize("prefix,names,count", _abi.ENUMS, ids=[e[0] for e in _abi.ENUMS])
def test_enum(probe, prefix, names, count):
    for i, n in enumerate(names):
        assert probe["enum"][prefix + n.upper()] == i, prefix + n.upper()
    if count:
        assert probe["enum"][count] == len(names)


def test_constants(probe):
    assert probe["enum"]["sizeof"] == ctypes.sizeof(_abi.c_enum)
    assert probe["const"]["MOE_ABI_VERSION"] == _abi.ABI_VERSION


def test_mirror_is_moe_h_only():
    # the binding mirrors the public header, not the internal description
    for gone in ("Desc", "Layout", "Level", "MODES", "ROLES", "DESC_VERSION"):
        assert not hasattr(_abi, gone), gone
