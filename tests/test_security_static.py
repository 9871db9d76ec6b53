"""Static security checks over the project's own tracked files.

- Python (AST, every tracked .py file): no `torch.load` without `weights_only=True`; no
  `yaml.load`/`full_load`/`unsafe_load`; no pickle or marshal loads except the reviewed places
  in ALLOWED (bytes this process or its own workers just made, never a file or a user's input);
  no XML parsing through `xml.etree`/`xml.dom`/`xml.sax` (defusedxml parses; ElementTree may
  only build documents); no `extractall` (tasks/archive.py checks and writes each member); no
  `shell=True`.
- Every tracked text file: nothing that looks like a credential (cloud keys, private keys,
  passwords in URLs or assignments); DVC remote credentials belong in .dvc/config.local or the
  environment, both untracked.
Each checker is first shown to catch a planted violation, so a passing run means something.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

from tests.conftest import ROOT

# (file, call) -> why it is safe. Anything else that unpickles fails the test.
ALLOWED = {
    ("tasks/gate.py", "pickle.loads"): "chunks from the gate's own worker processes over its own pipe",
    ("tasks/ddp.py", "pickle.loads"): "checks that an exception it raised pickles, before broadcasting it to the other ranks",
    ("tests/test_validate.py", "pickle.loads"): "checks that an error the flows may pickle survives it",
}
YAML_UNSAFE = {"load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all"}
XML_PARSE = {"parse", "fromstring", "fromstringlist", "iterparse", "XML", "XMLParser", "XMLPullParser",
             "parseString"}
XML_MODULES = ("xml.etree", "xml.dom", "xml.sax", "lxml")


def _tracked(pattern: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", pattern], cwd=ROOT, capture_output=True, check=True)
    return [ROOT / p for p in out.stdout.decode().split("\0") if p]


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted module or object it stands for (`import x as y`, `from m import n`)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(func: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    return ".".join([aliases.get(func.id, func.id), *reversed(parts)])


def _kw_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def violations(source: str, rel: str) -> list[str]:
    """Every unsafe call or import in one file's source, as `file:line: rule`."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(XML_MODULES):
            found += [f"{rel}:{node.lineno}: imports {node.module}.{a.name} (parse with defusedxml)"
                      for a in node.names if a.name in XML_PARSE]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        short = ".".join(name.split(".")[-2:])
        where = f"{rel}:{node.lineno}"
        if name == "torch.load" and not _kw_true(node, "weights_only"):
            found.append(f"{where}: torch.load without weights_only=True")
        elif name.startswith("yaml.") and name.split(".")[-1] in YAML_UNSAFE:
            found.append(f"{where}: {name} (use yaml.safe_load)")
        elif name.split(".")[0] in ("pickle", "marshal", "dill", "cloudpickle") and "load" in name.split(".")[-1] \
                and (rel, short) not in ALLOWED:
            found.append(f"{where}: {name} on data that is not the process's own")
        elif name.startswith(XML_MODULES) and name.split(".")[-1] in XML_PARSE:
            found.append(f"{where}: {name} parses XML without defusedxml")
        elif isinstance(node.func, ast.Attribute) and node.func.attr == "extractall":
            found.append(f"{where}: extractall (check and write each member: tasks/archive.py)")
        elif name.startswith("subprocess.") and _kw_true(node, "shell"):
            found.append(f"{where}: subprocess with shell=True")
    return found


PLANTED = """
import pickle, tarfile, subprocess, yaml, torch
import xml.etree.ElementTree as ET
from xml.dom.minidom import parseString
torch.load("m.pt")
yaml.load(open("p.yaml"))
pickle.loads(b"")
ET.parse("a.xml")
tarfile.open("a.tar").extractall("out")
subprocess.run("ls", shell=True)
torch.load("ok.pt", weights_only=True)
yaml.safe_load("a: 1")
ET.Element("annotation")
"""


def test_the_checker_catches_each_planted_violation():
    found = violations(PLANTED, "planted.py")
    rules = ["parseString", "torch.load without", "yaml.load", "pickle.loads", "ElementTree.parse",
             "extractall", "shell=True"]
    for rule in rules:
        assert any(rule in f for f in found), (rule, found)
    assert len(found) == len(rules)  # the safe forms at the end are not flagged


def test_no_unsafe_loads_parsers_or_extraction_in_tracked_python():
    found = []
    for path in _tracked("*.py"):
        rel = str(path.relative_to(ROOT))
        if rel == "tests/test_security_static.py":
            continue  # PLANTED holds the violations on purpose
        found += violations(path.read_text(), rel)
    assert not found, "\n".join(found)


# --------------------------------------------------------------------------- secrets

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "Slack token": re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}"),
    "password in a URL": re.compile(r"[a-z+]+://[^/\s:@'\"]+:([^/\s@'\"]+)@"),
    "secret assignment": re.compile(
        r"(?i)\b(password|passwd|secret_access_key|secret_key|api_key|token|auth_string)\b\s*[:=]\s*"
        r"['\"]?([A-Za-z0-9/+_\-]{16,})"),
}
# Documentation placeholders, not secrets.
PLACEHOLDERS = {"pass", "password", "secret", "user:secret", "<password>", "..."}


def secrets_in(text: str) -> list[str]:
    found = []
    for kind, pattern in SECRET_PATTERNS.items():
        for m in pattern.finditer(text):
            value = m.group(m.lastindex) if m.lastindex else m.group(0)
            if value.strip("'\"") in PLACEHOLDERS:
                continue
            found.append(f"{kind}: {m.group(0)[:40]}")
    return found


def test_the_secret_scan_catches_planted_secrets():
    planted = ("aws_key = AKIAABCDEFGHIJKLMNOP\nurl: postgresql+psycopg://optuna:hunter2hunter2@db/optuna\n"
               "-----BEGIN RSA PRIVATE KEY-----\nsecret_access_key = wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY\n")
    kinds = {f.split(":")[0] for f in secrets_in(planted)}
    assert kinds == {"AWS access key id", "password in a URL", "private key", "secret assignment"}
    assert secrets_in("storage: postgresql+psycopg://user:pass@host/db\nPREFECT_API_AUTH_STRING=user:secret") == []


def test_no_credentials_in_tracked_files():
    found = []
    for path in _tracked("*"):
        if path.name == "test_security_static.py" or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary
        found += [f"{path.relative_to(ROOT)}: {f}" for f in secrets_in(text)]
    assert not found, "\n".join(found)
    dvc_config = (ROOT / ".dvc" / "config").read_text()
    assert not re.search(r"(?i)(access_key_id|secret_access_key|password|credentialpath|sas_token)", dvc_config)
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, ".dvc/config.local (where remote credentials go) must be git-ignored"
