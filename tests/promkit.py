"""Prometheus helpers for the tests: a strict reader of the text exposition format, promtool, and
a real `prometheus` server run inside a lab namespace.

    import promkit
    fams = promkit.parse(text)          # {family: Fam(type, help, samples)}; AssertionError on
                                        #   any line that does not parse, a second HELP/TYPE, a
                                        #   sample before its TYPE, a series given twice
    fams["x_total"].samples             # {(sample name, (("label", "value"), ...)): float}
    promkit.value(fams, "x_total", kind="rules")   # one sample's value by labels (KeyError)
    promkit.promtool_check(text)        # `promtool check metrics` on stdin: AssertionError with its
                                        #   complaints; skip where promtool is absent (CI: fail)

    with promkit.Prometheus(lab, lab.host, targets=["198.51.100.1:8000"], token="t") as prom:
        prom.wait_up()                  # until the target's `up` is 1 (AssertionError + logs)
        prom.query('kohaku_overlay_runners{state="active"}')  # -> [(labels dict, float)]

The server gets its own config, storage folder and log under the node's workdir, listens on the
node's own address (port 9090 by default), scrapes every second with `authorization: credentials`
(a bearer token), and is stopped and its files removed on exit (the lab's teardown would also
kill it: it runs inside the lab's namespace and names the lab's workdir).
"""

import json
import math
import os
import re
import shutil
import subprocess
from collections import namedtuple

Fam = namedtuple("Fam", "type help samples")

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"'
_LABEL = LABEL.replace("(", "(?:").replace("(?:?:", "(?:")
SAMPLE_RE = re.compile(r"^(?P<name>%s)(?:\{(?P<labels>%s(?:,%s)*)?,?\})? (?P<value>\S+)"
                       r"(?: -?\d+)?$" % (NAME, _LABEL, _LABEL))
LABEL_RE = re.compile(LABEL)
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")
SUFFIXES = ("_bucket", "_sum", "_count")


