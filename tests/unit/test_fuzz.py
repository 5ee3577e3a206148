"""Fuzz tests: the config readers of the three scripts and the host API's request handling.

Stdlib `random` with fixed seeds, a few thousand cases each, bounded in time. The properties:

- a config reader returns values of the documented types or raises the script's ConfigError;
  nothing else ever escapes (no TypeError, MemoryError, ValueError ...), and a config that
  tries to run code never runs it;
- `parse_request(buf)` returns None (need more), a complete request whose body has exactly
  Content-Length bytes, or raises ApiError with a 4xx status;
- `Api.dispatch` (with a fake hub) always answers (status, dict); every error is a 4xx with an
  "error" sentence; a registration reaches the hub only when it is valid by an independent
  reading of the SPEC's rules; the token is never echoed in an answer nor logged;
- a real ApiServer on 127.0.0.1 survives a volley of random requests and still answers.

Every failing case is collected (one example per kind of failure) so one run shows all bugs.
"""

import ipaddress
import json
import logging
import os
import random
import re
import socket
import string
import threading
import time
import warnings

import pytest

import kohaku_overlay_host as host
import kohaku_overlay_runner as runner

try:
    import kohaku_overlay_check as check
except ImportError:  # pragma: no cover - the check script is part of the tree
    check = None

SEED = 20261129
CASES = 2500          # per config reader
API_CASES = 4000
PARSE_CASES = 4000
BUDGET = 60.0         # seconds any one fuzz loop may take (it takes a few)

TOKEN = "fuzz-T0ken-7c1e9a"
HOST_ADDR = "198.51.100.1"
NAME_FULL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


# ---- helpers ----------------------------------------------------------------------------------


class Failures(object):
    """Collects failing cases, one example per kind (exception type or property)."""

    def __init__(self):
        self.kinds = {}

    def add(self, kind, case, detail):
        self.kinds.setdefault(kind, (case, detail))

    def report(self):
        return "\n".join("%s\n    case: %s\n    %s" % (k, _short(c), _short(d))
                         for k, (c, d) in sorted(self.kinds.items()))

    def check(self, what):
        """Fail the test with every kind of failure found (one example each)."""
        if self.kinds:
            pytest.fail("%s: %d kind(s) of failure\n%s" % (what, len(self.kinds), self.report()),
                        pytrace=False)


def _short(value, n=240):
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= n else text[:n] + "... (%d chars)" % len(text)


def _rand_text(rng, n, alphabet=None):
    alphabet = alphabet or (string.printable + "\u00e9\u00b2\u00b9\uff18\u0661\x00\ufeff\u202e")
    return "".join(rng.choice(alphabet) for _ in range(n))


VALUE_POOL = [
    "True", "False", "None", "0", "1", "-1", "1450", "9000", "65536", "4789", "100", "16777215",
    "2**40", "1e400", "1.5", "-0.0", "float('nan')", "1+2j", "'x'", "''", "'10.0.0.1'",
    "'198.51.100.1'", "'127.0.0.1'", "'0.0.0.0'", "'10.0.0.0/8/8/16'", "'10.0.0.0/16/8/8'",
    "'10.0.0.0/8/8/16/1'", "'10.0.0.0/\u00b2/8/16'", "'10.0.0.0/\uff18/8/16'",
    "'10.0.0.0/-8/24/16'",
    "'10.0.0.0/8/24/0'", "'a/b/c/d'", "'172.30.0.0/16'", "'172.30.0.1'", "'10.0.0.0/33'",
    "'runner1'", "'r\u00e9'", "'bad name'", "'x' * 3", "b'bytes'", "[1, 2]", "(1,)", "{1: 2}",
    "{'a': [1]}", "{1, 2}", "set()", "{[1]: 2}", "{[1]}", "-'a'", "not 1", "1 if 1 else 2",
    "__import__('os').system('touch CANARY')", "open('CANARY', 'w')", "lambda: 1", "...",
    "f'{1}'", "x.y", "X", "'" + "a" * 5000 + "'", "0x" + "f" * 5000, "9" * 5000,
    "(" * 150 + "1" + ")" * 150, "-" * 50000 + "1", "not " * 30000 + "1", "'\\x00'",
    "'/tmp/a\\x00b'", "'~/x/y.json'", "[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]",
]

