"""The compute nodes of a multi-node site (`aif site up --nodes N`) on this one machine.

Each node is a network namespace ``aif-nI`` with one veth link into the site's bridge
``aif-br0`` (the login side holds ``<subnet>.1``, node I ``<subnet>.(10+I)``), and its slurmd
runs in a UTS and mount namespace of its own as well: the node's host name, and a hosts
file of the site's bind-mounted on /etc/hosts so that jobs resolve the nodes' names (torch's
rendezvous). The run-folder tree is shared by all nodes (the shared filesystem). A node
reaches only what the login side binds to the bridge address or to 0.0.0.0 (Slurm's
controller, the object store, a Dask scheduler), never its loopback (Prefect, MLflow,
the databases). Only addresses of the site's own namespaces are used.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aifactory.infra.site import procs
from aifactory.infra.site.layout import Site, host
from aifactory.tasks.core.errors import SiteError

BRIDGE = "aif-br0"
NETNS_DIR = Path("/run/netns")
NODE_IFACE = "eth0"  # the node's end of its veth link, inside its namespace


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return procs.run(["ip", *args], check=check)


def _links() -> dict[str, dict[str, Any]]:
    out = _ip("-j", "addr", "show").stdout
    return {str(link["ifname"]): link for link in json.loads(out or "[]")}


def hosts_file(site: Site) -> Path:
    return site.root / "nodes" / "hosts"


def netns_names() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith("aif-n"))
    except OSError:
        return []


def _check_subnet_free(site: Site, links: dict[str, dict[str, Any]]) -> None:
    """The site's /24 must not be in use on this machine by anything but our bridge."""
    ours = ipaddress.ip_network(f"{site.subnet}.0/24")
    for name, link in links.items():
        if name == BRIDGE:
            continue
        for addr in link.get("addr_info") or []:
            if addr.get("family") != "inet":
                continue
            net = ipaddress.ip_interface(f"{addr['local']}/{addr['prefixlen']}").network
            if net.overlaps(ours):
                raise SiteError(
                    f"site nodes: the site's subnet {ours} overlaps {net} of interface "
                    f"{name}: free it, or bring the site up with one node"
                )


def ensure_network(site: Site) -> list[str]:
    """The bridge, one namespace and veth link per node, the hosts file (idempotent);
    what was made. A host that cannot make them gets one line that names the way out."""
    if os.geteuid() != 0:
        raise SiteError("site nodes: namespaces and the bridge need root "
                        "(or `aif site up --nodes 1`: one node, none of them)")  # fmt: skip
    try:
        return _ensure_network(site)
    except SiteError as exc:
        if str(exc).startswith("site nodes:"):
            raise
        why = str(exc)[:300]
        raise SiteError(f"site nodes: {why} (this host cannot make the compute nodes' "
                        "network; `aif site up --nodes 1` runs without it)") from None  # fmt: skip


def _owner_tag(site: Site) -> str:
    return str(site.root)[-255:]  # the kernel keeps at most 255 bytes of an alias


def bridge_owner() -> str | None:
    """The site folder recorded on the bridge (its interface alias) when the site made it;
    None without a bridge, "" for a bridge that has none."""
    out = _ip("-j", "link", "show", BRIDGE, check=False)
    if out.returncode != 0:
        return None
    links = json.loads(out.stdout or "[]")
    return str(links[0].get("ifalias") or "") if links else None


