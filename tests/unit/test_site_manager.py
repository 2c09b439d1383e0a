"""The site manager's start/stop logic with stand-in daemons (no real services)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from aifactory.infra.site import manager, procs, services
from aifactory.infra.site import slurm_parts as sp
from aifactory.infra.site.layout import Site
from aifactory.tasks.core.errors import SiteError

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)", "aif-site-test-daemon"]
FAILER = ["sh", "-c", "echo starting; echo 'fatal: cannot bind 127.0.0.1:1'; exit 3"]


@pytest.fixture
def fake_parts(monkeypatch: pytest.MonkeyPatch) -> list[manager.Part]:
    for mod, name in [(sp, "ensure_packages"), (sp, "render"), (sp, "link_default_munge_socket"),
                      (sp, "unlink_default_munge_socket"), (sp, "ensure_accounts"),
                      (sp, "reload_users"), (sp, "ensure_budget_limits"),
                      (services, "ensure_buckets"), (services, "seed_dataspace"),
                      (services, "ensure_crash_detector"), (services, "ensure_work_pools"),
                      (services, "ensure_saved_searches"),
                      (services, "ensure_registry_access"),
                      (manager, "_s3_setup"),
                      (manager, "_startup_users")]:  # fmt: skip
        monkeypatch.setattr(mod, name, lambda *a, **k: None)
    # A new site has two nodes: their network is machine-wide, never a unit test's to make.
    monkeypatch.setattr(manager.nodes, "ensure_network", lambda site: [])
    monkeypatch.setattr(manager.nodes, "remove_network", lambda site: [])
    parts = [
        manager.Part("one", "aif-site-test-daemon", lambda s: SLEEPER, lambda s: True,
                     lambda s: "here:1"),
        manager.Part("two", "aif-site-test-daemon", lambda s: SLEEPER, lambda s: True,
                     lambda s: "here:2"),
    ]  # fmt: skip
    monkeypatch.setattr(manager, "PARTS", parts)
    return parts


def test_up_is_idempotent_and_down_stops_in_reverse(
    tmp_path: Path, fake_parts: list[manager.Part]
) -> None:
    site_dir = tmp_path / "site"
    msgs: list[str] = []
    first = manager.up(site_dir, progress=msgs.append)
    try:
        assert [(p.name, p.healthy) for p in first] == [("one", True), ("two", True)]
        assert "starting one" in msgs and "starting two" in msgs
        state = json.loads((site_dir / "site.json").read_text())
        for p in first:
            assert state[p.name]["pid"] == p.pid
            assert procs.read_pidfile(site_dir / "pids" / f"{p.name}.pid") == p.pid
            assert (site_dir / "logs" / f"{p.name}.log").exists()
        msgs.clear()
        second = manager.up(site_dir, progress=msgs.append)
        assert [p.pid for p in second] == [p.pid for p in first]
        assert not [m for m in msgs if m.startswith("starting")]
    finally:
        msgs.clear()
        stopped = manager.down(site_dir, progress=msgs.append)
    assert stopped == ["two", "one"]
    assert not any(procs.alive(p.pid) for p in first)
    assert not (site_dir / "pids" / "one.pid").exists()
    assert all(not p.healthy for p in manager.status(site_dir))


def test_a_dead_part_is_restarted(tmp_path: Path, fake_parts: list[manager.Part]) -> None:
    site_dir = tmp_path / "site"
    first = manager.up(site_dir, progress=lambda _m: None)
    try:
        rec = json.loads((site_dir / "site.json").read_text())["two"]
        assert procs.stop(rec, "aif-site-test-daemon", timeout=5)
        assert [p.healthy for p in manager.status(site_dir)] == [True, False]
        msgs: list[str] = []
        again = manager.up(site_dir, progress=msgs.append)
        assert again[0].pid == first[0].pid and again[1].pid != first[1].pid
        assert any("stale" in m for m in msgs)
    finally:
        manager.down(site_dir, progress=lambda _m: None)


def test_a_part_that_dies_fails_with_its_log_tail(
    tmp_path: Path, fake_parts: list[manager.Part], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = manager.Part("broken", "sh", lambda s: FAILER, lambda s: False, lambda s: "x")
    monkeypatch.setattr(manager, "PARTS", [bad])
    with pytest.raises(SiteError) as err:
        manager.up(tmp_path / "site", progress=lambda _m: None)
    msg = str(err.value)
    assert msg.startswith("site part broken exited during start-up:")
    assert "starting | fatal: cannot bind 127.0.0.1:1" in msg and "\n" not in msg


def test_a_failed_up_leaves_nothing_it_started_running(
    tmp_path: Path, fake_parts: list[manager.Part], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: a site up that failed half-way left munged running (and its port taken).
    What this call started is stopped again; a part that was already up stays up."""
    site_dir = tmp_path / "site"
    manager.up(site_dir, progress=lambda _m: None)  # "one" and "two" are up
    try:
        before = {p.name: p.pid for p in manager.status(site_dir)}
        bad = manager.Part("broken", "sh", lambda s: FAILER, lambda s: False, lambda s: "x")
        three = manager.Part("three", "aif-site-test-daemon", lambda s: SLEEPER,
                             lambda s: True, lambda s: "here:3")  # fmt: skip
        monkeypatch.setattr(manager, "PARTS", [*fake_parts, three, bad])
        msgs: list[str] = []
        with pytest.raises(SiteError, match="site part broken exited"):
            manager.up(site_dir, progress=msgs.append)
        state = json.loads((site_dir / "site.json").read_text())
        assert "three" not in state and "broken" not in state
        assert any(m.startswith("stopped three") for m in msgs), msgs
        assert not [ln for ln in procs_named("aif-site-test-daemon")
                    if ln not in before.values()]  # fmt: skip
        assert {p.name: p.pid for p in manager.status(site_dir)[:2]} == before
    finally:
        monkeypatch.setattr(manager, "PARTS", fake_parts)
        manager.down(site_dir, progress=lambda _m: None)


