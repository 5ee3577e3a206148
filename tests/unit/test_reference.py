"""docs/reference.md is what docs/gen_reference.py writes from the scripts' own tables, and the
generator's hand-written endpoint table is what the Host's router accepts (issue 10.7).

When a test here fails after you added a config key, a command line option or an endpoint, run
`python3 docs/gen_reference.py` (and, for an endpoint, add its row to ENDPOINTS there first).
"""

import difflib
import importlib.util
import re
from pathlib import Path

import pytest

import kohaku_overlay_host as host

ROOT = Path(__file__).resolve().parent.parent.parent
HOW = "run `python3 docs/gen_reference.py` and commit docs/reference.md"


def generator():
    spec = importlib.util.spec_from_file_location("gen_reference",
                                                  str(ROOT / "docs" / "gen_reference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GEN = generator()


def test_reference_is_what_the_generator_writes():
    current = (ROOT / "docs" / "reference.md").read_text()
    wanted = GEN.render()
    if current != wanted:
        diff = list(difflib.unified_diff(current.splitlines(), wanted.splitlines(),
                                         "docs/reference.md", "what the scripts' tables say",
                                         lineterm="", n=0))
        pytest.fail("docs/reference.md is out of date: %s\n%s" % (HOW, "\n".join(diff[:30])),
                    pytrace=False)


def test_check_mode_says_the_command_that_regenerates(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "reference.md"
    stale.write_text("old\n")
    monkeypatch.setattr(GEN, "TARGET", stale)
    assert GEN.main(["--check"]) == 1
    assert capsys.readouterr().err == ("docs/reference.md is out of date: run "
                                       "python3 docs/gen_reference.py\n")
    assert GEN.main([]) == 0
    assert GEN.main(["--check"]) == 0
    assert stale.read_text() == GEN.render()


def test_every_key_and_option_of_the_scripts_is_in_the_reference():
    text = GEN.render()
    mods = GEN.load_scripts()
    for key in mods["kohaku_overlay_host"].CONFIG_KEYS:
        assert "| `%s` |" % key in text
    for key, _types, _default in mods["kohaku_overlay_runner"].RUNNER_KEYS:
        assert "| `%s` |" % key in text
    for name in GEN.SCRIPTS:
        for flag in re.findall(r"add_argument\(\s*\"(--[a-z-]+)\"",
                               (ROOT / (name + ".py")).read_text()):
            if flag not in ("--version", "--help"):
                assert "`%s" % flag in text, (name, flag)


def test_the_readme_points_at_the_reference_and_nothing_outside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "docs/reference.md" in readme
    for doc in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")):
        text = doc.read_text()
        assert "../shared" not in text and "/work/" not in text, doc.name


# ---- ENDPOINTS against the Host's router ----

class FakeHub(object):
    """What Api needs of a Hub; every call answers 200."""

    def __init__(self):
        self.cfg = dict((k, d) for k, (_t, d) in host.CONFIG_KEYS.items())
        self.cfg.update(OVERLAY_ENABLED=True, OVERLAY_TOKEN="")
        self.layout = host.Layout(self.cfg["OVERLAY_SUBNET"], self.cfg["OVERLAY_HOST_IP"],
                                  self.cfg["OVERLAY_HOST_PREFIX"])

    def __getattr__(self, name):
        return lambda *a, **kw: (200, {"ok": True})

    def peers(self):
        return 0, []

    def direct_settings(self):
        return {"direct_routing": False, "peers_version": 0}


def answer(method, path):
    status, body = host.Api(FakeHub()).dispatch(method, path, {}, None, "198.51.100.11")
    return status, body


def routed(method, path):
    """True when the router has an endpoint there (whatever it then answers)."""
    status, body = answer(method, path)
    return not (status == 405 or (status == 404 and "no such endpoint" in str(body)))


def concrete(path):
    return path.replace("<name>", "runner1")


DOCUMENTED = [(m, p) for m, p, *_ in GEN.ENDPOINTS]
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")


@pytest.mark.parametrize("method, path", DOCUMENTED)
def test_each_documented_endpoint_is_routed_and_other_methods_get_405(method, path):
    assert routed(method, concrete(path)), "%s %s is documented but not routed" % (method, path)
    for other in METHODS:
        if other != method:
            assert answer(other, concrete(path))[0] == 405, (other, path)


def router_candidates():
    """Paths the Host's source names in its router: `path == "..."` and the verbs compared."""
    text = (ROOT / "kohaku_overlay_host.py").read_text()
    paths = set(re.findall(r"path == \"(/[^\"]*)\"", text))
    verbs = set(re.findall(r"verb == \"([a-z_-]+)\"", text))
    for group in re.findall(r"verb in \(([^)]*)\)", text):
        verbs |= set(re.findall(r"\"([a-z_-]+)\"", group))
    return paths, verbs


def test_the_router_has_no_endpoint_the_reference_leaves_out():
    paths, verbs = router_candidates()
    documented_verbs = set(p.split("/")[3] for _m, p in DOCUMENTED if p.startswith("/api/"))
    # the scan must still see the router (a rewrite of it needs a new scan here)
    assert documented_verbs <= verbs and "/healthz" in paths, (
        "tests/unit/test_reference.py no longer finds the Host's routes: update router_candidates")
    candidates = set(paths)
    for verb in verbs:
        candidates |= {"/api/overlay/" + verb, "/api/overlay/%s/runner1" % verb}
    documented = set((m, concrete(p)) for m, p in DOCUMENTED)
    missing = sorted((m, p) for p in candidates for m in METHODS
                     if routed(m, p) and (m, p) not in documented)
    assert missing == [], ("the Host routes %s but docs/gen_reference.py ENDPOINTS has no row "
                           "for it: add one, then %s" % (missing, HOW))