STATEMENT_POOL = [
    "import os", "from os import system", "def f(): pass", "class C: pass",
    "print('x')", "X = Y = 1", "X, Y = 1, 2", "X[0] = 1", "a.b = 1", "X += 1", "X: int",
    "a.b: int = 1", "del X", "if True: X = 1", "for i in []: pass", "while False: pass",
    "with open('x'): pass", "try:\n    pass\nexcept Exception:\n    pass", "(X := 1)", "1",
    "'a docstring'", "f'{X}'", "{[1]: 2}", "{[1]}", "-'a'", "lambda: 1", "global X",
    "assert False", "raise SystemExit(3)", "yield 1", "async def f(): pass", "X = yield",
    "...", "#: comment only", "", "\\", "X = (", "X = '''", "\x00", "\ufeffX = 1", "X\t= 1",
    "  X = 1", "X = 1; Y = 2", "X = 1 # trailing", "X = \\\n 1",
]


def _config_cases(rng, keys, n):
    """n config texts (str or bytes) built from the known keys, a value pool and mutations."""
    keys = list(keys)
    typos = [k[:-1] for k in keys] + [k.lower() for k in keys] + ["OVERLAY_ENABLE", "X", "_x"]
    for i in range(n):
        kind = i % 6
        if kind in (0, 1):
            lines = []
            for _ in range(rng.randint(1, 8)):
                name = rng.choice(keys) if rng.random() < 0.8 else rng.choice(typos)
                value = rng.choice(VALUE_POOL)
                if rng.random() < 0.5:
                    ann = rng.choice(["int", "str", "bool", "float", "Optional[int]", "'x'",
                                      "list[int]", "1"])
                    lines.append("%s: %s = %s" % (name, ann, value))
                else:
                    lines.append("%s = %s" % (name, value))
            text = "\n".join(lines) + "\n"
            if kind == 1:  # character-level mutations of a plausible file
                chars = list(text)
                for _ in range(rng.randint(1, 6)):
                    op, pos = rng.random(), rng.randrange(len(chars) + 1)
                    if op < 0.4 and chars:
                        del chars[min(pos, len(chars) - 1)]
                    elif op < 0.8:
                        chars.insert(pos, rng.choice("'\"()[]{}:=,.\\#\n\t \x00\u00e9f*-+"))
                    elif chars:
                        chars[min(pos, len(chars) - 1)] = rng.choice(string.printable)
                text = "".join(chars)
            yield text
        elif kind == 2:
            yield "\n".join(rng.choice(STATEMENT_POOL) for _ in range(rng.randint(1, 4))) + "\n"
        elif kind == 3:
            yield bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        elif kind == 4:
            yield "\n".join(_rand_text(rng, rng.randint(0, 60))
                            for _ in range(rng.randint(1, 5)))
        else:  # a valid line with an invalid encoding or a byte-order mark around it
            name = rng.choice(keys)
            yield rng.choice([b"\xef\xbb\xbf", b"", b"\xff\xfe", b"#\xff\n"]) + \
                ("%s = %s\n" % (name, rng.choice(VALUE_POOL))).encode("utf-8")


