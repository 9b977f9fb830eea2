"""Hardened XML reading, element paths, and the shipped ISO 20022 schemas.

Reading: lxml with entities left unresolved, no DTD loading, no network and
`huge_tree` off, and any document that carries a DOCTYPE at all is refused
(`DTD_FORBIDDEN`): ISO 20022 messages never have one, and it is where entity
expansion (billion laughs) and external entities (XXE) live. Size is capped
before parsing.

Schemas: `xsd/*.xsd`, loaded from this package (never from the network) and
compiled once per process.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from importlib import resources

from lxml import etree

from money_plane.formats._common import refuse

ISO_NS_PREFIX = "urn:iso:std:iso:20022:tech:xsd:"
MAX_FILE_BYTES = 64 * 1024 * 1024

_Element = etree._Element


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        load_dtd=False,
        dtd_validation=False,
        no_network=True,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def parse_xml(data: bytes, *, max_bytes: int = MAX_FILE_BYTES) -> _Element:
    """The root element of a hostile-input-safe parse of `data`, or a refusal
    (`FILE_TOO_LARGE`, `DTD_FORBIDDEN`, `FILE_UNREADABLE` naming the line)."""
    if not isinstance(data, bytes | bytearray):
        raise TypeError("bank files are read as bytes")
    if len(data) > max_bytes:
        raise refuse("FILE_TOO_LARGE", f"the file is larger than {max_bytes} bytes", "file")
    if not data.strip():
        raise refuse("FILE_UNREADABLE", "the file is empty", "line 1")
    # Refused before parsing as well as after: no DTD is ever processed.
    if re.search(rb"<!(DOCTYPE|ENTITY)", bytes(data[:65536]), re.IGNORECASE):
        raise refuse("DTD_FORBIDDEN", "bank XML must not carry a DTD or entities", "DOCTYPE")
    try:
        root = etree.fromstring(bytes(data), _parser())
    except etree.XMLSyntaxError as exc:
        line = exc.lineno if exc.lineno else 1
        raise refuse(
            "FILE_UNREADABLE", f"not well-formed XML: {exc.msg}", f"line {line}", line=str(line)
        ) from exc
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise refuse("DTD_FORBIDDEN", "bank XML must not carry a DTD or entities", "DOCTYPE")
    for node in root.iter():
        if isinstance(node, etree._Entity):
            raise refuse("DTD_FORBIDDEN", "bank XML must not use entities", path_of(node))
    return root


def local(el: _Element) -> str:
    tag = el.tag
    if not isinstance(tag, str):
        return ""
    return tag.rpartition("}")[2]


def namespace_of(el: _Element) -> str:
    tag = el.tag
    return tag[1:].partition("}")[0] if isinstance(tag, str) and tag.startswith("{") else ""


def path_of(el: _Element) -> str:
    """`Document/BkToCstmrStmt/Stmt[1]/Ntry[2]/Amt`: local names, with a
    1-based index where an element has same-named siblings."""
    parts: list[str] = []
    node: _Element | None = el
    while node is not None:
        name = local(node) or "?"
        parent = node.getparent()
        if parent is not None:
            same = [c for c in parent if local(c) == name]
            if len(same) > 1:
                name = f"{name}[{same.index(node) + 1}]"
        parts.append(name)
        node = parent
    return "/".join(reversed(parts))


def children(el: _Element | None, name: str) -> Iterator[_Element]:
    """Child elements with local name `name`, in any namespace. Lookups use
    lxml's C path finder with a namespace wildcard, so every version of a
    message reads alike."""
    if el is None:
        return iter(())
    return el.iterchildren(f"{{*}}{name}")


@functools.lru_cache(maxsize=512)
def _any_namespace(name: str) -> str:
    return f"{{*}}{name}"


def child(el: _Element | None, *names: str) -> _Element | None:
    """The first element down the path of local names, or None: what
    `el.find("{*}A/{*}B")` finds (the first B of any A, in document order),
    walked with lxml's C child iterator instead of its path engine, which
    cost most of a statement's reading (a dozen lookups per entry)."""
    if not names:
        raise TypeError("child() takes a path of one or more names")
    if el is None:
        return None
    if len(names) == 1:
        for node in el.iterchildren(_any_namespace(names[0])):
            return node
        return None
    return _down(el, names, 0)


