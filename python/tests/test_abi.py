"""The ctypes mirror (moegen/_abi.py) against the C headers: a probe program is
generated from the Python field lists, compiled against runtime/*.h and run;
every size, field offset and enumeration value must agree."""

import ctypes
import os
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
    for lst, prefix, _ in _abi.ENUMS:
        out.append('#define X(v, s) printf("enum %s %%d %%s\\n", (int)%s##v, s);' % (lst, prefix))
        out.append('%s(X)' % lst)
        out.append('#undef X')
        out.append('printf("count %s %%d\\n", (int)%sCOUNT);' % (lst, prefix))
    for i, s in enumerate(_abi.STATUSES):
        out.append('printf("status %s %%d\\n", (int)MOE_%s);' % (s, s))
    out.append('printf("status_count %d\\n", (int)MOE_STATUS_COUNT);')
    out.append('printf("sizeof_enum_status %zu\\n", sizeof(enum moe_status));')
    for i, dev in enumerate(_abi.DEVICES):
        out.append('printf("device %s %%d\\n", (int)MOE_DEVICE_%s);' % (dev, dev.upper()))
    for macro in ("MOE_ABI_VERSION", "MOE_DESC_VERSION", "MOE_MAX_LAYERS", "MOE_MAX_LEVELS",
                  "MOE_NAME_MAX"):
        out.append('printf("const %s %%d\\n", (int)%s);' % (macro, macro))
    out += ['return 0;', '}']
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def probe(tmp_path_factory, repo):
    d = tmp_path_factory.mktemp("abi")
    src = d / "probe.c"
    exe = d / "probe"
    src.write_text(_probe_source())
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-std=c11", "-Wall", "-Werror", *[a for sub in ("", "core", "ref") for a in ("-I", str(repo / "runtime" / sub))], str(src),
                    "-o", str(exe)], check=True)
    lines = subprocess.run([str(exe)], check=True, stdout=subprocess.PIPE,
                           text=True).stdout.splitlines()
    res = {"size": {}, "align": {}, "off": {}, "fsize": {}, "enum": {}, "count": {},
           "status": {}, "device": {}, "const": {}}
    for ln in lines:
        parts = ln.split()
        if parts[0] == "enum":
            res["enum"].setdefault(parts[1], []).append((int(parts[2]), parts[3]))
        elif parts[0] in ("status_count", "sizeof_enum_status"):
            res[parts[0]] = int(parts[1])
        else:
            res[parts[0]][parts[1]] = int(parts[2])
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


@pytest.mark.parametrize("lst,prefix,names", _abi.ENUMS, ids=[e[0] for e in _abi.ENUMS])
def test_enum(probe, lst, prefix, names):
    c = probe["enum"][lst]
    assert [v for v, _ in c] == list(range(len(c)))
    assert tuple(s.strip('"') for _, s in c) == names
    assert probe["count"][lst] == len(names)


def test_status_and_constants(probe):
    for i, s in enumerate(_abi.STATUSES):
        assert probe["status"][s] == i
    assert probe["status_count"] == len(_abi.STATUSES)
    assert probe["sizeof_enum_status"] == ctypes.sizeof(_abi.c_enum)
    for i, dev in enumerate(_abi.DEVICES):
        assert probe["device"][dev] == i
    assert probe["const"]["MOE_ABI_VERSION"] == _abi.ABI_VERSION
    assert probe["const"]["MOE_DESC_VERSION"] == _abi.DESC_VERSION
    assert probe["const"]["MOE_MAX_LAYERS"] == _abi.MAX_LAYERS
    assert probe["const"]["MOE_MAX_LEVELS"] == _abi.MAX_LEVELS
    assert probe["const"]["MOE_NAME_MAX"] == _abi.NAME_MAX