def _fuzz_reader(tmp_path, keys, call, allowed, check_values, seed):
    """Run call(path) over the generated configs; return the Failures."""
    rng = random.Random(seed)
    failures = Failures()
    path = tmp_path / "fuzz_config.py"
    cwd = os.getcwd()
    os.chdir(str(tmp_path))  # a CANARY written by executed code would land here
    logging.disable(logging.CRITICAL)
    start = time.monotonic()
    quiet = warnings.catch_warnings()
    quiet.__enter__()
    warnings.simplefilter("ignore")
    try:
        for case in _config_cases(rng, keys, CASES):
            if time.monotonic() - start > BUDGET:
                failures.add("time budget exceeded", case, "over %ss" % BUDGET)
                break
            path.write_bytes(case if isinstance(case, bytes) else
                             case.encode("utf-8", "surrogatepass"))
            try:
                values = call(str(path))
            except allowed as exc:
                msg = str(exc)
                if not msg or "\n" in msg.strip() or "Traceback" in msg:
                    failures.add("error is not one line", case, repr(msg))
                continue
            except BaseException as exc:  # the property under test: nothing else escapes
                failures.add("raised %s" % type(exc).__name__, case, str(exc)[:200])
                continue
            problem = check_values(values)
            if problem:
                failures.add("accepted a bad value", case, problem)
            if (tmp_path / "CANARY").exists():
                failures.add("executed code from the config", case, "CANARY written")
                (tmp_path / "CANARY").unlink()
    finally:
        quiet.__exit__(None, None, None)
        logging.disable(logging.NOTSET)
        os.chdir(cwd)
    return failures


def _typed(values, types):
    """A problem string when a known key holds a value of another type, else None."""
    for key, want in types.items():
        if key not in values:
            continue
        v = values[key]
        ok = any(type(v) is t for t in want) or (v is None and type(None) in want)
        if not ok:
            return "%s = %r is not %s" % (key, v, "/".join(t.__name__ for t in want))
    return None


# ---- config readers ---------------------------------------------------------------------------


def test_host_config_reader_raises_only_config_errors(tmp_path):
    types = dict((k, (t,) if d is not None else (t, type(None)))
                 for k, (t, d) in host.CONFIG_KEYS.items())

    def call(path):
        cfg, layout = host.load_settings(path, True)
        return cfg

    failures = _fuzz_reader(tmp_path, host.CONFIG_KEYS, call, host.ConfigError,
                            lambda v: _typed(v, types), SEED)
    failures.check("host load_settings")


def test_runner_config_reader_raises_only_config_errors(tmp_path):
    types = dict((k, t) for k, t, _ in runner.RUNNER_KEYS)
    failures = _fuzz_reader(tmp_path, types, runner.load_config, runner.ConfigError,
                            lambda v: _typed(v, types), SEED + 1)
    failures.check("runner load_config")


@pytest.mark.parametrize("role", ["host", "runner"])
def test_check_config_reader_raises_only_config_errors(tmp_path, role):
    assert check is not None, "kohaku_overlay_check.py does not import"
    keys = check.ROLE_KEYS[role]
    types = dict((k, tuple(v[0]) + ((type(None),) if v[2] else ())) for k, v in keys.items())

    def lenient(values):
        # the check script takes int where float is allowed; bool is never an int
        for key, want in types.items():
            v = values.get(key)
            if key in values and not (isinstance(v, want) and not (
                    isinstance(v, bool) and bool not in want)):
                return "%s = %r is not %s" % (key, v, want)
        return None

    failures = _fuzz_reader(tmp_path, keys, lambda p: check.load_config(role, p, True)[0],
                            check.ConfigError, lenient, SEED + 2)
    failures.check("check load_config(%s)" % role)


# ---- the host API: parse_request --------------------------------------------------------------

CL_VALUES = ["0", "5", "17", "65536", "65537", "-1", "+5", " 5", "5 ", "1e3", "0x10", "\u00b2",
             "\u00b9", "\u00b3", "99999999999999", "999999999999", "", "5, 5", "abc", "\u0665"]