def _down(el: _Element, names: tuple[str, ...], depth: int) -> _Element | None:
    last = depth == len(names) - 1
    for node in el.iterchildren(_any_namespace(names[depth])):
        if last:
            return node
        found = _down(node, names, depth + 1)
        if found is not None:
            return found
    return None


def text(el: _Element | None, *names: str) -> str:
    node = child(el, *names)
    if node is None or node.text is None:
        return ""
    return node.text.strip()


class Children:
    """One element's children by local name, gathered in one pass: for an
    element many names are looked up in (a camt entry, its transaction's
    references: a dozen each). `child`, `text` and `required` answer as the
    module's functions of the same names do for a one-name path."""

    __slots__ = ("_first", "el")

    def __init__(self, el: _Element | None) -> None:
        self.el = el
        first: dict[str, _Element] = {}
        if el is not None:
            for node in el.iterchildren(tag=etree.Element):
                tag = node.tag
                if isinstance(tag, str):  # always, for an element; typed wider
                    first.setdefault(tag.rpartition("}")[2], node)
        self._first = first

    def child(self, name: str) -> _Element | None:
        return self._first.get(name)

    def text(self, name: str) -> str:
        node = self._first.get(name)
        if node is None or node.text is None:
            return ""
        return node.text.strip()

    def required(self, name: str) -> _Element:
        node = self._first.get(name)
        if node is None:
            assert self.el is not None  # nothing is required of no element
            return required(self.el, name)  # the refusal, naming the path
        return node


def required(el: _Element, *names: str) -> _Element:
    node = child(el, *names)
    if node is None:
        where = f"{path_of(el)}/{'/'.join(names)}"
        raise refuse("ELEMENT_REQUIRED", f"{where} is missing", where)
    return node


def required_text(el: _Element, *names: str) -> str:
    node = required(el, *names)
    value = (node.text or "").strip()
    if not value:
        raise refuse("ELEMENT_REQUIRED", f"{path_of(node)} is empty", path_of(node))
    return value


@functools.cache
def schema(message: str) -> etree.XMLSchema:
    """The compiled official schema of `message` ("camt.053.001.08")."""
    name = f"{message}.xsd"
    ref = resources.files("money_plane.formats").joinpath("xsd", name)
    if not ref.is_file():
        raise refuse(
            "MESSAGE_VERSION_UNSUPPORTED", f"no schema ships for {message}", "Document/@xmlns"
        )
    doc = etree.fromstring(ref.read_bytes(), _parser())
    return etree.XMLSchema(doc)


def available_schemas() -> list[str]:
    folder = resources.files("money_plane.formats").joinpath("xsd")
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".xsd"))


_LOCAL_NAME = re.compile(r"\*\[local-name\(\)\s*=\s*'([^']+)'\]")


def validate(root: _Element, message: str) -> None:
    """Refuses (`SCHEMA_INVALID`) a document its official schema rejects,
    naming the first failing element and line."""
    xsd = schema(message)
    if xsd.validate(root):
        return
    error = xsd.error_log[0]
    where = f"line {error.line}"
    if error.path:
        try:
            found = root.getroottree().xpath(error.path)
        except etree.XPathError:
            found = []
        if isinstance(found, list) and found and isinstance(found[0], etree._Element):
            where = path_of(found[0])
        else:
            where = _LOCAL_NAME.sub(r"\1", error.path).lstrip("/") or where
    raise refuse(
        "SCHEMA_INVALID",
        f"not a valid {message} document at line {error.line}: {error.message}",
        where,
        line=str(error.line),
    )


def serialize(root: _Element) -> bytes:
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True))


class Builder:
    """Appends namespaced elements in schema order; `None` and "" are skipped."""

    def __init__(self, namespace: str) -> None:
        self.ns = namespace

    def root(self) -> _Element:
        return etree.Element(f"{{{self.ns}}}Document", nsmap={None: self.ns})

    def add(self, parent: _Element, name: str, value: str | None = None, **attrs: str) -> _Element:
        el = etree.SubElement(parent, f"{{{self.ns}}}{name}")
        if value is not None:
            el.text = value
        for key, val in attrs.items():
            el.set(key, val)
        return el

    def opt(self, parent: _Element, name: str, value: str | None) -> _Element | None:
        if not value:
            return None
        return self.add(parent, name, value)