def unescape(value):
    return re.sub(r"\\(\\|\"|n)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _family_of(name, fams):
    if name in fams:
        return name
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name[:-len(suffix)] in fams:
            return name[:-len(suffix)]
    return None


def parse(text):
    """Read exposition text strictly (see the module docstring); returns {family: Fam}."""
    assert text.endswith("\n"), "the text must end with a newline"
    fams, helps, order = {}, {}, []
    for n, line in enumerate(text.split("\n")[:-1], 1):
        where = "line %d %r" % (n, line)
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            assert len(parts) >= 3 and re.match("^%s$" % NAME, parts[2]), where
            name = parts[2]
            if parts[1] == "HELP":
                assert name not in helps, "second HELP for %s at %s" % (name, where)
                helps[name] = unescape(parts[3] if len(parts) > 3 else "")
            else:
                assert name not in fams, "second TYPE for %s at %s" % (name, where)
                assert len(parts) == 4 and parts[3] in TYPES, where
                fams[name] = Fam(parts[3], None, {})
                order.append(name)
            continue
        assert line and not line.startswith(" "), "empty or indented %s" % where
        if line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        assert m, "a sample that does not parse at %s" % where
        name, value = m.group("name"), m.group("value")
        family = _family_of(name, fams)
        assert family is not None, "sample before (or without) its TYPE at %s" % where
        assert family == order[-1], "family %s is not contiguous at %s" % (family, where)
        labels = []
        if m.group("labels"):
            labels = [(k, unescape(v)) for k, v in LABEL_RE.findall(m.group("labels"))]
        names = [k for k, _ in labels]
        assert len(set(names)) == len(names), "a label given twice at %s" % where
        key = (name, tuple(sorted(labels)))
        assert key not in fams[family].samples, "series given twice at %s" % where
        fams[family].samples[key] = _number(value, where)
        if fams[family].type == "counter":
            assert name.endswith("_total"), "counter %s without _total" % name
            assert fams[family].samples[key] >= 0, "negative counter at %s" % where
    return {k: Fam(f.type, helps.get(k), f.samples) for k, f in fams.items()}


def _number(text, where):
    special = {"NaN": float("nan"), "+Inf": float("inf"), "-Inf": float("-inf")}
    if text in special:
        return special[text]
    try:
        value = float(text)
    except ValueError:
        raise AssertionError("value %r is not a number at %s" % (text, where))
    assert not math.isinf(value) and text.lower() not in ("nan", "inf"), where
    return value


def value(fams, family, _sample=None, **labels):
    """The value of the one sample of `family` (named `_sample`, default the family) with
    exactly these labels."""
    want = tuple(sorted((k, str(v)) for k, v in labels.items()))
    return fams[family].samples[(_sample or family, want)]


def samples(fams, family, **labels):
    """{labels dict: value} of the samples of `family` whose labels include these."""
    out = []
    for (_, key), v in sorted(fams[family].samples.items()):
        d = dict(key)
        if all(d.get(k) == str(w) for k, w in labels.items()):
            out.append((d, v))
    return out


def _require_tool(name):
    import pytest
    path = shutil.which(name) or next((p for p in ("/usr/bin/" + name, "/usr/sbin/" + name)
                                       if os.path.exists(p)), None)
    if path:
        return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true but %s is not installed (.ci/install installs the Debian package "
                    "prometheus)" % name, pytrace=False)
    pytest.skip("%s is not installed (apt-get install prometheus)" % name)


def promtool_check(text):
    """`promtool check metrics` (parse and lint) on `text`; AssertionError quoting its findings."""
    promtool = _require_tool("promtool")
    res = subprocess.run([promtool, "check", "metrics"], input=text, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert res.returncode == 0 and not res.stdout.strip(), \
        "promtool check metrics exited %d:\n%s" % (res.returncode, res.stdout)


READY = ("import sys, urllib.request as u\n"
         "sys.exit(0 if u.urlopen(sys.argv[1], timeout=2).status == 200 else 1)")
QUERY = r"""
import json, sys, urllib.parse, urllib.request
url = sys.argv[1] + "/api/v1/query?" + urllib.parse.urlencode({"query": sys.argv[2]})
print(urllib.request.urlopen(url, timeout=10).read().decode())
"""

CONFIG = """global:
  scrape_interval: {interval}
  scrape_timeout: {timeout}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: {job}
    metrics_path: {path}
    authorization:
      credentials: {token}
    static_configs:
      - targets: {targets}
"""


class Prometheus(object):
    """A real prometheus server in `node`'s namespace of `lab` (see the module docstring)."""

    def __init__(self, lab, node, targets, token, port=9090, job="kohaku-overlay-host",
                 path="/metrics", interval="1s"):
        self.lab, self.node, self.port = lab, node, port
        self.dir = node.workdir / ("prometheus-%d" % port)
        self.key = "prometheus-%s-%d" % (node.name, port)
        self.url = "http://%s:%d" % (node.ip, port)
        self.targets, self.token, self.job = list(targets), token, job
        self.path, self.interval = path, interval
        self.popen = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        binary = _require_tool("prometheus")
        if self.dir.exists():
            shutil.rmtree(str(self.dir))
        (self.dir / "data").mkdir(parents=True)
        config = self.dir / "prometheus.yml"
        config.write_text(CONFIG.format(interval=self.interval, timeout=self.interval,
                                        job=self.job, path=self.path,
                                        token=json.dumps(self.token),
                                        targets=json.dumps(self.targets)))
        os.chmod(str(config), 0o600)
        argv = self.lab.enter(self.node) + [
            binary, "--config.file=%s" % config, "--storage.tsdb.path=%s" % (self.dir / "data"),
            "--web.listen-address=%s:%d" % (self.node.ip, self.port),
            "--storage.tsdb.retention.time=1h", "--log.level=warn"]
        self.popen = self.lab._spawn(self.key, self.dir / "prometheus.log", argv,
                                     self.lab._env(self.node))
        self.lab.wait_for(self._ready, timeout=30, interval=0.3, what="prometheus to answer",
                          log=[self.key])
        return self

    def _ready(self):
        if self.popen.poll() is not None:
            import labkit
            raise labkit.LabDied("prometheus exited with %s:\n%s" % (
                self.popen.returncode, self.lab.log_tail(self.key)))
        res = self.lab.sh(self.node, self.lab.python, "-c", READY, self.url + "/-/ready",
                          check=False, timeout=10)
        return res.returncode == 0

    def query(self, expr):
        """An instant query -> [(labels dict, float value)], sorted by labels."""
        res = self.lab.sh(self.node, self.lab.python, "-c", QUERY, self.url, expr, timeout=20)
        answer = json.loads(res.stdout)
        assert answer.get("status") == "success", answer
        return sorted(((r["metric"], float(r["value"][1])) for r in answer["data"]["result"]),
                      key=lambda x: sorted(x[0].items()))

    def wait_up(self, timeout=30):
        """Until every target scraped at least once with up == 1."""
        def ok():
            rows = self.query('up{job="%s"}' % self.job)
            return len(rows) == len(self.targets) and all(v == 1 for _, v in rows)
        self.lab.wait_for(ok, timeout=timeout, interval=0.5, what="prometheus to scrape %s"
                          % self.targets, log=[self.key])

    def stop(self):
        if self.popen is not None:
            self.lab._stop(self.key, grace=10)
            self.popen = None
        shutil.rmtree(str(self.dir), ignore_errors=True)

    def wait_for_query(self, expr, pred, timeout=30, what=None):
        """Poll `expr` until pred(rows) holds; returns the rows."""
        box = []

        def ok():
            rows = self.query(expr)
            box[:] = [rows]
            return pred(rows)
        self.lab.wait_for(ok, timeout=timeout, interval=0.5, what=what or expr, log=[self.key])
        return box[0]