def _request_bytes(rng):
    method = rng.choice(["GET", "POST", "PUT", "DELETE", "HEAD", "get", "", "POST\x00",
                         _rand_text(rng, rng.randint(1, 8), string.ascii_letters)])
    path = rng.choice(["/healthz", "/api/overlay/register", "/api/overlay/status",
                       "/api/overlay/heartbeat/r1", "/", "*", "/%00", "/\u00e9",
                       "/api/overlay/" + "a" * rng.randint(0, 3000)])
    version = rng.choice(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/1.1 x", "", "http/1.1"])
    body = rng.choice([b"", b"{}", b'{"a": 1}', bytes(rng.randrange(256) for _ in range(20)),
                       b"x" * rng.randint(0, 70000)])
    headers = []
    for _ in range(rng.randint(0, 4)):
        r = rng.random()
        if r < 0.45:
            headers.append("Content-Length: " + rng.choice(CL_VALUES + [str(len(body))] * 6))
        elif r < 0.55:
            headers.append("Transfer-Encoding: " + rng.choice(["chunked", "gzip", "identity", ""]))
        elif r < 0.7:
            headers.append("Authorization: " + rng.choice(
                ["Bearer " + TOKEN, "Bearer", "Basic abc", "Bearer \u00e9\u00e9", ""]))
        else:
            headers.append(rng.choice([" Folded: x", "NoColon", ":empty", "X: " + "y" * 17000,
                                       "Host: a", "content-length : 5", "X:\x00"]))
    line = " ".join(p for p in (method, path, version) if rng.random() < 0.95)
    head = "\r\n".join([line] + headers).encode("latin-1", "replace")
    sep = rng.choice([b"\r\n\r\n"] * 8 + [b"\n\n", b"\r\n", b""])
    buf = head + sep + body
    if rng.random() < 0.2:  # a prefix: what arrives after the first reads
        buf = buf[:rng.randint(0, len(buf))]
    return buf


def test_parse_request_raises_only_4xx_api_errors():
    rng = random.Random(SEED + 3)
    failures = Failures()
    start = time.monotonic()
    for _ in range(PARSE_CASES):
        buf = _request_bytes(rng)
        try:
            got = host.parse_request(buf)
        except host.ApiError as exc:
            if not 400 <= exc.status < 500 or not exc.message:
                failures.add("ApiError %d" % exc.status, buf[:200], exc.message)
            continue
        except Exception as exc:
            failures.add("raised %s" % type(exc).__name__, buf[:200], str(exc)[:200])
            continue
        if got is None:
            if b"\r\n\r\n" in buf and len(buf) > host.MAX_HEADER + host.MAX_BODY + 8:
                failures.add("waits for more on a complete request", buf[:200], "")
            continue
        method, path, headers, body = got
        length = headers.get("content-length")
        if length is None and body is not None:
            failures.add("body without Content-Length", buf[:200], repr(body[:50]))
        if length is not None and (body is None or len(body) != int(length)):
            failures.add("body length differs from Content-Length", buf[:200],
                         "%r vs %d" % (length, len(body or b"")))
        if "transfer-encoding" in headers:
            failures.add("accepted Transfer-Encoding", buf[:200], "")
    assert time.monotonic() - start < BUDGET
    failures.check("parse_request")


def test_parse_request_refuses_non_ascii_digit_content_length():
    """latin-1 '\u00b2' is a digit to str.isdigit() but not to int(): must be a 400."""
    buf = ("POST /api/overlay/register HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\nab"
           .encode("latin-1"))
    with pytest.raises(host.ApiError) as info:
        host.parse_request(buf)
    assert info.value.status == 400


# ---- the host API: dispatch with a fake hub ---------------------------------------------------


class FakeHub(object):
    """What Api needs of the Hub, recording every change it is asked for."""

    def __init__(self, token):
        self.cfg = {"OVERLAY_TOKEN": token, "HOST_REACHABLE_ADDRESS": HOST_ADDR,
                    "OVERLAY_VXLAN_ID": 100, "OVERLAY_VXLAN_PORT": 4789, "OVERLAY_MTU": 1450,
                    "OVERLAY_ENABLED": True}
        self.layout = host.Layout()
        self.submitted = []
        self.beats = []

    def status(self):
        return {"total": 0, "allocations": []}

    def submit(self, kind, timeout=30, **args):
        self.submitted.append((kind, args))
        if kind == "register":
            answer = {"runner_name": args["runner_name"]}
            answer.update(self.layout.allocation(1, self.cfg))
            return 200, answer
        if kind == "release":
            return (200, {"released": True}) if args["name"] == "known" else \
                (404, {"error": "runner %s has no allocation" % args["name"]})
        return 200, {"released": 0}

    def heartbeat(self, name, peer):
        self.beats.append((name, peer))
        if name != "known":
            raise host.ApiError(404, "runner {} is not registered here".format(name))
        return {"ok": True, "encryption": "none"}

    def peers(self):
        return 7, [{"runner_name": "known", "runner_id": 1, "subnet": "10.1.0.0/16",
                    "physical_ip": "198.51.100.12", "vtep_mac": "02:6b:64:00:00:01"}]

    def direct_settings(self):
        return {"direct_routing": True, "peers_version": 7}


def _valid_registration(req, peer, layout):
    """An independent reading of the SPEC's registration rules: None when valid, else why."""
    if not isinstance(req, dict):
        return "not an object"
    for field, kind in (("runner_name", str), ("physical_ip", str), ("vxlan_id", int),
                        ("vxlan_port", int), ("mtu", int)):
        if type(req.get(field)) is not kind:
            return "field %s" % field
    prev = req.get("previous_runner_id")
    if prev is not None and type(prev) is not int:
        return "previous_runner_id"
    if not NAME_FULL.fullmatch(req["runner_name"]):
        return "runner_name %r" % req["runner_name"]
    try:
        ip = ipaddress.IPv4Address(req["physical_ip"])
    except ValueError:
        return "physical_ip"
    if (ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local
            or ip.is_reserved or ip in layout.network or str(ip) == HOST_ADDR
            or str(ip) != peer or str(ip) != req["physical_ip"]):
        return "physical_ip %s" % ip
    if (req["vxlan_id"], req["vxlan_port"], req["mtu"]) != (100, 4789, 1450):
        return "settings"
    return None


NAMES = ["runner1", "known", "a" * 63, "a" * 64, "a" * 200, "../etc", "a/b", "a b", "", "-x",
         ".x", "r\u00e9", "runner1\n", "r\x00", "r1 ", "\u0661", "A.b_c-9", "x" * 62 + "\n"]
IPS = ["198.51.100.11", "198.51.100.1", "127.0.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255",
       "169.254.1.1", "10.1.0.5", "240.0.0.1", "198.51.100.011", "198.51.100.11\n",
       " 198.51.100.11", "\u0661.2.3.4", "::1", "1.2.3", "", "198.51.100.12"]
WEIRD = [None, True, False, 0, -1, 1.0, 100.0, 2 ** 70, -2 ** 70, "100", [], {}, [100],
         float("nan"), float("inf"), "x" * 1000]


def _registration_body(rng, peer):
    req = {"runner_name": rng.choice(NAMES), "physical_ip": rng.choice(IPS + [peer] * 6),
           "vxlan_id": 100, "vxlan_port": 4789, "mtu": 1450}
    if rng.random() < 0.3:
        req["previous_runner_id"] = rng.choice([1, 0, -5, 255, 256, 2 ** 64, None, True, "1"])
    for field in list(req):
        r = rng.random()
        if r < 0.08:
            del req[field]
        elif r < 0.2:
            req[field] = rng.choice(WEIRD)
        elif r < 0.25 and field in ("vxlan_id", "vxlan_port", "mtu"):
            req[field] = rng.choice([101, 4790, 1500, 0])
    r = rng.random()
    if r < 0.08:
        return json.dumps([req]).encode()
    if r < 0.12:
        return json.dumps(req).encode()[:rng.randint(0, 40)]  # truncated JSON
    if r < 0.15:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 100)))
    if r < 0.17:
        return b"[" * rng.choice([100, 1000, 60000])  # nesting deeper than the parser's stack
    if r < 0.19:
        return b'{"runner_name": "' + b"\xff\xfe" + b'"}'
    if r < 0.21:
        return json.dumps(req).encode("utf-16")
    if r < 0.23:
        return None
    return json.dumps(req, allow_nan=True).encode()


