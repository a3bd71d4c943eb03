"""The built-in corpus's text: docstrings of a fixed list of stdlib modules and their public
members, in sorted order (modules that fail to import are skipped). Stdlib only: run as a
script in a fresh isolated interpreter by ``train.data.builtin_corpus``, it prints the text."""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings

_CORPUS_MODULES = (
    "abc argparse array ast asyncio base64 bisect calendar cmd codecs collections colorsys "
    "configparser contextlib copy csv dataclasses datetime decimal difflib email enum fileinput "
    "fnmatch fractions functools getopt gettext glob graphlib gzip hashlib heapq hmac html "
    "http.client imaplib inspect io ipaddress itertools json logging lzma mailbox math mimetypes "
    "numbers operator optparse os pathlib pickle pkgutil platform pprint queue random re sched "
    "secrets shlex shutil smtplib socket statistics string struct subprocess tarfile tempfile "
    "textwrap threading timeit tokenize trace traceback typing unittest urllib.parse uuid "
    "warnings wave weakref xml.dom.minidom zipfile zoneinfo"
).split()


def corpus_text() -> str:
    """The corpus as this interpreter sees it (see ``train.data.builtin_corpus``)."""
    parts = []
    with warnings.catch_warnings():  # typing.io & co. warn when their docstrings are read
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in _CORPUS_MODULES:
            parts.extend(_module_docs(name))
    return "\n\n".join(parts)


def _module_docs(name: str) -> list[str]:
    """Docstrings of module ``name`` and its own public members, in sorted order."""
    try:
        module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - an optional stdlib module missing on this machine
        return []
    parts = [f"{name}: {inspect.getdoc(module)}"] if inspect.getdoc(module) else []
    for attr in sorted(vars(module)):
        obj = getattr(module, attr)
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        doc = inspect.getdoc(obj)
        if doc:
            parts.append(f"{attr}: {doc}")
    return parts


if __name__ == "__main__":
    sys.stdout.buffer.write(corpus_text().encode("utf-8"))