def procs_named(tag: str) -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"]) if tag in (p.info["cmdline"] or [])]


def test_site_dir_is_always_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    lines = manager.env_lines(Path("rel/site"))
    assert f"export AIF_SITE_DIR={tmp_path / 'rel' / 'site'}" in lines
    assert Site(Path("x").resolve()).root.is_absolute()


def test_a_site_folder_with_a_space_is_reached_through_a_link_without_one(tmp_path: Path) -> None:
    """mariadb-install-db's chown and slurm.conf split paths at spaces: `aif site up` in a
    clone under `my work/` failed. The daemons get a space-free alias of the folder."""
    real = tmp_path / "my work" / "aif 'q" / ".aif" / "site"
    root = manager.site_root(real)
    assert not any(c.isspace() for c in str(root)) and root.resolve() == real.resolve()
    assert manager.site_root(real) == root  # stable: the same alias every time
    plain = tmp_path / "plain" / "site"
    assert manager.site_root(plain) == plain.resolve()
    root.unlink()


def test_a_retired_part_is_stopped_by_up_and_down(
    tmp_path: Path, fake_parts: list[manager.Part], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared worker of earlier versions (part ``worker``, now one per start-up): a
    site that still runs it gets it stopped, not orphaned, by the next ``up``."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    monkeypatch.setattr(manager, "RETIRED", {"old": "aif-site-test-daemon"})
    rec = procs.start("old", SLEEPER, site_dir / "old.log")
    (site_dir / "site.json").write_text(json.dumps({"old": rec}))
    msgs: list[str] = []
    try:
        manager.up(site_dir, progress=msgs.append)
        assert f"stopped old (pid {rec['pid']}): no longer a part of the site" in msgs
        assert not procs.owns(rec)
        assert "old" not in json.loads((site_dir / "site.json").read_text())
    finally:
        manager.down(site_dir, progress=msgs.append)
        procs.stop(rec, "aif-site-test-daemon")


def test_a_layout_out_of_range_is_refused_in_one_line(tmp_path: Path) -> None:
    from aifactory.infra.site import manager
    from aifactory.tasks.core.errors import SiteError

    for kwargs, word in (({"nodes_wanted": 40}, "--nodes 40"), ({"gpus_per_node": 0}, "--gpus")):
        with pytest.raises(SiteError, match=word) as err:
            manager._site(tmp_path / "s", **kwargs)  # type: ignore[arg-type]
        assert "\n" not in str(err.value)
    assert manager._site(tmp_path / "s").nodes == manager.DEFAULT_NODES  # a new site


def test_the_layout_a_site_has_is_kept_and_a_site_from_before_layouts_has_one_node(
    tmp_path: Path,
) -> None:
    from aifactory.infra.site import manager
    from aifactory.infra.site.layout import Site

    old = Site(tmp_path / "old")
    old.root.mkdir(parents=True)
    old.state_file.write_text(json.dumps({"munged": {"pid": 1}}))  # parts, no _layout
    assert manager._site(tmp_path / "old").nodes == 1
    kept = Site(tmp_path / "kept")
    kept.root.mkdir(parents=True)
    kept.state_file.write_text(json.dumps({manager.LAYOUT: {"nodes": 3, "gpus_per_node": 1}}))
    site = manager._site(tmp_path / "kept")
    assert (site.nodes, site.gpus_per_node) == (3, 1)
    assert manager._site(tmp_path / "kept", nodes_wanted=1).nodes == 1


def test_up_of_an_unchanged_one_node_site_leaves_its_slurmd_running(tmp_path: Path) -> None:
    """_change_layout touches nothing when the layout stays as it is (it used to stop the
    one node's slurmd on every `up`, which then started it again)."""
    from aifactory.infra.site import manager, procs
    from aifactory.infra.site.layout import Site

    site = Site(tmp_path / "s")
    rec = procs.start("slurmd", ["sleep", "60"], tmp_path / "slurmd.log")
    try:
        state = {manager.LAYOUT: manager.layout_of(site), "slurmd": rec}
        manager._change_layout(site, state, lambda m: None)
        assert procs.owns(rec) and state["slurmd"] == rec
    finally:
        procs.stop(rec, "sleep")


def test_a_host_that_cannot_make_the_nodes_network_is_told_about_one_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default site has two nodes in namespaces; where `ip` may not make them (a
    container without the capability), `up` stops with one line that names --nodes 1."""
    import subprocess

    from aifactory.infra.site import nodes
    from aifactory.infra.site.layout import Site
    from aifactory.tasks.core.errors import SiteError

    def ip(argv, **kw):  # type: ignore[no-untyped-def]
        if argv[:3] == ["ip", "link", "add"]:
            return subprocess.CompletedProcess(argv, 2, "", "RTNETLINK answers: Operation "
                                               "not permitted\n")  # fmt: skip
        return subprocess.CompletedProcess(argv, 0, "[]" if "-j" in argv else "", "")

    def run(argv, env=None, timeout=60, check=True, input_text=None):  # type: ignore[no-untyped-def]
        proc = ip(list(argv))
        if check and proc.returncode:
            raise SiteError(f"`{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    monkeypatch.setattr(nodes.procs, "run", run)
    with pytest.raises(SiteError) as err:
        nodes.ensure_network(Site(tmp_path / "s", nodes=2))
    msg = str(err.value)
    assert "Operation not permitted" in msg and "aif site up --nodes 1" in msg, msg
    assert "\n" not in msg and len(msg) < 500


def test_the_nodes_network_of_another_site_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bridge and the namespaces have machine-wide names: `down` of another site (a
    second clone's, a unit test's temporary one) removed the running site's compute nodes.
    The bridge now names the site that made it, and only that site removes it."""
    import subprocess

    from aifactory.infra.site import nodes

    calls: list[list[str]] = []

    def run(argv, env=None, timeout=60, check=True, input_text=None):  # type: ignore[no-untyped-def]
        argv = list(argv)
        calls.append(argv)
        if argv[:5] == ["ip", "-j", "link", "show", nodes.BRIDGE]:
            out = json.dumps([{"ifname": nodes.BRIDGE, "ifalias": "/srv/the other/site"}])
            return subprocess.CompletedProcess(argv, 0, out, "")
        if argv[:4] == ["ip", "-j", "addr", "show"]:
            return subprocess.CompletedProcess(argv, 0, json.dumps([{"ifname": nodes.BRIDGE}]), "")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(nodes.procs, "run", run)
    monkeypatch.setattr(nodes, "netns_names", lambda: ["aif-n1", "aif-n2"])
    mine = Site(tmp_path / "s", nodes=2)
    assert nodes.remove_network(mine) == []
    assert not [c for c in calls if "del" in c or c[:3] == ["ip", "netns", "pids"]], calls
    with pytest.raises(SiteError, match="belongs to the site in /srv/the other/site") as err:
        nodes.ensure_network(mine)
    assert "\n" not in str(err.value)
    assert not [c for c in calls if "add" in c or "alias" in c], calls


def test_a_part_started_with_other_settings_is_restarted(
    tmp_path: Path, fake_parts: list[manager.Part], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part's environment changed (the profile's retention ages, a database URL): `up`
    restarts it, so the new settings apply; an unchanged one is left running."""
    site_dir = tmp_path / "site"
    first = manager.up(site_dir, progress=lambda _m: None)
    try:
        two = fake_parts[1]
        env = {"PREFECT_SERVER_EVENTS_RETENTION_PERIOD": "PT3600S"}
        changed = manager.Part(two.name, two.expect, two.argv, two.healthy, two.address,
                               env=lambda s: env)  # fmt: skip
        monkeypatch.setattr(manager, "PARTS", [fake_parts[0], changed])
        msgs: list[str] = []
        again = manager.up(site_dir, progress=msgs.append)
        assert again[0].pid == first[0].pid and again[1].pid != first[1].pid
        assert f"restarting two (pid {first[1].pid}): its settings changed" in msgs
        msgs.clear()
        third = manager.up(site_dir, progress=msgs.append)
        assert [p.pid for p in third] == [p.pid for p in again]
        assert not [m for m in msgs if m.startswith("restarting")]
    finally:
        manager.down(site_dir, progress=lambda _m: None)