def _auth(rng, token):
    return rng.choice([None, "Bearer " + token, "bearer " + token, "Bearer  " + token + " ",
                       "Bearer wrong", "Bearer " + token[:-1], "Bearer " + token + "x",
                       "Bearer \u00e9" + token, "Bearer " + "z" * 100000, "Basic " + token,
                       token, "", "Bearer", "Bearer " + token.upper(),
                       ("Bearer " + token + "\u00e9").encode("utf-8").decode("latin-1")])


def test_api_dispatch_answers_json_errors_and_never_5xx(caplog):
    rng = random.Random(SEED + 4)
    failures = Failures()
    caplog.set_level(logging.DEBUG)
    sent_tokens = set()
    start = time.monotonic()
    for i in range(API_CASES):
        token = [TOKEN, "", "t\u00f6ken-\u00e9-lat1n-only"][i % 3]
        hub = FakeHub(token)
        api = host.Api(hub)
        peer = rng.choice(["198.51.100.11", "198.51.100.12", "127.0.0.1"])
        method = rng.choice(["GET", "POST", "PUT", "DELETE", "OPTIONS", "post", ""])
        path = "/api/overlay/register" if rng.random() < 0.5 else rng.choice([
            "/healthz", "/healthz?x=1", "/api/overlay/register", "/api/overlay/register/x",
            "/api/overlay/status", "/api/overlay/cleanup", "/api/overlay/heartbeat/known",
            "/api/overlay/heartbeat/" + rng.choice(NAMES).replace("\n", "%0a"),
            "/api/overlay/release/" + rng.choice(["known", "../x", "%2e%2e", "a%2fb", "%ff",
                                                  "%00", "a" * 300, "", "x/y"]),
            "/api/overlay/", "/api/overlay", "/", "", "/api/overlay/heartbeat/",
            "/api/overlay/status/../register", "/api/overlay/" + "\u00e9" * 50])
        headers = {}
        auth = ("Bearer " + token) if rng.random() < 0.4 else _auth(rng, token or TOKEN)
        if auth is not None:
            headers["authorization"] = auth
            if len(auth) > 12:
                sent_tokens.add(auth.split(" ", 1)[-1].strip())
        body = _registration_body(rng, peer) if rng.random() < 0.7 else rng.choice(
            [None, b"", b"{}", b"null"])
        case = (method, path, headers.get("authorization", "")[:60], body[:120] if body else body,
                peer, "token=%r" % token)
        try:
            got = api.dispatch(method, path, headers, body, peer)
        except Exception as exc:
            failures.add("dispatch raised %s" % type(exc).__name__, case, str(exc)[:200])
            continue
        if not (isinstance(got, tuple) and len(got) == 2 and type(got[0]) is int and
                isinstance(got[1], dict)):
            failures.add("answer is not (int, dict)", case, repr(got)[:200])
            continue
        status, answer = got
        try:
            wire = host.http_response(status, answer)
        except Exception as exc:
            failures.add("answer cannot be sent (%s)" % type(exc).__name__, case, str(exc)[:100])
            continue
        if not wire.startswith(("HTTP/1.1 %d " % status).encode()):
            failures.add("bad status line", case, wire[:40])
        if status >= 500:
            failures.add("5xx for client input", case, "%d %r" % (status, answer))
        elif status >= 400 and not (isinstance(answer.get("error"), str) and answer["error"]):
            failures.add("error answer without an error sentence", case, repr(answer))
        if token and token in json.dumps(answer, ensure_ascii=False):
            failures.add("token echoed in the answer", case, repr(answer)[:200])
        needs_auth = path.split("?")[0].startswith("/api/overlay/")
        right = auth is not None and auth.partition(" ")[0].lower() == "bearer" and \
            auth.partition(" ")[2].strip().encode("latin-1", "replace") == token.encode("utf-8")
        if token and needs_auth and not right and status not in (401, 404):
            failures.add("no 401 for a wrong token", case, "%d %r" % (status, answer))
        for kind, args in hub.submitted:
            if kind != "register":
                continue
            try:
                req = json.loads(body.decode("utf-8"))
            except Exception:
                req = None
            why = _valid_registration(req, peer, hub.layout)
            if why:
                failures.add("invalid registration reached the hub (%s)" % why.split()[0],
                             case, why)
            if token and not right:
                failures.add("registration without the token reached the hub", case, "")
    elapsed = time.monotonic() - start
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for t in sorted(sent_tokens | {TOKEN}):
        if len(t) >= 8 and t in logged:
            failures.add("a token appears in the log", t[:40], "")
    assert elapsed < BUDGET
    failures.check("Api.dispatch")