def _ensure_network(site: Site) -> list[str]:
    made: list[str] = []
    links = _links()
    owner = bridge_owner() if BRIDGE in links else None
    if owner and owner != _owner_tag(site):
        raise SiteError(f"site nodes: the bridge {BRIDGE} belongs to the site in {owner}: "
                        "bring that site down first (`aif site down --dir`)")  # fmt: skip
    _check_subnet_free(site, links)
    if BRIDGE not in links:
        _ip("link", "add", BRIDGE, "type", "bridge")
        made.append(BRIDGE)
    _ip("link", "set", BRIDGE, "alias", _owner_tag(site))
    login = f"{site.service_address}/24"
    addrs = [a.get("local") for a in (_links()[BRIDGE].get("addr_info") or [])]
    if site.service_address not in addrs:
        _ip("addr", "add", login, "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for name in site.node_names():
        if not (NETNS_DIR / name).exists():
            _ip("netns", "add", name)
            made.append(name)
        veth = f"{name}-v"
        if veth not in _links():
            _ip("-n", name, "link", "del", NODE_IFACE, check=False)  # a half-made pair
            _ip("link", "add", veth, "type", "veth", "peer", "name", NODE_IFACE, "netns", name)
        _ip("link", "set", veth, "master", BRIDGE, "up")
        inside = json.loads(_ip("-n", name, "-j", "addr", "show").stdout or "[]")
        have = [a.get("local") for link in inside for a in link.get("addr_info") or []]
        if site.node_address(name) not in have:
            _ip("-n", name, "addr", "add", f"{site.node_address(name)}/24", "dev", NODE_IFACE)
        _ip("-n", name, "link", "set", NODE_IFACE, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        # The login side is the default route (Dask and gloo find their own address by
        # it); this host forwards nothing (ip_forward stays as it is), so it leads nowhere
        # but to the login side's own addresses.
        _ip("-n", name, "route", "replace", "default", "via", site.service_address)
    write_hosts(site)
    return made


def write_hosts(site: Site) -> None:
    lines = ["127.0.0.1 localhost", f"{site.service_address} {host()} aif-login"]
    lines += [f"{site.node_address(n)} {n}" for n in site.node_names()]
    path = hosts_file(site)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.chmod(0o644)
    tmp.replace(path)


def launcher(site: Site, name: str) -> list[str]:
    """The command that runs a node's slurmd inside its namespaces (before slurmd's own
    argv). nsenter joins the network namespace; ``ip netns exec`` would remount /sys and
    hide the cgroups from slurmd. Each step execs the next, so the recorded pid is slurmd."""
    script = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
    return ["nsenter", f"--net={NETNS_DIR / name}", "--", "unshare", "--uts", "--mount",
            "--propagation", "private", "--", "sh", "-c", script, "aif-node",
            str(hosts_file(site)), name]  # fmt: skip


def node_pids(name: str) -> list[int]:
    """Every process in the node's network namespace (its slurmd, job steps, workers)."""
    out = _ip("netns", "pids", name, check=False)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def kill_node(name: str) -> list[int]:
    """A node dies: SIGKILL every process in its namespace at once; the pids killed."""
    pids = node_pids(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def remove_network(site: Site) -> list[str]:
    """Kill what still runs in the nodes, remove every namespace and the bridge; what was
    removed. Only names this site makes (aif-n*, aif-br0) are touched, and only when this
    site made them: a bridge that names another site's folder (another clone's site, a
    unit test's) is left with its nodes as it is."""
    owner = bridge_owner()
    if owner and owner != _owner_tag(site):
        return []
    if owner is None and not hosts_file(site).exists():
        return []  # no bridge, and this site never made nodes: leftovers are not ours
    removed = []
    for name in netns_names():
        if kill_node(name):
            time.sleep(0.3)
        _ip("netns", "del", name, check=False)
        removed.append(name)
    links = _links()
    for link in list(links):
        if link.startswith("aif-n") and link.endswith("-v"):
            _ip("link", "del", link, check=False)
    if BRIDGE in links:
        _ip("link", "del", BRIDGE, check=False)
        removed.append(BRIDGE)
    return removed


def can_connect(node: str, address: str, port: int, timeout: float = 3.0) -> bool:
    """Whether a TCP connection from inside ``node`` to ``address:port`` succeeds."""
    code = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])),"
            f" timeout={timeout})\nexcept OSError:\n sys.exit(1)")  # fmt: skip
    proc = subprocess.run(["nsenter", f"--net={NETNS_DIR / node}", "--", sys.executable, "-c",
                           code, address, str(port)], capture_output=True,
                          timeout=timeout + 30)  # fmt: skip
    return proc.returncode == 0