def test_api_dispatch_deeply_nested_json_is_a_400():
    """A 64 KiB body of '[' overflows json's recursion: that is bad input (400), not a 500."""
    api = host.Api(FakeHub(""))
    status, answer = api.dispatch("POST", "/api/overlay/register", {}, b"[" * 60000,
                                  "198.51.100.11")
    assert status == 400
    assert "error" in answer


def test_api_dispatch_name_with_trailing_newline_is_refused():
    """`$` in a regex matches before a final newline: 'runner1\\n' must still be a 400."""
    hub = FakeHub("")
    api = host.Api(hub)
    body = json.dumps({"runner_name": "runner1\n", "physical_ip": "198.51.100.11",
                       "vxlan_id": 100, "vxlan_port": 4789, "mtu": 1450}).encode()
    status, answer = api.dispatch("POST", "/api/overlay/register", {}, body, "198.51.100.11")
    assert (status, hub.submitted) == (400, [])


# ---- a real server on 127.0.0.1 survives a volley of random requests --------------------------


def _exchange(port, data, timeout):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as exc:
        return ("(cannot connect: %s)" % exc).encode()
    try:
        try:
            s.sendall(data)
        except OSError:
            pass
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, OSError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        s.close()


def test_api_server_survives_random_requests():
    api = host.Api(FakeHub(TOKEN))
    server = host.ApiServer(api.dispatch, "127.0.0.1", 0, deadline=1.0)
    thread = threading.Thread(target=server.serve, name="fuzz-api")
    thread.daemon = True
    thread.start()
    rng = random.Random(SEED + 5)
    failures = Failures()
    try:
        cases = [_request_bytes(rng) for _ in range(150)]
        cases.append("POST /api/overlay/register HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\nab"
                     .encode("latin-1"))
        cases.append(b"POST /api/overlay/register HTTP/1.1\r\nContent-Length: 60000\r\n\r\n" +
                     b"[" * 60000)
        results = [None] * len(cases)

        def one(k):
            results[k] = _exchange(server.port, cases[k], timeout=5)

        threads = [threading.Thread(target=one, args=(k,)) for k in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        for case, raw in zip(cases, results):
            if not raw:
                continue  # the server closed without an answer: allowed only when the client
                # sent an incomplete request, which the deadline (408) answers; checked below
            head, _, body = raw.partition(b"\r\n\r\n")
            m = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
            if not m:
                failures.add("not an HTTP answer", case[:200], raw[:100])
                continue
            status = int(m.group(1))
            try:
                answer = json.loads(body.decode())
            except ValueError:
                failures.add("answer is not JSON", case[:200], body[:100])
                continue
            if status >= 500 and status != 503:
                failures.add("%d for client input" % status, case[:200], answer)
            if status >= 400 and "error" not in answer:
                failures.add("error without an error sentence", case[:200], answer)
        for case, raw in zip(cases, results):
            if not raw:
                failures.add("no answer at all", case[:200], "")
        health = _exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        if not health.startswith(b"HTTP/1.1 200 "):
            failures.add("server stopped answering", "GET /healthz afterwards", health[:100])
    finally:
        server.shutdown()
        thread.join(5)
    failures.check("ApiServer")
